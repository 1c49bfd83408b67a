"""Plain-PyTorch reference implementations of the hot operations.

These are the specification and the test oracle of every fast path (Triton kernels in
``kernels/``, the CUDA extension in ``csrc/``). Methods never call them directly: they go
through :mod:`sparsellm.ops`, which picks a backend.

Mask convention: a boolean ``prune_mask`` is True where a weight is removed.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .precision import solve_dtype
from .sparsity import pruned_count

# ----------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------

# The masks take the k lowest scores with ``topk(..., sorted=False)``: only the set matters (it
# feeds a scatter), and it is the same set as a sorted topk's, without the sort of k values
# (measured 4x faster for 70% of a 1536 x 128 OBS block, the CPU sweep's mask).


def nm_prune_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest-scoring entries of every ``m`` consecutive entries of each row."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    drop = torch.topk(groups, n, dim=-1, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def row_prune_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the ``k`` lowest-scoring entries of each row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        drop = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, drop, True)
    return mask


def flat_prune_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the ``k`` lowest-scoring entries of the whole tensor."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten(), k, largest=False, sorted=False).indices] = True
    return mask.reshape(score.shape)


def wanda_prune_mask(weight: torch.Tensor, in_norm: torch.Tensor, fraction: float,
                     n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Wanda: score |W_ij| * ||X_j||, compared within each output row (or N:M group)."""
    dtype = solve_dtype(torch.promote_types(weight.dtype, in_norm.dtype))  # float32, float64 for float64
    score = weight.abs().to(dtype) * in_norm.to(dtype).unsqueeze(0)
    if n is not None:
        return nm_prune_mask(score, n, m)
    return row_prune_mask(score, pruned_count(weight.shape[1], fraction))


# ----------------------------------------------------------------------------------------
# Cholesky factorisations and solves
# ----------------------------------------------------------------------------------------


class NotPositiveDefinite(RuntimeError):
    pass


def check_percdamp(percdamp: float) -> None:
    """The dampening of :func:`damped_cholesky` must be positive (and finite): its retries raise
    it tenfold, which from 0 would retry the same failing factorisation."""
    if not 0 < float(percdamp) < float("inf"):
        raise ValueError(f"percdamp must be positive and finite, got {percdamp!r}")


def damped_cholesky(gram: torch.Tensor, percdamp: float, max_tries: int = 6):
    """Lower Cholesky factor of ``G + lambda I`` with ``lambda = percdamp * mean(diag G)``.

    Works on one matrix or a batch ``[..., n, n]``. When a factorisation fails the dampening
    of that matrix alone is raised tenfold and retried. Returns ``(L, percdamp_used)`` where
    ``percdamp_used`` has the batch shape. ``gram`` is not modified. ``percdamp`` > 0
    (:func:`check_percdamp`).
    """
    check_percdamp(percdamp)
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
    if chol.dim() == 2:
        inverse = torch.cholesky_inverse(chol)
    elif chol.numel() == 0:  # no matrices, or 0 x 0 ones: nothing to invert (stack and reshape(-1) refuse them)
        inverse = chol.clone()
    else:
        inverse = torch.stack([torch.cholesky_inverse(c) for c in chol.flatten(0, -3)]).reshape(chol.shape)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if (info != 0).any():
        # the inverse of an ill-conditioned float32 Gram can round to indefinite; its factor
        # in float64 exists wherever the first factorisation did
        upper = torch.linalg.cholesky(inverse.double(), upper=True).to(inverse.dtype)
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


def obs_unstructured_mask(weight: torch.Tensor, diag: torch.Tensor, fraction: float) -> torch.Tensor:
    """The mask of an unstructured OBS block: its :func:`pruned_count` ``(numel, fraction)`` lowest scores
    ``w^2 / hinv_jj^2`` (``diag``: the block's diagonal of the H^-1 factor)."""
    return flat_prune_mask(weight ** 2 / diag.unsqueeze(0) ** 2, pruned_count(weight.numel(), fraction))


