"""Per-row k-th value selection without a sorted copy: unstructured Wanda (score fused) and the
generic ``row_prune_mask``.

One program per row. The k-th smallest score of the row is found by bisection on the
order-preserving integer key of the float (``ordered_key``): 32 counting passes, each
deciding one bit of the answer, so the only state is a running count, never a sorted copy
or a top-k buffer (a sort of an 11008-wide row needs the row plus indices twice over; this
needs nothing). Rows that fit in one tile are read from memory once and kept in registers
for all passes; wider rows are re-read per pass, from L2. Entries below the k-th value are
pruned, and entries equal to it are pruned in index order until exactly k are pruned (the
reference's ``topk`` leaves tie order unspecified, so masks agree wherever there are no ties
at the k-th value).

``flat_prune_mask`` (one selection over a whole tensor) is deliberately not offered here:
one program per selection would leave all but one SM idle; the reference's ``topk`` runs on
the whole device and is used instead (ops runs it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsellm.ops import Decline
from sparsellm.sparsity import pruned_count

from ._common import (SCORE_RAW, SCORE_RAW_C, SCORE_WANDA, check_device, configs, fused_score, ordered_key,
                      score_aux)



@triton.jit
def _chunk_keys(x_ptr, aux_ptr, row_off, c0, cols, MODE: tl.constexpr, BLOCK: tl.constexpr):
    col = c0 + tl.arange(0, BLOCK)
    ok = col < cols
    x = tl.load(x_ptr + row_off + col, mask=ok, other=0.0)
    if MODE != SCORE_RAW_C:
        aux = tl.load(aux_ptr + col, mask=ok, other=1.0)
    else:
        aux = 0.0
    key = ordered_key(fused_score(x, aux, MODE).to(tl.float32))
    # pad lanes get the largest key: never counted as <= any probe (probes stay < 2^31)
    return tl.where(ok, key, 9223372036854775807), col, ok


@triton.autotune(configs=configs([{"BLOCK": 1024}, {"BLOCK": 4096}, {"BLOCK": 8192}], {"BLOCK": 128},
                                 num_warps=(4, 8)),
                 key=["cols"])
@triton.heuristics({"ONE_CHUNK": lambda a: a["cols"] <= a["BLOCK"]})
@triton.jit
def _row_select_kernel(x_ptr, aux_ptr, out_ptr, cols, k, stride_x, stride_o,
                       MODE: tl.constexpr, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_off = row * stride_x
    o_off = row * stride_o
    if ONE_CHUNK:
        keys, col, ok = _chunk_keys(x_ptr, aux_ptr, x_off, 0, cols, MODE, BLOCK)
    # t = smallest key with count(key <= t) >= k, built from the top bit down: the invariant is
    # count(key < t) < k, and bit b is set when even t + 2^b - 1 leaves fewer than k below.
    t = tl.full([], -2147483648, tl.int64)
    one = tl.full([], 1, tl.int64)
    for i in range(32):
        step = one << (31 - i)
        probe = t + step - 1
        if ONE_CHUNK:
            cnt = tl.sum((keys <= probe).to(tl.int32), axis=0)
        else:
            cnt = tl.zeros([], tl.int32)
            for c0 in range(0, cols, BLOCK):
                kk, _, _ = _chunk_keys(x_ptr, aux_ptr, x_off, c0, cols, MODE, BLOCK)
                cnt += tl.sum((kk <= probe).to(tl.int32), axis=0)
        t = tl.where(cnt < k, t + step, t)
    # prune everything below t, then ties at t in index order up to k in all
    if ONE_CHUNK:
        below = tl.sum((keys < t).to(tl.int32), axis=0)
        tie = keys == t
        tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
        pruned = (keys < t) | (tie & (tie_rank <= k - below))
        tl.store(out_ptr + o_off + col, pruned, mask=ok)
    else:
        below = tl.zeros([], tl.int32)
        for c0 in range(0, cols, BLOCK):
            kk, _, _ = _chunk_keys(x_ptr, aux_ptr, x_off, c0, cols, MODE, BLOCK)
            below += tl.sum((kk < t).to(tl.int32), axis=0)
        ties_before = tl.zeros([], tl.int32)
        for c0 in range(0, cols, BLOCK):
            kk, cc, okc = _chunk_keys(x_ptr, aux_ptr, x_off, c0, cols, MODE, BLOCK)
            tie = kk == t
            tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), axis=0)
            pruned = (kk < t) | (tie & (tie_rank <= k - below))
            tl.store(out_ptr + o_off + cc, pruned, mask=okc)
            ties_before += tl.sum(tie.to(tl.int32), axis=0)


def row_select_mask(x: torch.Tensor, aux: torch.Tensor | None, k: int, mode: int = SCORE_RAW) -> torch.Tensor:
    """Prune the ``k`` lowest-scoring entries of each row, the score computed by ``mode``."""
    rows, cols = x.shape
    if not 0 <= k <= cols:
        raise ValueError(f"k={k} outside [0, {cols}]")
    if mode == SCORE_RAW and x.dtype == torch.float64:
        # the 32-bit key would round a float64 score; the next backend selects on it exactly
        raise Decline("float64 score")
    aux = score_aux(x, aux, mode)
    check_device(x)
    if k == 0 or x.numel() == 0:
        return torch.zeros((rows, cols), dtype=torch.bool, device=x.device)
    x = x.contiguous()
    out = torch.empty((rows, cols), dtype=torch.bool, device=x.device)
    _row_select_kernel[(rows,)](x, aux, out, cols, k, x.stride(0), out.stride(0), MODE=mode)
    return out


def row_prune_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    return row_select_mask(score, None, k, SCORE_RAW)


def wanda_unstructured_mask(weight: torch.Tensor, in_norm: torch.Tensor, fraction: float) -> torch.Tensor:
    return row_select_mask(weight, in_norm, pruned_count(weight.shape[1], fraction), SCORE_WANDA)
