"""Batched (pseudo-)inverse Cholesky factor for the OBS sweep: ``U`` upper with ``U^T U = H^-1``.

What is done in Triton and why:

- The factorisation itself stays with cuSOLVER (``torch.linalg.cholesky_ex`` inside the
  reference's ``damped_cholesky``, which also owns the per-matrix dampening retry). A
  Cholesky is a chain of n dependent panel steps, each needing a square root and a division
  before the trailing update can start; cuSOLVER's blocked potrf already runs the trailing
  updates as tensor-core GEMMs and reports a per-matrix ``info`` that the retry needs. A
  Triton version would be slower and would have to re-create that failure reporting.
- The reference then forms H^-1 explicitly (``cholesky_inverse``) and factors it *again*
  (a second Cholesky). That is avoidable: with J the exchange (index-reversal) matrix,
  factor J H J = L L^T; then H = R R^T with R = J L J upper triangular, so
  H^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J. One Cholesky plus one triangular inverse,
  and U has a positive diagonal, so it *is* the unique upper Cholesky factor of H^-1 that
  the reference returns.
- The triangular inverse is the part Triton does: a kernel inverts all T x T diagonal tiles
  of all matrices in one launch (forward substitution in registers, one program per tile),
  and the off-diagonal blocks are filled by the blocked recursion
  inv([[A, 0], [B, C]]) = [[A^-1, 0], [-C^-1 B A^-1, C^-1]], whose work is GEMMs (cuBLAS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsellm import reference

from ._common import check_device, interpreting


@triton.jit
def _tri_inv_tile_kernel(l_ptr, x_ptr, n, stride_b, stride_r, T: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i_loc = tl.arange(0, T)
    rows = t * T + i_loc[:, None]
    cols = t * T + i_loc[None, :]
    ok = (rows < n) & (cols < n)
    # int64 row offsets: rows * stride_r passes 2^31 once n > 46340 (Llama-3.1-405B's 53248-wide
    # MLP input), where int32 wrapped to a negative offset (read and written out of the matrix)
    off = b * stride_b + rows.to(tl.int64) * stride_r + cols
    A = tl.load(l_ptr + off, mask=ok & (cols <= rows), other=0.0)
    # pad the last tile with the identity so it stays invertible and its inverse is exact
    A = tl.where((rows >= n) & (rows == cols), 1.0, A)
    X = tl.zeros([T, T], dtype=A.dtype)
    r_idx = i_loc[:, None]
    c_idx = i_loc[None, :]
    for i in range(T):
        # row i of X = (e_i - sum_{j<i} A_ij X_j) / A_ii ; rows >= i of X are still zero
        a_i = tl.sum(tl.where(r_idx == i, A, 0.0), axis=0)        # row i of A, indexed by j
        a_ii = tl.sum(tl.where(i_loc == i, a_i, 0.0), axis=0)
        acc = tl.sum(a_i[:, None] * X, axis=0)                   # sum_j A_ij X[j, :]
        x_i = (tl.where(i_loc == i, 1.0, 0.0) - acc) / a_ii
        X = tl.where(r_idx == i, x_i[None, :], X)
    tl.store(x_ptr + off, X, mask=ok)


def tri_inverse_lower(lower: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Inverse of lower-triangular matrices ``[..., n, n]`` (the upper part is ignored)."""
    check_device(lower)
    if lower.numel() == 0:  # before the reshape: reshape(-1, 0, 0) refuses 0 x 0 matrices
        return torch.zeros_like(lower, memory_format=torch.contiguous_format)
    n = lower.shape[-1]
    batch_shape = lower.shape[:-2]
    L = lower.reshape(-1, n, n).contiguous()
    X = torch.zeros_like(L)
    T = tile or (16 if interpreting() else 64)
    tiles = triton.cdiv(n, T)
    _tri_inv_tile_kernel[(tiles, L.shape[0])](L, X, n, L.stride(0), L.stride(1), T=T,
                                               num_warps=1 if interpreting() else 4)
    _fill_off_diagonal(L, X, 0, tiles * T, T, n)
    return X.reshape(*batch_shape, n, n)


def _fill_off_diagonal(L, X, a, b, T, n):
    """Post-order blocked recursion over [a, b) (tile-aligned): both halves are complete
    inverses before their coupling block -C^-1 B A^-1 is formed."""
    b_eff = min(b, n)
    if b - a <= T or b_eff <= a:
        return
    half_tiles = ((b - a) // T + 1) // 2
    k = a + half_tiles * T
    _fill_off_diagonal(L, X, a, k, T, n)
    _fill_off_diagonal(L, X, k, b, T, n)
    if k >= n:
        return
    X[:, k:b_eff, a:k] = -(X[:, k:b_eff, k:b_eff] @ (L[:, k:b_eff, a:k] @ X[:, a:k, a:k]))


def cholesky_inverse_upper(gram: torch.Tensor, percdamp: float):
    """Same contract as :func:`sparsellm.reference.cholesky_inverse_upper`."""
    check_device(gram)
    # dampening adds lambda*I, which commutes with the index reversal, and the mean diagonal
    # is unchanged by it: so the retry logic of the reference applies to J G J as is
    lower, damp = reference.damped_cholesky(gram.flip(-2, -1), percdamp)
    return tri_inverse_lower(lower).flip(-2, -1), damp