def check_nm_width(width: int, n: int | None, m: int | None, what: str = "block") -> None:
    """An N:M sweep groups each row's columns from the block's first: a width that is not a
    multiple of ``m`` would leave a ragged group (and a blocked sweep restarts the grouping at
    every block)."""
    if n is not None and width % m:
        raise ValueError(f"{n}:{m} pruning needs a {what} width that is a multiple of {m}, got {width}")


def obs_prune_block(weight: torch.Tensor, hinv: torch.Tensor, fraction: float,
                    n: int | None = None, m: int | None = None,
                    prune_mask: torch.Tensor | None = None):
    """One block of the OBS sweep.

    ``weight``: rows x B block of columns (float32), ``hinv``: the B x B diagonal block of the
    upper Cholesky factor of H^-1. Chooses the mask from ``w^2 / hinv_jj^2`` (unstructured:
    the ``pruned_count(rows*B, fraction)`` lowest over the whole block; N:M: the ``n`` lowest of each
    group of ``m`` within each row, chosen when the sweep reaches the group, i.e. on weights
    already updated by earlier columns), unless ``prune_mask`` is given. Then sweeps the
    columns, zeroing pruned weights and spreading each column's error over the later columns.

    Returns ``(pruned_block, err, loss)``: ``err`` (rows x B) feeds the lazy update of the
    columns right of the block, ``loss`` is sum((w - q)^2 / hinv_jj^2) / 2.
    """
    rows, width = weight.shape
    diag = torch.diagonal(hinv)
    choose_nm = prune_mask is None and n is not None  # a given mask is used as it is
    if choose_nm:
        check_nm_width(width, n, m)
    if prune_mask is None:
        if n is None:
            prune_mask = obs_unstructured_mask(weight, diag, fraction)
        else:
            prune_mask = torch.zeros_like(weight, dtype=torch.bool)
    # Work on the transpose so that each column is a contiguous row: the sweep touches one
    # column and a rank-1 update of the columns right of it per step. clone, not contiguous:
    # a one-row or column-major weight is already contiguous as its transpose, and the sweep
    # must not write into the caller's tensors.
    work = weight.t().clone(memory_format=torch.contiguous_format)
    mask_t = prune_mask.expand(rows, width).t().clone(memory_format=torch.contiguous_format)
    err = torch.empty_like(work)
    losses = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
    for col in range(width):
        if choose_nm and col % m == 0:
            group = work[col:col + m] ** 2 / diag[col:col + m].unsqueeze(1) ** 2
            mask_t[col:col + m] = nm_prune_mask(group.t(), n, m).t()
        w = work[col]
        q = w.masked_fill(mask_t[col], 0)
        col_err = (w - q) / diag[col]
        losses += col_err * col_err
        # addmm_ with an inner dimension of 1, not addr_: the same rank-1 update, but torch's
        # CPU addr_ is an unvectorised loop (measured 50x slower on a 1536 x 128 block).
        work[col + 1:].addmm_(hinv[col, col + 1:, None], col_err[None], alpha=-1)
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
    check_nm_width(weight.shape[1], n, m, "weight")
    check_nm_width(blocksize, n, m, "blocksize (columns per block)")
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


# Element-wise steps on CPU tensors run over flat blocks of this many elements: a block's dozen
# temporaries (1 MB each) stay in cache and in the allocator's free lists, where full-size
# ones go to DRAM and to fresh pages each time (measured: the s-step about 2x faster on a
# 5461 x 1536 chunk of SmolLM2). On CUDA the whole tensor is one block (one launch per op).
ELEMENTWISE_BLOCK = 1 << 18


