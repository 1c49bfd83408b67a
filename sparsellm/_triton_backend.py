"""The ``triton`` backend of :mod:`sparsellm.ops`: the Triton kernels of the top-level
``kernels/`` folder (installed as the subpackage ``sparsellm.kernels``), adapted to the
signatures of :mod:`sparsellm.reference`.

Importing this module registers every operation the kernels implement. Without triton the
import raises ImportError, which ops records as "backend unavailable"; nothing else in the
package imports triton, so a missing triton never breaks sparsellm itself.

Implemented: obs_prune_block, cholesky_inverse_upper, nm_prune_mask, row_prune_mask,
wanda_prune_mask, relu_z_step, swiglu_z_step, swiglu_s_step (and SparseLLM's auxiliary updates,
relu_aux_update and swiglu_aux_update: those kernels, then torch's), and the sparse decode products
nm24_linear and sell_linear (kernels/sparse_matmul.py; float16/bfloat16/float32 with the
weight in the input's dtype, else declined). Not implemented (ops runs the
reference): damped_cholesky and spd_solve (cuSOLVER factorisations, see kernels/cholesky.py)
and flat_prune_mask (one whole-tensor selection; see kernels/row_select.py). Calls a kernel
does not handle (M > 16, float64 where the kernel computes in fp32) raise
:class:`sparsellm.ops.Decline`, and ops runs the next backend.

``kernels/`` has no ``__init__.py`` on purpose: a regular package there would be found as a
top-level ``kernels`` package by anything run from the repository root (transformers probes
for Hugging Face's ``kernels`` package and imports what it finds). See
``sparsellm/kernels/__init__.py`` for how the folder is reached from a checkout.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"the triton backend needs the 'triton' package ({exc}); pip install 'sparsellm[triton]'") from exc

from . import ops, reference
from .kernels import cholesky, nm_mask, obs_block, row_select, sparse_matmul, sparsellm_steps
from .kernels._common import SCORE_WANDA


def wanda_prune_mask(weight, in_norm, fraction, n=None, m=None):
    """Wanda mask with the score |W| * ||x|| fused into the selection (never materialised)."""
    if n is not None:
        return nm_mask.nm_mask(weight, in_norm, n, m, SCORE_WANDA)
    return row_select.wanda_unstructured_mask(weight, in_norm, fraction)


def relu_aux_update(p, m, z_old, alpha, gamma, omega):
    """The z-step's kernel, then the relaxation and the norms as the reference computes them
    (torch's own GPU kernels)."""
    return reference.relu_relax_and_measure(sparsellm_steps.relu_z_step(p, m, alpha, gamma), z_old, m, p, omega)


def swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, iterations=2):
    """The z- and s-steps' kernels, then the relaxation and the norms as the reference computes
    them. (The kernels decline float64 only, so a declined call has computed nothing.)"""
    z = sparsellm_steps.swiglu_z_step(p, m, s_old, alpha_z, gamma)
    s = sparsellm_steps.swiglu_s_step(s_old, g, p, z, alpha_s, gamma, iterations)
    return reference.swiglu_relax_and_measure(z, s, z_old, s_old, m, g, p, omega)


for _name, _fn in {
    "obs_prune_block": obs_block.obs_prune_block,
    "cholesky_inverse_upper": cholesky.cholesky_inverse_upper,
    "nm_prune_mask": nm_mask.nm_prune_mask,
    "row_prune_mask": row_select.row_prune_mask,
    "wanda_prune_mask": wanda_prune_mask,
    "relu_z_step": sparsellm_steps.relu_z_step,
    "swiglu_z_step": sparsellm_steps.swiglu_z_step,
    "swiglu_s_step": sparsellm_steps.swiglu_s_step,
    "relu_aux_update": relu_aux_update,
    "swiglu_aux_update": swiglu_aux_update,
    "nm24_linear": sparse_matmul.nm24_linear,
    "sell_linear": sparse_matmul.sell_linear,
}.items():
    ops.register(_name, "triton", _fn)
