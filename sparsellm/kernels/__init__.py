"""``sparsellm.kernels``: the Triton kernels, whose sources live in the top-level ``kernels/``
folder of the repository (registered with ops by :mod:`sparsellm._triton_backend`).

``kernels/`` itself has no ``__init__.py``, so that run from the repository root it is at
most a namespace portion and never shadows (or pretends to be) another top-level
``kernels`` package, such as Hugging Face's, which transformers probes for.

- A wheel installs ``kernels/*.py`` as ``sparsellm/kernels/`` (pyproject.toml maps the
  package to that folder; this file is not part of it), an implicit namespace subpackage.
- In a checkout, and in an editable install (whose import hook cannot load a mapped folder
  without ``__init__.py``), this file is what ``import sparsellm.kernels`` finds; it adds the
  top-level ``kernels/`` folder to the package's search path.
"""
import os as _os

_KERNELS_DIR = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))),
                             "kernels")
if _os.path.isdir(_KERNELS_DIR) and _KERNELS_DIR not in __path__:
    __path__.append(_KERNELS_DIR)