def promoted_dtype(tensors) -> torch.dtype:
    """The tensors' dtypes promoted, a 0-d tensor's included (torch.result_type would let a 0-d
    float32 input leave a float16 result)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def promoted(tensors) -> tuple[torch.dtype, tuple]:
    """The tensors' promoted dtype, and the tensors in it (no copy where one has it already):
    the element-wise steps compute mixed inputs in it throughout, as the kernels do."""
    dtype = promoted_dtype(tensors)
    return dtype, tuple(t.to(dtype) for t in tensors)


def _blockwise(fn, *tensors):
    """``fn(*tensors)`` for an element-wise ``fn`` of same-shape tensors, computed block by
    block on CPU (see ELEMENTWISE_BLOCK); the result is the same, element for element.

    float16 and bfloat16 inputs are computed in float32 and rounded once, at the end (as the
    Triton kernels do in their float32 registers): the scale-aware penalties (1e-9 and below
    at the default model) are zero in float16, and the objectives' squares overflow it. Mixed
    inputs are all cast to their promoted dtype first, so that every operation runs in it, as in
    the kernels (eager promotion goes op by op: silu of a float16 s would round to float16)."""
    dtype, tensors = promoted(tensors)
    if dtype in (torch.float16, torch.bfloat16):
        return _blockwise(fn, *(t.float() for t in tensors)).to(dtype)
    first = tensors[0]
    if (first.device.type != "cpu" or first.numel() <= ELEMENTWISE_BLOCK
            or any(t.shape != first.shape for t in tensors[1:])):
        return fn(*tensors)  # broadcasting as in eager: not flattened blocks
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty(first.numel(), dtype=first.dtype)
    for start in range(0, first.numel(), ELEMENTWISE_BLOCK):
        part = slice(start, start + ELEMENTWISE_BLOCK)
        out[part] = fn(*(f[part] for f in flats))
    return out.reshape(first.shape)


def relu_z_step(p: torch.Tensor, m: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """argmin_z  alpha (z - m)^2 + gamma (p - relu(z))^2, element-wise.

    On z >= 0 the minimiser is max((alpha m + gamma p) / (alpha + gamma), 0); on z < 0 it is
    min(m, 0). Keep the candidate with the lower objective.
    """
    return _blockwise(lambda p, m: _relu_z(p, m, alpha, gamma), p, m)


def _relu_z(p, m, alpha, gamma):
    z_pos = ((alpha * m + gamma * p) / (alpha + gamma)).clamp_min(0)
    z_neg = m.clamp_max(0)
    f_pos = alpha * (z_pos - m) ** 2 + gamma * (p - z_pos) ** 2
    f_neg = alpha * (z_neg - m) ** 2 + gamma * p ** 2
    return torch.where(f_pos <= f_neg, z_pos, z_neg)


def swiglu_z_step(p: torch.Tensor, m: torch.Tensor, s: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """argmin_z  alpha (z - m)^2 + gamma (p - silu(s) z)^2, element-wise (a scalar quadratic)."""
    return _blockwise(lambda p, m, s: _swiglu_z(p, m, s, alpha, gamma), p, m, s)


def _swiglu_z(p, m, s, alpha, gamma):
    sig = F.silu(s)
    return (alpha * m + gamma * sig * p) / (alpha + gamma * sig * sig)


def swiglu_s_objective(s, g, p, z, alpha, gamma):
    return alpha * (s - g) ** 2 + gamma * (p - F.silu(s) * z) ** 2


def swiglu_s_step(s: torch.Tensor, g: torch.Tensor, p: torch.Tensor, z: torch.Tensor,
                  alpha: float, gamma: float, iterations: int = 5) -> torch.Tensor:
    """Decrease  alpha (s - g)^2 + gamma (p - silu(s) z)^2  element-wise, starting from ``s``.

    Safeguarded Newton: the curvature is clamped from below at ``2 alpha`` (the convex part);
    the full step and the half step from the same start are tried, and the one with the lower
    objective is taken where it lowers the objective (neither elsewhere), so the objective never
    increases. (The half step wins also where the full one would lower it: about 8% of random
    elements in one iteration.)
    """
    return _blockwise(lambda s, g, p, z: _swiglu_s(s, g, p, z, alpha, gamma, iterations), s, g, p, z)


def _swiglu_s(s, g, p, z, alpha, gamma, iterations):
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


def sq_norm(t: torch.Tensor) -> torch.Tensor:
    """||t||^2, a float64 scalar on t's device. Summed in float32: torch's sum reduces pairwise,
    about 1e-7 relative at SparseLLM's chunk sizes (checked against float64), about ten times
    cheaper than a float64 copy of the buffer; widened so that the sums over token chunks add in
    float64. It stays on the device: reading it on the host would wait for the GPU once per
    chunk and term."""
    return t.square().sum().double()


# SparseLLM's auxiliary update of one token chunk, after the p-step: the z-step (and for SwiGLU
# the s-step from the previous s with the new z), both relaxed, z_old + omega (z - z_old), and
# the squared norms of the objective's terms at the result. One operation so that a backend can
# fuse it (the inductor backend compiles _relu_aux / _swiglu_aux into one pass over memory).
# The _..._terms functions are the end of it, with float32 sums; ``relax`` is omega != 1.

def _relax(new, old, omega, relax: bool):
    return torch.lerp(old, new, omega) if relax else new


def _relu_terms(z, z_old, m, p, omega, relax: bool):
    z = _relax(z, z_old, omega, relax)
    return z, (m - z).square().sum(), (torch.relu(z) - p).square().sum()


def _swiglu_terms(z, s, z_old, s_old, m, g, p, omega, relax: bool):
    z, s = _relax(z, z_old, omega, relax), _relax(s, s_old, omega, relax)
    return z, s, (g - s).square().sum(), (m - z).square().sum(), (F.silu(s) * z - p).square().sum()


def _relu_aux(p, m, z_old, alpha, gamma, omega, relax: bool):
    return _relu_terms(_relu_z(p, m, alpha, gamma), z_old, m, p, omega, relax)


def _swiglu_aux(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, iterations: int, relax: bool):
    z = _swiglu_z(p, m, s_old, alpha_z, gamma)
    return _swiglu_terms(z, _swiglu_s(s_old, g, p, z, alpha_s, gamma, iterations), z_old, s_old, m, g, p, omega, relax)


def widen_sums(result: tuple, sums: int) -> tuple:
    """An auxiliary update's result with its last ``sums`` entries, float32 sums, widened to
    float64 0-d tensors (as :func:`sq_norm`)."""
    return (*result[:-sums], *(t.double() for t in result[-sums:]))


def relu_relax_and_measure(z, z_old, m, p, omega):
    """The end of the ReLU auxiliary update, from the z-step's result ``z``."""
    return widen_sums(_relu_terms(z, z_old, m, p, omega, omega != 1), 2)


