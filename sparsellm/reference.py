"""Plain-PyTorch reference implementations of the hot operations.

These are the specification and the test oracle of every fast path (Triton kernels in
``kernels/``, the CUDA extension in ``csrc/``). Methods never call them directly: they go
through :mod:`sparsellm.ops`, which picks a backend.

Mask convention: a boolean ``prune_mask`` is True where a weight is removed.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------


def nm_prune_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest-scoring entries of every ``m`` consecutive entries of each row."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    drop = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def row_prune_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the ``k`` lowest-scoring entries of each row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        drop = torch.topk(score, k, dim=1, largest=False).indices
        mask.scatter_(1, drop, True)
    return mask


def flat_prune_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the ``k`` lowest-scoring entries of the whole tensor."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask.reshape(score.shape)


def wanda_prune_mask(weight: torch.Tensor, in_norm: torch.Tensor, fraction: float,
                     n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Wanda: score |W_ij| * ||X_j||, compared within each output row (or N:M group)."""
    score = weight.abs().float() * in_norm.float().unsqueeze(0)
    if n is not None:
        return nm_prune_mask(score, n, m)
    return row_prune_mask(score, int(weight.shape[1] * fraction))


# ----------------------------------------------------------------------------------------
# Cholesky factorisations and solves
# ----------------------------------------------------------------------------------------


class NotPositiveDefinite(RuntimeError):
    pass


def damped_cholesky(gram: torch.Tensor, percdamp: float, max_tries: int = 6):
    """Lower Cholesky factor of ``G + lambda I`` with ``lambda = percdamp * mean(diag G)``.

    Works on one matrix or a batch ``[..., n, n]``. When a factorisation fails the dampening
    of that matrix alone is raised tenfold and retried. Returns ``(L, percdamp_used)`` where
    ``percdamp_used`` has the batch shape. ``gram`` is not modified.
    """
    n = gram.shape[-1]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    mean_diag = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    damp = torch.full(gram.shape[:-2], float(percdamp), dtype=gram.dtype, device=gram.device)
    for attempt in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(gram + (damp * mean_diag)[..., None, None] * eye)
        failed = info != 0
        if not failed.any():
            if attempt:
                warnings.warn(f"Hessian not positive definite; dampening raised to {damp.max().item():g} "
                              "of the mean diagonal", RuntimeWarning, stacklevel=3)
            return chol, damp
        damp = torch.where(failed, damp * 10, damp)
    raise NotPositiveDefinite(f"Cholesky failed even with dampening {damp.max().item():g} x mean diagonal")


def cholesky_inverse_upper(gram: torch.Tensor, percdamp: float):
    """Upper Cholesky factor U of the inverse of the dampened Gram matrix (H^-1 = U^T U).

    This is the factor the OBS sweep of SparseGPT walks along. Batched over leading dims.
    Returns ``(U, percdamp_used)``.
    """
    chol, damp = damped_cholesky(gram, percdamp)
    inverse = torch.cholesky_inverse(chol) if chol.dim() == 2 else torch.stack(
        [torch.cholesky_inverse(c) for c in chol.reshape(-1, *chol.shape[-2:])]).reshape(chol.shape)
    upper = torch.linalg.cholesky(inverse, upper=True)
    return upper, damp


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor, percdamp: float = 0.0):
    """Solve ``A x = rhs`` for symmetric positive (semi)definite A by Cholesky, never an inverse."""
    chol, _ = damped_cholesky(matrix, percdamp) if percdamp > 0 else _plain_cholesky(matrix)
    return torch.cholesky_solve(rhs, chol)


def _plain_cholesky(matrix):
    chol, info = torch.linalg.cholesky_ex(matrix)
    if (info != 0).any():
        return damped_cholesky(matrix, 1e-6)
    return chol, None


# ----------------------------------------------------------------------------------------
# Blocked OBS (SparseGPT) sweep
# ----------------------------------------------------------------------------------------


