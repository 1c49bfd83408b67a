"""One block of the SparseGPT (OBS) sweep: mask selection + column sweep, fused.

Rows of the weight are independent in the sweep (each row only ever sees its own entries and
the shared Hinv factor), so a program owns BLOCK_R whole rows of the block, keeps them in
registers for the entire sweep, and writes the pruned rows, the per-column errors and the
per-row loss once at the end. Per column it reads one row of the Hinv block; the whole block
(B x B fp32, 64 KiB at B = 128) is shared by every program and stays resident in L1/L2, which
is as on-chip as Triton lets us stage it (it has no explicit shared-memory staging, and
holding B x B in registers per program would spill).

Masks:
- unstructured: the ``pruned_count(rows * B, fraction)`` lowest ``w^2/d^2`` over the *whole block*.
  That selection couples all rows (one global threshold), so it cannot be made inside
  row-independent programs without a grid-wide barrier; it is taken before the sweep from
  the unswept block (exactly when the reference takes it) by the device-wide ``topk``.
- N:M: chosen inside the sweep when it reaches each group of M columns, on the already
  updated weights, exactly as the reference does (rank by comparison within the group).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsellm import reference
from sparsellm.ops import Decline
from sparsellm.sparsity import pruned_count

from ._common import check_device, configs, interpreting, next_pow2, ranks_before


@triton.autotune(configs=configs([{}], {}, num_warps=(4, 8)), key=["rows", "B", "NM"])
@triton.jit
def _obs_block_kernel(w_ptr, h_ptr, mask_ptr, q_ptr, err_ptr, loss_ptr, rows, B,
                      stride_w, stride_h, stride_m, stride_q, stride_e, N, M,
                      HAS_MASK: tl.constexpr, NM: tl.constexpr, BP: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BP)
    r2 = r[:, None].to(tl.int64)
    j2 = j[None, :]
    ok = (r2 < rows) & (j2 < B)
    W = tl.load(w_ptr + r2 * stride_w + j2, mask=ok, other=0.0).to(tl.float32)
    diag = tl.load(h_ptr + j * stride_h + j, mask=j < B, other=1.0).to(tl.float32)
    diag_sq = (diag * diag)[None, :]
    if HAS_MASK:
        P = tl.load(mask_ptr + r2 * stride_m + j2, mask=ok, other=0) != 0
    else:
        P = tl.zeros([BLOCK_R, BP], dtype=tl.int1)
    E = tl.zeros([BLOCK_R, BP], dtype=tl.float32)
    loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for col in range(B):
        at_col = j2 == col
        if NM:
            if col % M == 0:
                # rank the M scores of the group on the weights as updated so far
                grp = (j2 >= col) & (j2 < col + M)
                S = tl.where(grp, tl.div_rn(W * W, diag_sq), float("inf"))
                rank = tl.zeros([BLOCK_R, BP], dtype=tl.int32)
                for i in range(M):
                    s_i = tl.sum(tl.where(j2 == col + i, S, 0.0), axis=1)[:, None]
                    rank += ranks_before(s_i, S, j2 > col + i)
                P = tl.where(grp, rank < N, P)
        h_row = tl.load(h_ptr + col * stride_h + j, mask=(j >= col) & (j < B), other=0.0).to(tl.float32)
        d = tl.load(h_ptr + col * stride_h + col).to(tl.float32)
        w = tl.sum(tl.where(at_col, W, 0.0), axis=1)
        p = tl.sum(tl.where(at_col & P, 1, 0), axis=1) > 0
        q = tl.where(p, 0.0, w)
        diff = w - q
        loss += tl.div_rn(diff * diff, d * d)
        e = tl.div_rn(diff, d)
        # only the later columns: a non-finite error times the zero h_row of a finished
        # column is NaN (the reference and the CUDA sweep update columns > col alone)
        W = tl.where(j2 > col, W - e[:, None] * h_row[None, :], W)
        W = tl.where(at_col, q[:, None], W)
        E = tl.where(at_col, e[:, None], E)
    tl.store(q_ptr + r2 * stride_q + j2, W.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(err_ptr + r2 * stride_e + j2, E.to(err_ptr.dtype.element_ty), mask=ok)
    tl.store(loss_ptr + r, loss, mask=r < rows)


def obs_prune_block(weight: torch.Tensor, hinv: torch.Tensor, fraction: float,
                    n: int | None = None, m: int | None = None, prune_mask: torch.Tensor | None = None):
    """Same contract as :func:`sparsellm.reference.obs_prune_block`; computes in fp32 and
    returns the block and errors in ``weight``'s dtype."""
    check_device(weight, hinv)
    if torch.float64 in (weight.dtype, hinv.dtype):
        raise Decline("float64 (the kernel sweeps in fp32)")
    rows, width = weight.shape
    if hinv.shape != (width, width):  # the kernel indexes hinv by the block's columns
        raise ValueError(f"hinv has shape {tuple(hinv.shape)}; the block has {width} columns")
    if prune_mask is None:
        # a ragged last group would rank the zero pad lanes past the block with its entries
        reference.check_nm_width(width, n, m)
    if prune_mask is None and n is None:
        score = weight.float() ** 2 / torch.diagonal(hinv).float().unsqueeze(0) ** 2
        prune_mask = reference.flat_prune_mask(score, pruned_count(rows * width, fraction))
    nm = prune_mask is None
    weight = weight.contiguous()
    hinv = hinv.contiguous()
    q = torch.empty_like(weight)
    err = torch.empty_like(weight)
    # zeros, not empty: a block of no columns launches nothing, and its loss is 0 (the reference's)
    losses = torch.zeros(rows, dtype=torch.float32, device=weight.device)
    if rows and width:
        # expand: a broadcastable mask (one row for all rows, as the reference takes) becomes
        # rows x width, as the kernel reads it with its row stride
        mask_arg = prune_mask.expand(rows, width).contiguous().view(torch.uint8) if not nm else weight
        bp = next_pow2(width)
        # a tile of ~2K fp32 per program keeps W, the mask and the errors in registers
        block_r = min(next_pow2(rows), 64) if interpreting() else max(1, min(16, 2048 // bp))
        _obs_block_kernel[(triton.cdiv(rows, block_r),)](
            weight, hinv, mask_arg, q, err, losses, rows, width,
            weight.stride(0), hinv.stride(0), mask_arg.stride(0), q.stride(0), err.stride(0),
            n if nm else 0, m if nm else 1,
            HAS_MASK=not nm, NM=nm, BP=bp, BLOCK_R=block_r)
    return q, err, (losses.sum() / 2).to(weight.dtype)