def swiglu_relax_and_measure(z, s, z_old, s_old, m, g, p, omega):
    """The end of the SwiGLU auxiliary update, from the z- and s-steps' results ``z``, ``s``."""
    return widen_sums(_swiglu_terms(z, s, z_old, s_old, m, g, p, omega, omega != 1), 3)


def relu_aux_update(p, m, z_old, alpha, gamma, omega):
    """SparseLLM's ReLU auxiliary update of a token chunk: z (:func:`relu_z_step`) relaxed from
    ``z_old`` by ``omega``, ``(z, ||m - z||^2, ||relu(z) - p||^2)``, the norms float64 0-d tensors
    (as :func:`sq_norm`)."""
    return relu_relax_and_measure(relu_z_step(p, m, alpha, gamma), z_old, m, p, omega)


def swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, iterations=2):
    """SparseLLM's SwiGLU auxiliary update of a token chunk: z with the previous s
    (:func:`swiglu_z_step`), s from ``s_old`` with the new z (:func:`swiglu_s_step`,
    ``iterations`` Newton steps), both relaxed by ``omega``, ``(z, s, ||g - s||^2, ||m - z||^2,
    ||silu(s) z - p||^2)``, the norms float64 0-d tensors (as :func:`sq_norm`)."""
    z = swiglu_z_step(p, m, s_old, alpha_z, gamma)
    s = swiglu_s_step(s_old, g, p, z, alpha_s, gamma, iterations)
    return swiglu_relax_and_measure(z, s, z_old, s_old, m, g, p, omega)


# ----------------------------------------------------------------------------------------
# Sparse inference formats for the GPU decode kernels (kernels/sparse_matmul.py): packing,
# unpacking and the products. The packed layouts are specified here.
# ----------------------------------------------------------------------------------------