def obs_prune_block(weight: torch.Tensor, hinv: torch.Tensor, fraction: float,
                    n: int | None = None, m: int | None = None,
                    prune_mask: torch.Tensor | None = None):
    """One block of the OBS sweep.

    ``weight``: rows x B block of columns (float32), ``hinv``: the B x B diagonal block of the
    upper Cholesky factor of H^-1. Chooses the mask from ``w^2 / hinv_jj^2`` (unstructured:
    the ``int(rows*B*fraction)`` lowest over the whole block; N:M: the ``n`` lowest of each
    group of ``m`` within each row, chosen when the sweep reaches the group, i.e. on weights
    already updated by earlier columns), unless ``prune_mask`` is given. Then sweeps the
    columns, zeroing pruned weights and spreading each column's error over the later columns.

    Returns ``(pruned_block, err, loss)``: ``err`` (rows x B) feeds the lazy update of the
    columns right of the block, ``loss`` is sum((w - q)^2 / hinv_jj^2) / 2.
    """
    rows, width = weight.shape
    diag = torch.diagonal(hinv)
    if prune_mask is None:
        if n is None:
            prune_mask = flat_prune_mask(weight ** 2 / diag.unsqueeze(0) ** 2, int(rows * width * fraction))
        else:
            prune_mask = torch.zeros_like(weight, dtype=torch.bool)
    # Work on the transpose so that each column is a contiguous row: the sweep touches one
    # column and a rank-1 update of the columns right of it per step.
    work = weight.t().contiguous()
    mask_t = prune_mask.t().contiguous()
    err = torch.empty_like(work)
    losses = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
    for col in range(width):
        if n is not None and col % m == 0:
            group = work[col:col + m] ** 2 / diag[col:col + m].unsqueeze(1) ** 2
            mask_t[col:col + m] = nm_prune_mask(group.t(), n, m).t()
        w = work[col]
        q = w.masked_fill(mask_t[col], 0)
        col_err = (w - q) / diag[col]
        losses += col_err * col_err
        work[col + 1:].addr_(hinv[col, col + 1:], col_err, alpha=-1)
        work[col] = q
        err[col] = col_err
    return work.t(), err.t(), losses.sum() / 2


def obs_prune(weight: torch.Tensor, hinv_upper: torch.Tensor, fraction: float,
              n: int | None = None, m: int | None = None, blocksize: int = 128, block_fn=None):
    """The whole SparseGPT sweep over column blocks with lazy updates.

    ``block_fn`` is the block operation to use (defaults to :func:`obs_prune_block`); the
    dispatch module passes the fastest available. Returns ``(pruned_weight, loss)``.
    """
    block_fn = block_fn or obs_prune_block
    # float32 at least (half-precision sweeps lose the small updates); float64 stays float64
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32), copy=True)
    cols = weight.shape[1]
    total_loss = weight.new_zeros(())
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        q, err, loss = block_fn(weight[:, start:stop], hinv_upper[start:stop, start:stop], fraction, n, m)
        weight[:, start:stop] = q
        if stop < cols:
            weight[:, stop:] -= err @ hinv_upper[start:stop, stop:]
        total_loss += loss
    return weight, total_loss


# ----------------------------------------------------------------------------------------
# SparseLLM element-wise steps (see sparsellm.methods.sparsellm for the objective)
# ----------------------------------------------------------------------------------------


def relu_z_step(p: torch.Tensor, m: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """argmin_z  alpha (z - m)^2 + gamma (p - relu(z))^2, element-wise.

    On z >= 0 the minimiser is max((alpha m + gamma p) / (alpha + gamma), 0); on z < 0 it is
    min(m, 0). Keep the candidate with the lower objective.
    """
    z_pos = ((alpha * m + gamma * p) / (alpha + gamma)).clamp_min(0)
    z_neg = m.clamp_max(0)
    f_pos = alpha * (z_pos - m) ** 2 + gamma * (p - z_pos) ** 2
    f_neg = alpha * (z_neg - m) ** 2 + gamma * p ** 2
    return torch.where(f_pos <= f_neg, z_pos, z_neg)


def swiglu_z_step(p: torch.Tensor, m: torch.Tensor, s: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """argmin_z  alpha (z - m)^2 + gamma (p - silu(s) z)^2, element-wise (a scalar quadratic)."""
    sig = F.silu(s)
    return (alpha * m + gamma * sig * p) / (alpha + gamma * sig * sig)


def swiglu_s_objective(s, g, p, z, alpha, gamma):
    return alpha * (s - g) ** 2 + gamma * (p - F.silu(s) * z) ** 2


def swiglu_s_step(s: torch.Tensor, g: torch.Tensor, p: torch.Tensor, z: torch.Tensor,
                  alpha: float, gamma: float, iterations: int = 5) -> torch.Tensor:
    """Decrease  alpha (s - g)^2 + gamma (p - silu(s) z)^2  element-wise, starting from ``s``.

    Safeguarded Newton: the curvature is clamped from below at ``2 alpha`` (the convex part),
    and a step is taken only where it lowers the objective (else halved once, else skipped),
    so the objective never increases.
    """
    f = swiglu_s_objective(s, g, p, z, alpha, gamma)
    for _ in range(iterations):
        sig = torch.sigmoid(s)
        act = s * sig
        d_act = sig * (1 + s * (1 - sig))
        dd_act = sig * (1 - sig) * (2 + s * (1 - 2 * sig))
        resid = p - act * z
        grad = 2 * alpha * (s - g) - 2 * gamma * z * d_act * resid
        curv = 2 * alpha + 2 * gamma * ((z * d_act) ** 2 - z * dd_act * resid)
        step = grad / curv.clamp_min(2 * alpha)
        start = s
        for scale in (1.0, 0.5):
            cand = start - scale * step
            f_cand = swiglu_s_objective(cand, g, p, z, alpha, gamma)
            better = f_cand < f
            s = torch.where(better, cand, s)
            f = torch.where(better, f_cand, f)
    return s
