"""sparsellm: prune pre-trained causal language models to high sparsity.

Python API (the ``sparsellm-prune`` CLI is a thin layer over it)::

    from sparsellm import PruneConfig, run
    report = run(PruneConfig(method="sparsegpt", sparsity="2:4", nsamples=32, seqlen=512))
"""
__version__ = "0.1.0"

from .config import AllocationSettings, ElsaSettings, PruneConfig, SparseLLMSettings  # noqa: E402
from .sparsity import SparsityPattern  # noqa: E402


def __getattr__(name):
    # The heavier modules (transformers) load on first use, keeping `import sparsellm` cheap.
    if name in ("run", "prune", "evaluate", "load_model"):
        from . import api
        return getattr(api, name)
    if name == "load_pruned":
        from .export import load_pruned
        return load_pruned
    raise AttributeError(f"module 'sparsellm' has no attribute {name!r}")


__all__ = ["PruneConfig", "SparseLLMSettings", "ElsaSettings", "AllocationSettings", "SparsityPattern", "run", "prune", "evaluate", "load_model",
           "load_pruned", "__version__"]
