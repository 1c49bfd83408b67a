"""The ``cuda`` backend of :mod:`sparsellm.ops`: the compiled extension ``sparsellm._C``
(sources in ``csrc/``), adapted to the signatures of :mod:`sparsellm.reference`.

Importing this module registers its operations; it raises ImportError when the extension is
neither built nor compilable here (CPU-only torch, no GPU, no toolkit; see
:mod:`sparsellm._extension`), which ops records as "unavailable" with the reason.
Operations the extension does not implement, and calls it does not handle (blocks wider than
256 columns or in float64, M > 16, unstructured or float64 Wanda masks: each raises :class:`sparsellm.ops.Decline`
before calling the extension), go through ops to the next backend, which ops records.
"""
from __future__ import annotations

import warnings

import torch

from . import kernel_constants, ops, reference
from ._extension import load_extension

# built-in or compiled on first use, and compiled with the constants below; else ImportError
_C = load_extension()

_SCORE_RAW, _SCORE_WANDA = kernel_constants.SCORE_RAW, kernel_constants.SCORE_WANDA
_MAX_M = kernel_constants.MAX_M
_MAX_BLOCK = kernel_constants.CUDA_OBS_MAX_BLOCK


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
    if torch.float64 in (weight.dtype, hinv.dtype):
        raise ops.Decline("float64 (the kernel sweeps in fp32)")
    if weight.shape[1] > _MAX_BLOCK:
        # one warp per row keeps the row in registers: 8 slots x 32 lanes at most
        raise ops.Decline(f"width {weight.shape[1]} > {_MAX_BLOCK}")
    if prune_mask is None and n is not None and n == 0:
        prune_mask = torch.zeros_like(weight, dtype=torch.bool)  # 0:m prunes nothing
    if prune_mask is not None:
        # a broadcastable mask (one row for all rows), as the reference takes: rows x width here
        prune_mask = prune_mask.expand_as(weight)
    return tuple(_C.obs_prune_block(weight, hinv, float(fraction), int(n or 0), int(m or 1), prune_mask))


def _decline_wide_groups(m):
    if m > _MAX_M:  # the mask kernel ranks a group by M^2 compares in registers
        raise ops.Decline(f"m={m} > {_MAX_M}")


def nm_prune_mask(score, n, m):
    _decline_wide_groups(m)
    return _C.nm_mask(score, None, int(n), int(m), _SCORE_RAW)


def wanda_prune_mask(weight, in_norm, fraction, n=None, m=None):
    if n is None:
        # unstructured Wanda is a per-row selection, which the Triton kernel does (fused
        # score + bisection select); the extension has no second copy of it
        raise ops.Decline("unstructured")
    if torch.float64 in (weight.dtype, in_norm.dtype):
        # the kernel scores |W| * norm in fp32; the reference scores float64 inputs in float64
        raise ops.Decline("float64 (the kernel scores in fp32)")
    _decline_wide_groups(m)
    return _C.nm_mask(weight, in_norm, int(n), int(m), _SCORE_WANDA)


for _name, _fn in {
    "obs_prune_block": obs_prune_block,
    "damped_cholesky": damped_cholesky,
    "cholesky_inverse_upper": cholesky_inverse_upper,
    "nm_prune_mask": nm_prune_mask,
    "wanda_prune_mask": wanda_prune_mask,
}.items():
    ops.register(_name, "cuda", _fn)
