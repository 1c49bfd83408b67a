"""N:M masks fused with their score (raw score, Wanda |W|*norm, OBS w^2/d^2); any N < M <= 16.

A program owns a tile of BLOCK_R rows x BLOCK_G groups x M lanes (M padded to a power of two,
the pad lanes scoring +inf so they are never chosen). Each entry's rank inside its group is
counted by comparing it with the M entries of the group (M <= 16, so M^2 compares per group
is cheaper than any sort), ties broken by position; the N lowest ranks are pruned. The score
never goes to global memory: the kernel reads the weight once and writes one byte per weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsellm.kernel_constants import MAX_M
from sparsellm.ops import Decline

from ._common import (SCORE_RAW, SCORE_RAW_C, check_device, configs, fused_score, next_pow2, ranks_before,
                      score_aux)


@triton.autotune(configs=configs([{"BLOCK_R": 4}, {"BLOCK_R": 8}, {"BLOCK_R": 16}], {"BLOCK_R": 16}),
                 key=["rows", "groups", "M"])
@triton.jit
def _nm_mask_kernel(x_ptr, aux_ptr, out_ptr, rows, groups, stride_x, stride_o,
                    N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, MODE: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, MP)
    r3 = r[:, None, None]
    lane3 = lane[None, None, :]
    col = g[None, :, None] * M + lane3
    col_ok = (g[None, :, None] < groups) & (lane3 < M)
    ok = (r3 < rows) & col_ok
    x = tl.load(x_ptr + r3.to(tl.int64) * stride_x + col, mask=ok, other=0.0)
    if MODE != SCORE_RAW_C:
        aux = tl.load(aux_ptr + col, mask=col_ok, other=1.0)
    else:
        aux = 0.0
    s = fused_score(x, aux, MODE)
    s = tl.where(lane3 < M, s, float("inf"))
    rank = tl.zeros([BLOCK_R, BLOCK_G, MP], dtype=tl.int32)
    for i in tl.static_range(M):
        # entry i of every group, extracted from registers (an exact select-and-sum)
        s_i = tl.sum(tl.where(lane3 == i, s, 0.0), axis=2)[:, :, None]
        rank += ranks_before(s_i, s, lane3 > i)
    tl.store(out_ptr + r3.to(tl.int64) * stride_o + col, rank < N, mask=ok)


def nm_mask(x: torch.Tensor, aux: torch.Tensor | None, n: int, m: int, mode: int = SCORE_RAW) -> torch.Tensor:
    """Prune mask keeping ``m - n`` of every ``m`` consecutive entries per row, scored by ``mode``."""
    rows, cols = x.shape
    if cols % m:
        raise ValueError(f"{cols} columns are not a multiple of m={m}")
    if not 0 <= n <= m:
        raise ValueError(f"need 0 <= n <= m, got {n}:{m}")
    if m > MAX_M:
        # rank-by-comparison is M^2 per group; past 16 a sort wins, which is what the reference does
        raise Decline(f"m={m} > {MAX_M}")
    aux = score_aux(x, aux, mode)  # (a raw float64 score is compared in float64)
    check_device(x)
    x = x.contiguous()
    out = torch.empty((rows, cols), dtype=torch.bool, device=x.device)
    if x.numel() == 0:
        return out
    mp = next_pow2(m)
    groups = cols // m
    block_g = max(1, min(256 // mp, next_pow2(groups)))
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(groups, block_g))  # noqa: E731
    _nm_mask_kernel[grid](x, aux, out, rows, groups, x.stride(0), out.stride(0),
                          N=n, M=m, MP=mp, MODE=mode, BLOCK_G=block_g)
    return out


def nm_prune_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return nm_mask(score, None, n, m, SCORE_RAW)