NM24_GROUPS_PER_WORD = 8  # 4-bit codes per int32 meta word
NM24_K_MULTIPLE = 32      # in_features must be a multiple: whole meta words per row


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half types; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def nm24_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack W [N, K] holding at most 2 non-zeros per group of 4 consecutive inputs (2:4, 3:4)
    into ``values`` [N, K/2] (W's dtype: the two kept entries of each group in position order;
    a group with fewer non-zeros is padded with zero values at unused positions) and ``meta``
    int32 [N, K/32] (per group a 4-bit code, first position in bits 0-1, second in bits 2-3;
    group g of a word in bits 4g..4g+3). Needs K % 32 == 0."""
    if weight.dim() != 2:
        raise ValueError(f"nm24_pack needs a 2-D weight, got {weight.dim()}-D")
    rows, cols = weight.shape
    if cols % NM24_K_MULTIPLE:
        raise ValueError(f"nm24 needs in_features % {NM24_K_MULTIPLE} == 0, got {cols}")
    groups = weight.detach().reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    if int((nonzero.sum(-1) > 2).sum()):
        raise ValueError("weight is not 2:4 sparse: some group of 4 inputs holds more than 2 non-zeros")
    # non-zeros first, then zeros, each by position; keep the first two, back in position order
    lane = torch.arange(4, device=weight.device)
    key = (~nonzero).to(torch.int64) * 4 + lane
    keep = key.argsort(-1)[..., :2].sort(-1).values  # [N, K/4, 2] distinct positions
    values = groups.gather(-1, keep).reshape(rows, cols // 2).contiguous()
    code = (keep[..., 0] | (keep[..., 1] << 2)).reshape(rows, cols // 32, NM24_GROUPS_PER_WORD)
    shifts = torch.arange(NM24_GROUPS_PER_WORD, device=weight.device) * 4
    words = (code << shifts).sum(-1)  # < 2**32 in int64
    meta = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return values, meta


def nm24_positions(meta: torch.Tensor) -> torch.Tensor:
    """[N, K/2] input position (0..3 inside its group) of each value slot."""
    words = meta.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(16, device=meta.device) * 2  # 16 value slots per word
    return ((words.unsqueeze(-1) >> shifts) & 3).reshape(meta.shape[0], -1)


def nm24_unpack(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense W [N, in_features] of a :func:`nm24_pack` pair."""
    rows = values.shape[0]
    if values.shape != (rows, in_features // 2) or meta.shape != (rows, in_features // 32):
        raise ValueError(f"packed shapes {tuple(values.shape)}, {tuple(meta.shape)} do not fit {rows}x{in_features}")
    pos = nm24_positions(meta)
    col = torch.arange(in_features // 2, device=values.device) // 2 * 4 + pos
    dense = torch.zeros(rows, in_features, dtype=values.dtype, device=values.device)
    # scatter_add: a zero pad at a position never holds a kept value (positions are distinct)
    return dense.scatter_add_(1, col, values)


def nm24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for W = :func:`nm24_unpack`, accumulated in fp32 (float64 inputs in
    float64), returned in x's dtype."""
    ct = _compute_dtype(x.dtype)
    w = nm24_unpack(values, meta, in_features).to(ct)
    return F.linear(x.to(ct), w, None if bias is None else bias.to(ct)).to(x.dtype)


def sell_pack(weight: torch.Tensor, slice_rows: int = 32, slot_block: int = 8
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sliced ELLPACK of W [N, K]: rows in slices of ``slice_rows`` (the last one padded with
    empty rows); each slice is padded to its longest row, rounded up to ``slot_block`` slots,
    and stored slot-major (value of row r, slot j at ``slice_ptr[s] + j * slice_rows + r``).
    A row keeps its non-zeros in column order; pads are value 0 at column 0. Returns
    ``values`` (W's dtype), ``cols`` int16 (column c stored as c - 65536 when c >= 32768; read
    ``& 0xFFFF``; K <= 65536) and ``slice_ptr`` int64 [n_slices + 1] (element offsets)."""
    if weight.dim() != 2:
        raise ValueError(f"sell_pack needs a 2-D weight, got {weight.dim()}-D")
    if slice_rows < 1 or slot_block < 1:
        raise ValueError("slice_rows and slot_block must be positive")
    rows, cols = weight.shape
    if cols > 65536:
        raise ValueError(f"sell stores int16 column indices: in_features {cols} > 65536")
    dev = weight.device
    w = weight.detach()
    nonzero = w != 0
    counts = nonzero.sum(1)
    n_slices = -(-rows // slice_rows)
    pad_rows = n_slices * slice_rows - rows
    counts_p = torch.cat([counts, counts.new_zeros(pad_rows)]).reshape(n_slices, slice_rows)
    widths = -(-counts_p.max(1).values // slot_block) * slot_block  # [n_slices]
    max_w = int(widths.max().item()) if n_slices else 0
    order = (~nonzero).to(torch.int8).argsort(dim=1, stable=True)[:, :max_w]  # non-zero columns first, in order
    if max_w > cols:  # rounding up to the slot block can pass the row length: the extra slots are pads
        order = torch.cat([order, order.new_zeros(rows, max_w - cols)], 1)
    vals = w.gather(1, order)
    slot = torch.arange(max_w, device=dev)
    live = slot < counts.unsqueeze(1)
    vals = torch.where(live, vals, torch.zeros((), dtype=w.dtype, device=dev))
    idx = torch.where(live, order, torch.zeros((), dtype=order.dtype, device=dev))
    vals = torch.cat([vals, vals.new_zeros(pad_rows, max_w)]).reshape(n_slices, slice_rows, max_w).transpose(1, 2)
    idx = torch.cat([idx, idx.new_zeros(pad_rows, max_w)]).reshape(n_slices, slice_rows, max_w).transpose(1, 2)
    keep = (slot.reshape(1, max_w, 1) < widths.reshape(n_slices, 1, 1)).expand(n_slices, max_w, slice_rows)
    values = vals[keep].contiguous()
    idx = idx[keep]
    col16 = torch.where(idx >= 32768, idx - 65536, idx).to(torch.int16)
    slice_ptr = torch.zeros(n_slices + 1, dtype=torch.int64, device=dev)
    slice_ptr[1:] = (widths * slice_rows).cumsum(0)
    return values, col16, slice_ptr


def sell_unpack(values: torch.Tensor, cols: torch.Tensor, slice_ptr: torch.Tensor, out_features: int,
                in_features: int, slice_rows: int) -> torch.Tensor:
    """The dense W [out_features, in_features] of a :func:`sell_pack` triple."""
    n_slices = slice_ptr.numel() - 1
    if n_slices != -(-out_features // slice_rows) or values.numel() != int(slice_ptr[-1]) or cols.shape != values.shape:
        raise ValueError("sell arrays do not fit the given shape")
    dev = values.device
    sizes = slice_ptr[1:] - slice_ptr[:-1]
    which = torch.repeat_interleave(torch.arange(n_slices, device=dev), sizes)
    offset = torch.arange(values.numel(), device=dev) - slice_ptr[:-1][which]
    row = which * slice_rows + offset % slice_rows
    col = cols.to(torch.int64) & 0xFFFF
    live = row < out_features
    dense = torch.zeros(out_features, in_features, dtype=values.dtype, device=dev)
    return dense.index_put_((row[live], col[live]), values[live], accumulate=True)


def sell_linear(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, slice_ptr: torch.Tensor,
                out_features: int, in_features: int, slice_rows: int, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """y = x @ W^T (+ bias) for W = :func:`sell_unpack`, accumulated in fp32 (float64 inputs in
    float64), returned in x's dtype."""
    ct = _compute_dtype(x.dtype)
    w = sell_unpack(values, cols, slice_ptr, out_features, in_features, slice_rows).to(ct)
    return F.linear(x.to(ct), w, None if bias is None else bias.to(ct)).to(x.dtype)
