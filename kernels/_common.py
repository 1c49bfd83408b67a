"""Helpers shared by the Triton kernels: interpreter detection, autotune configs, the fused
scores and the order-preserving integer key of a float.

Importing this module imports triton; ``sparsellm/_triton_backend.py`` guards that import so a
missing triton only makes the backend unavailable.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Score modes of the mask kernels (defined, and explained, in sparsellm/kernel_constants.py);
# the *_C twins are the same values as constexpr globals, which @triton.jit code may read.
from sparsellm.kernel_constants import SCORE_RAW, SCORE_WANDA
from sparsellm.ops import Decline

SCORE_RAW_C = tl.constexpr(SCORE_RAW)
SCORE_WANDA_C = tl.constexpr(SCORE_WANDA)


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def configs(full: list[dict], interp: dict, num_warps=(4,)) -> list[triton.Config]:
    """Autotune candidates: ``full`` on a GPU, each with every ``num_warps`` unless its dict
    names its own ``num_warps``; the single ``interp`` under the interpreter (where timing
    candidates would only multiply the already slow run time)."""
    if interpreting():
        return [triton.Config(interp, num_warps=1)]
    out = []
    for kw in full:
        kw = dict(kw)
        own = kw.pop("num_warps", None)
        out += [triton.Config(kw, num_warps=w) for w in ((own,) if own else num_warps)]
    return out


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def score_aux(x: torch.Tensor, aux: torch.Tensor | None, mode: int) -> torch.Tensor:
    """The per-column ``aux`` of a fused score as the mask kernels read it (fp32, contiguous;
    ``x`` itself as a never-read placeholder for a raw score). The fused scores are computed
    in fp32 (:func:`fused_score`), where the reference scores float64 inputs in float64: such
    a call is declined, else a float64 prune would lose the order of scores within fp32
    rounding of each other. ``aux`` must hold one entry per column of ``x``: the kernels index
    it by column, and would read past a shorter one."""
    if mode == SCORE_RAW:
        return x
    if torch.float64 in (x.dtype, aux.dtype):
        raise Decline("float64 (the kernel scores in fp32)")
    if aux.numel() != x.shape[1]:
        raise ValueError(f"{aux.numel()} per-column scale(s) for {x.shape[1]} columns")
    return aux.float().contiguous()


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


@triton.jit
def fused_score(w, aux, MODE: tl.constexpr):
    """Score of weights ``w`` (any float dtype) given the per-column ``aux`` (fp32), in fp32
    (raw scores are passed through in their own dtype).

    The Wanda score with the same operations in the same order as the reference
    (``abs().float() * norm``), so scores are bit-identical and masks agree wherever the
    reference has no ties.
    """
    if MODE == SCORE_WANDA_C:
        w = w.to(tl.float32)
        s = tl.abs(w) * aux
    else:
        s = w  # a raw score keeps its dtype (a float64 score must not be rounded to fp32)
    return s


@triton.jit
def ranks_before(s_i, s_j, i_before_j):
    """1 where entry i comes before entry j in the pruning order (lower score, ties broken by
    index), else 0. Summing it over i gives j's rank; the ``n`` lowest ranks are pruned."""
    # NaN ranks above every number (as in torch.topk, the reference's order), NaNs by index;
    # without this clause a NaN would rank first and a group lose more than n entries
    nan_i = s_i != s_i
    nan_j = s_j != s_j
    return ((s_i < s_j) | ((s_i == s_j) & i_before_j) | (nan_j & (~nan_i | i_before_j))).to(tl.int32)


@triton.jit
def ordered_key(x):
    """int64 key whose order equals the float order of ``x`` (fp32): positive floats keep their
    bits, negative floats get their magnitude bits flipped. -0.0 is folded onto +0.0 so that
    the two compare equal, as they do as floats."""
    x = tl.where(x == 0.0, 0.0, x)
    # a NaN's sign bit is arbitrary (0 * inf sets it on x86): clear it, so every NaN keys above
    # +inf, as torch.topk orders NaN
    x = tl.where(x != x, tl.abs(x), x)
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key.to(tl.int64)
