"""The ``cuda`` backend of :mod:`sparsellm.ops`: the compiled extension ``sparsellm._C``
(sources in ``csrc/``), adapted to the signatures of :mod:`sparsellm.reference`.

Importing this module registers its operations; it raises ImportError when the extension was
not built (pure-Python installs, CPU-only torch), which ops records as "unavailable".
Operations the extension does not implement fall back, through ops, to the next backend.
"""
from __future__ import annotations

import warnings

import torch

from . import ops, reference

try:
    from . import _C
except ImportError as exc:
    raise ImportError(f"the CUDA extension sparsellm._C is not built ({exc}); "
                      "see benchmarks/build_cuda_ext.sh or `SPARSELLM_BUILD_EXT=1 pip install --no-build-isolation .`"
                      ) from exc

# kept in step with kernels/_common.py and csrc/sparsellm_ops.h
_SCORE_RAW, _SCORE_WANDA, _SCORE_OBS = 0, 1, 2
_MAX_M = 16
_MAX_BLOCK = 256


def _checked(result, max_tries=6):
    """Turn the extension's (factor, damp, attempts) into the reference's (factor, damp),
    with the same warning on a retry and the same error when every dampening failed."""
    factor, damp, attempts = result
    if attempts < 0:
        raise reference.NotPositiveDefinite(
            f"Cholesky failed even with dampening {damp.max().item():g} x mean diagonal")
    if attempts:
        warnings.warn(f"Hessian not positive definite; dampening raised to {damp.max().item():g} "
                      "of the mean diagonal", RuntimeWarning, stacklevel=4)
    return factor, damp


def damped_cholesky(gram, percdamp, max_tries=6):
    return _checked(_C.damped_cholesky(gram, float(percdamp), int(max_tries)))


def cholesky_inverse_upper(gram, percdamp):
    return _checked(_C.cholesky_inverse_upper(gram, float(percdamp), 6))


def obs_prune_block(weight, hinv, fraction, n=None, m=None, prune_mask=None):
    if weight.shape[1] > _MAX_BLOCK:
        # one warp per row keeps the row in registers: 8 slots x 32 lanes at most
        return reference.obs_prune_block(weight, hinv, fraction, n, m, prune_mask)
    if prune_mask is None and n is not None and n == 0:
        prune_mask = torch.zeros_like(weight, dtype=torch.bool)  # 0:m prunes nothing
    return tuple(_C.obs_prune_block(weight, hinv, float(fraction), int(n or 0), int(m or 1), prune_mask))


def nm_prune_mask(score, n, m):
    if m > _MAX_M:
        return reference.nm_prune_mask(score, n, m)
    return _C.nm_mask(score, None, int(n), int(m), _SCORE_RAW)


def nm_mask_obs(weight, hinv_diag, n, m):
    """N:M mask of the OBS score w^2/d^2 (the selection the sweep makes per group)."""
    return _C.nm_mask(weight, hinv_diag, int(n), int(m), _SCORE_OBS)


def wanda_prune_mask(weight, in_norm, fraction, n=None, m=None):
    if n is None or m > _MAX_M:
        # unstructured Wanda is a per-row selection, which the Triton kernel does (fused
        # score + bisection select); the extension has no second copy of it
        if ops.available("triton", weight.device):
            from sparsellm.kernels import wanda_prune_mask as triton_wanda
            return triton_wanda(weight, in_norm, fraction, n, m)
        return reference.wanda_prune_mask(weight, in_norm, fraction, n, m)
    return _C.nm_mask(weight, in_norm, int(n), int(m), _SCORE_WANDA)


for _name, _fn in {
    "obs_prune_block": obs_prune_block,
    "damped_cholesky": damped_cholesky,
    "cholesky_inverse_upper": cholesky_inverse_upper,
    "nm_prune_mask": nm_prune_mask,
    "wanda_prune_mask": wanda_prune_mask,
}.items():
    ops.register(_name, "cuda", _fn)
