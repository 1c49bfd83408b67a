"""Triton kernels against the reference (sparsellm.reference is the oracle).

On a machine without CUDA these run on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before anything imports the kernels); shapes are kept small for it, and
include sizes that are not multiples of any tile. bfloat16 is only tested on a GPU (the
interpreter's numpy has no faithful bfloat16).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from sparsellm import ops, reference
from kernel_checks import (NM_PATTERNS, check_nm, check_selection, gram_matrix, hinv_factor, rand,
                           reconstruction_error)

triton = pytest.importorskip("triton")
# not importorskip: with triton installed, a backend that fails to import (a kernel module's
# broken import) must fail here, not skip every kernel test
import sparsellm._triton_backend as K  # noqa: E402  (registers the kernels with ops)
from sparsellm.kernels import _common, cholesky, nm_mask, obs_block, row_select, sparsellm_steps  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = [torch.float32, torch.float16]


# ---------------------------------------------------------------- N:M masks (c)

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,m", NM_PATTERNS)
@pytest.mark.parametrize("rows", [5, 33])
def test_nm_mask_raw_matches_reference(rows, n, m, dtype):
    score = rand(rows * 10 + m, rows, 48, dtype=dtype, device=DEV)
    mask = nm_mask.nm_prune_mask(score, n, m)
    ref = reference.nm_prune_mask(score.float(), n, m)
    assert check_nm(mask, ref, score.float(), n, m) > 0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 16), (2, 3)])
def test_nm_mask_fused_scores(n, m, dtype):
    w = rand(1, 9, 96, dtype=dtype, device=DEV)
    aux = rand(2, 96, device=DEV).abs() + 0.1
    score = w.abs().float() * aux
    mask = nm_mask.nm_mask(w, aux, n, m, _common.SCORE_WANDA)
    assert check_nm(mask, reference.nm_prune_mask(score, n, m), score, n, m) > 0


def test_nm_mask_ties_prune_exactly_n():
    score = torch.randint(0, 3, (12, 64), generator=torch.Generator().manual_seed(3)).float().to(DEV)
    for n, m in ((2, 4), (4, 8), (3, 16)):
        mask = nm_mask.nm_prune_mask(score, n, m)
        check_nm(mask, reference.nm_prune_mask(score, n, m), score, n, m)


def test_nm_mask_float64_and_wide_m_and_errors():
    # float64 scores are compared in float64: values 1 ulp(fp32) apart still order correctly
    base = torch.full((2, 8), 1.0, dtype=torch.float64)
    base[:, ::2] += 1e-12
    mask = nm_mask.nm_prune_mask(base.to(DEV), 2, 4)
    assert torch.equal(mask.cpu(), reference.nm_prune_mask(base, 2, 4))
    # m > 16 is declined (ops then runs the next backend: see test_ops_dispatch.py)
    s = rand(5, 3, 64, device=DEV)
    with pytest.raises(ops.Decline, match="m=32 > 16"):
        nm_mask.nm_prune_mask(s, 7, 32)
    with pytest.raises(ValueError):
        nm_mask.nm_prune_mask(s[:, :30], 2, 4)


# ---------------------------------------------------------------- per-row selection (d)

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows,cols", [(5, 37), (3, 128), (4, 300)])  # 300: several tiles per row
def test_row_prune_mask_matches_reference(rows, cols, dtype):
    score = rand(cols, rows, cols, dtype=dtype, device=DEV)
    checked = 0
    for k in (0, 1, cols // 3, cols - 1, cols):
        mask = row_select.row_prune_mask(score, k)
        checked += check_selection(mask, reference.row_prune_mask(score.float(), k), score.float(), k)
    assert checked > 0


def test_row_prune_mask_signs_zeros_infinities():
    x = torch.tensor([[-0.0, 0.0, -1.0, 2.0, -3.0, float("inf"), -float("inf"), 1e-30, -1e-30, 5.0]])
    for k in range(11):
        mask = row_select.row_prune_mask(x.to(DEV), k).cpu()
        check_selection(mask, reference.row_prune_mask(x, k), x, k)
    with pytest.raises(ValueError):
        row_select.row_prune_mask(x.to(DEV), 11)



def test_nan_scores_rank_above_every_number_as_in_the_reference():
    """torch.topk (the reference) orders NaN above +inf, whatever its sign bit (0 * inf sets it
    on x86): a NaN is pruned last, and a 2:4 group keeps losing exactly 2 entries. Before, the
    N:M kernels ranked a NaN first (a group lost 3) and the row selection pruned a sign-bit NaN
    first."""
    negative_nan = torch.tensor([-4194304], dtype=torch.int32).view(torch.float32)  # 0xFFC00000
    assert torch.isnan(negative_nan) and negative_nan.view(torch.int32) < 0
    score = rand(40, 6, 16)
    score[0, 1] = float("nan")
    score[2, 5] = negative_nan
    score[3, 12] = float("inf")
    score[3, 14] = float("nan")
    mask = nm_mask.nm_prune_mask(score.to(DEV), 2, 4).cpu()
    assert torch.equal(mask, reference.nm_prune_mask(score, 2, 4))
    assert (mask.reshape(6, 4, 4).sum(-1) == 2).all()
    rows = row_select.row_prune_mask(score.to(DEV), 7).cpu()
    assert torch.equal(rows, reference.row_prune_mask(score, 7))
    assert not rows[0, 1] and not rows[2, 5] and not rows[3, 14]
    # Wanda: a zero weight times an infinite input norm (a float16 overflow) scores NaN
    weight = rand(41, 6, 16)
    weight[:, 0] = 0.0
    norm = rand(42, 16).abs()
    norm[0] = float("inf")
    wanda = nm_mask.nm_mask(weight.to(DEV), norm.to(DEV), 2, 4, _common.SCORE_WANDA).cpu()
    assert torch.equal(wanda, reference.wanda_prune_mask(weight, norm, 0.5, 2, 4))
    assert (wanda.reshape(6, 4, 4).sum(-1) == 2).all() and not wanda[:, 0].any()

@pytest.mark.parametrize("cols", [40, 260])
def test_row_prune_mask_ties(cols):
    x = torch.randint(-3, 3, (6, cols), generator=torch.Generator().manual_seed(1)).float().to(DEV)
    mask = row_select.row_prune_mask(x, cols // 2)
    check_selection(mask, reference.row_prune_mask(x, cols // 2), x, cols // 2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows,cols", [(5, 37), (8, 256), (2, 300)])
@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_wanda_unstructured_fused(rows, cols, fraction, dtype):
    w = rand(7, rows, cols, dtype=dtype, device=DEV)
    norm = rand(8, cols, device=DEV).abs() + 0.05
    mask = K.wanda_prune_mask(w, norm, fraction)
    score = w.abs().float() * norm
    k = int(cols * fraction)
    assert check_selection(mask, reference.wanda_prune_mask(w, norm, fraction), score, k) > 0


def test_wanda_nm_fused():
    w = rand(9, 6, 48, dtype=torch.float16, device=DEV)
    norm = rand(10, 48, dtype=torch.float16, device=DEV).abs() + 0.05
    for n, m in NM_PATTERNS:
        mask = K.wanda_prune_mask(w, norm, 0.5, n, m)
        score = w.abs().float() * norm.float()
        assert check_nm(mask, reference.wanda_prune_mask(w, norm, 0.5, n, m), score, n, m) > 0


def test_wanda_norm_of_the_wrong_length_is_an_error():
    """The kernels read one norm per column: a shorter one was read past its end (silently a
    mask), where the reference refuses it."""
    w = rand(15, 4, 16, device=DEV)
    for norm in (rand(16, 12, device=DEV).abs() + 0.5, rand(17, 20, device=DEV).abs() + 0.5):
        for n, m in ((None, None), (2, 4)):
            with pytest.raises(RuntimeError):
                reference.wanda_prune_mask(w, norm, 0.5, n, m)
            with pytest.raises(ValueError, match="per-column"):
                K.wanda_prune_mask(w, norm, 0.5, n, m)


@pytest.mark.parametrize("n,m,fraction", [(None, None, 15 / 32), (1, 2, 0.5)])
def test_float64_wanda_is_scored_in_float64(n, m, fraction):
    """The fused Wanda score is fp32: a float64 call is declined, so ops runs the reference,
    which orders scores that fp32 rounds to one value. Here each pair of columns shares its
    norm and differs by 1e-12 relative, the larger first: in fp32 the pair ties, and the
    index-order tie break would prune the larger."""
    g = torch.Generator().manual_seed(21)
    w = torch.randn(4, 16, generator=g, dtype=torch.float64).repeat_interleave(2, dim=1)
    w[:, 0::2] *= 1 + 1e-12
    norm = (torch.rand(16, generator=g, dtype=torch.float64) + 0.5).repeat_interleave(2)
    w, norm = w.to(DEV), norm.to(DEV)
    with pytest.raises(ops.Decline, match="float64"):
        K.wanda_prune_mask(w, norm, fraction, n, m)
    with pytest.raises(ops.Decline, match="float64"):  # a float64 norm alone is scored in float64 too
        K.wanda_prune_mask(w.float(), norm, fraction, n, m)
    ops.reset_usage()
    with ops.backend_scope("triton"):
        mask = ops.wanda_prune_mask(w, norm, fraction, n, m)
    assert ops.usage()["wanda_prune_mask"] == {"reference": 1}
    ref = reference.wanda_prune_mask(w, norm, fraction, n, m)
    assert torch.equal(mask, ref)
    # the larger of a pair is never pruned while the smaller is kept
    assert ref.any() and not (ref[:, 0::2] & ~ref[:, 1::2]).any()

# ---------------------------------------------------------------- OBS block sweep (a)

OBS_CASES = [(7, 16, None, None), (33, 40, None, None), (5, 64, None, None), (7, 16, 2, 4), (33, 40, 2, 4),
             (33, 40, 3, 4), (5, 64, 4, 8), (5, 64, 1, 16), (9, 48, 2, 3)]


@pytest.mark.parametrize("rows,width,n,m", OBS_CASES)
def test_obs_block_matches_reference_fp32(rows, width, n, m):
    hinv = hinv_factor(width, DEV, seed=width)
    w = rand(rows + width, rows, width, device=DEV)
    q, err, loss = obs_block.obs_prune_block(w, hinv, 0.5, n, m)
    qr, errr, lossr = reference.obs_prune_block(w, hinv, 0.5, n, m)
    assert torch.equal(q == 0, qr == 0)  # same mask (random data: no ties)
    assert (q == 0).any() and (q != 0).any()
    scale = w.abs().max()
    torch.testing.assert_close(q, qr, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(err, errr, rtol=1e-5, atol=1e-5 * errr.abs().max())
    torch.testing.assert_close(loss, lossr, rtol=1e-5, atol=0)
    assert loss > 0


def test_obs_block_given_mask_and_fp16():
    rows, width = 11, 24
    hinv = hinv_factor(width, DEV, seed=5)
    w = rand(4, rows, width, device=DEV)
    given = rand(6, rows, width, device=DEV) > 0.3
    q, err, loss = obs_block.obs_prune_block(w, hinv, 0.5, prune_mask=given)
    qr, errr, lossr = reference.obs_prune_block(w, hinv, 0.5, prune_mask=given)
    assert torch.equal(q == 0, given | (qr == 0))
    torch.testing.assert_close(q, qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, lossr, rtol=1e-5, atol=0)
    # fp16 weights: the sweep runs in fp32 and rounds once at the end
    w16 = w.half()
    q16, _, loss16 = obs_block.obs_prune_block(w16, hinv, 0.5, 2, 4)
    qr32, _, lossr32 = reference.obs_prune_block(w16.float(), hinv, 0.5, 2, 4)
    assert q16.dtype == torch.float16
    torch.testing.assert_close(q16, qr32.half(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(loss16.float(), lossr32, rtol=1e-3, atol=0)


def test_obs_block_nm_width_not_a_multiple_of_m_is_an_error():
    """An N:M block whose width m does not divide: the reference and the CUDA sweep refuse it.
    The kernel ranked the ragged last group with the zero pad lanes past the block, which took
    the pruned places: 2:4 on 6 columns pruned nothing in columns 4 and 5."""
    w = rand(24, 3, 6, device=DEV)
    hinv = hinv_factor(6, DEV, seed=25)
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        reference.obs_prune_block(w, hinv, 0.5, 2, 4)
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        obs_block.obs_prune_block(w, hinv, 0.5, 2, 4)
    given = rand(26, 3, 6, device=DEV) > 0  # a given mask has no groups: any width
    q, _, _ = obs_block.obs_prune_block(w, hinv, 0.5, 2, 4, prune_mask=given)
    torch.testing.assert_close(q, reference.obs_prune_block(w, hinv, 0.5, 2, 4, prune_mask=given)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,m", [(None, None), (2, 4)])
def test_obs_block_non_finite_weight_leaves_earlier_columns_alone(n, m):
    """A NaN or inf weight makes its column's error non-finite; the reference (and the CUDA
    sweep) spread it over the later columns only. The kernel multiplied it by the zero h_row
    entries of the finished columns too, and 0 * inf = NaN overwrote them. (In the last group
    of 4: a group of NaN scores is a tie, which topk breaks in no specified order.)"""
    rows, width = 6, 16
    hinv = hinv_factor(width, DEV, seed=22)
    w = rand(23, rows, width, device=DEV)
    w[1, 13] = float("nan")
    w[4, 14] = float("inf")
    q, err, _ = obs_block.obs_prune_block(w, hinv, 0.5, n, m)
    qr, errr, _ = reference.obs_prune_block(w.cpu(), hinv.cpu(), 0.5, n, m)
    assert torch.isfinite(qr[1, :13]).all() and torch.isfinite(qr[4, :14]).all() and qr[1, 13].isnan()
    torch.testing.assert_close(q.cpu(), qr, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(err.cpu(), errr, rtol=1e-5, atol=1e-5 * errr[torch.isfinite(errr)].abs().max(),
                               equal_nan=True)


def test_obs_block_broadcast_mask():
    """A one-row mask applies to every row, as in the reference (the kernel reads the mask
    with its row stride: the mask is expanded first, not read past its one row)."""
    rows, width = 9, 24
    hinv = hinv_factor(width, DEV, seed=12)
    w = rand(13, rows, width, device=DEV)
    given = rand(14, 1, width, device=DEV) > 0
    q, err, loss = obs_block.obs_prune_block(w, hinv, 0.5, prune_mask=given)
    qr, errr, lossr = reference.obs_prune_block(w, hinv, 0.5, prune_mask=given)
    assert given.any() and not given.all() and (q[:, given[0]] == 0).all()
    torch.testing.assert_close(q, qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(err, errr, rtol=1e-5, atol=1e-5 * errr.abs().max())
    torch.testing.assert_close(loss, lossr, rtol=1e-5, atol=0)


def test_obs_block_of_no_columns_has_zero_loss():
    """A block of rows but no columns prunes nothing: loss 0, as the reference's. The per-row
    losses were an uninitialised buffer that no kernel wrote (the launch is skipped), so the
    loss was whatever memory it got."""
    for rows in (5, 300):
        w = rand(rows, rows, 0, device=DEV)
        hinv = torch.zeros(0, 0, device=DEV)
        torch.empty(4 * rows, device=DEV).fill_(1e30)  # leave non-zero memory for the allocator to hand out
        q, err, loss = obs_block.obs_prune_block(w, hinv, 0.5)
        qr, errr, lossr = reference.obs_prune_block(w, hinv, 0.5)
        assert q.shape == err.shape == (rows, 0) and float(lossr) == 0
        assert float(loss) == 0 and loss.dtype == lossr.dtype


def test_obs_block_hinv_of_another_width_is_an_error():
    """hinv must be the block's B x B factor, as the reference and the cpu sweep require: the
    kernel indexes it by the block's columns, and used a larger one's top-left corner silently."""
    w = rand(15, 4, 16, device=DEV)
    for width in (24, 8):
        with pytest.raises(ValueError, match="hinv has shape"):
            obs_block.obs_prune_block(w, hinv_factor(width, DEV, seed=16), 0.5)


@pytest.mark.parametrize("n,m", [(None, None), (2, 4), (4, 8)])
def test_obs_prune_whole_sweep_same_reconstruction_error(n, m):
    """The full blocked sweep through ops (Triton block op) vs the reference sweep."""
    rows, cols, block = 12, 72, 32  # 72 = 2 full blocks + a partial one
    gram = gram_matrix(cols, seed=2)
    hinv = reference.cholesky_inverse_upper(gram, 0.01)[0].float().to(DEV)
    w = rand(11, rows, cols, device=DEV)
    ops.reset_usage()
    with ops.backend_scope("triton"):
        q, loss = ops.obs_prune(w, hinv, 0.5, n, m, blocksize=block)
    assert ops.usage()["obs_prune_block"] == {"triton": 3}
    qr, lossr = reference.obs_prune(w, hinv, 0.5, n, m, blocksize=block)
    assert torch.equal(q == 0, qr == 0)
    e, er = reconstruction_error(w, q, gram), reconstruction_error(w, qr, gram)
    assert er > 0 and abs(e - er) <= 1e-4 * er
    torch.testing.assert_close(loss, lossr, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- Cholesky inverse factor (b)

@pytest.mark.parametrize("n,batch,dtype", [(5, (), torch.float64), (33, (), torch.float32), (40, (2, 3), torch.float64),
                                           (64, (), torch.float32), (100, (2,), torch.float64)])
def test_cholesky_inverse_upper_matches_reference(n, batch, dtype):
    gram = gram_matrix(n, batch, dtype=dtype, device=DEV, seed=n)
    upper, damp = cholesky.cholesky_inverse_upper(gram, 0.01)
    ref, ref_damp = reference.cholesky_inverse_upper(gram, 0.01)
    assert upper.shape == ref.shape and upper.dtype == dtype
    assert torch.equal(damp, ref_damp)
    assert torch.equal(upper, upper.triu()) and (torch.diagonal(upper, dim1=-2, dim2=-1) > 0).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(upper, ref, rtol=tol, atol=tol * ref.abs().max())
    # and it really factors the damped inverse: U^T U (G + lambda I) = I
    eye = torch.eye(n, dtype=torch.float64, device=DEV)
    damped = gram.double() + (damp.double() * torch.diagonal(gram.double(), dim1=-2, dim2=-1).mean(-1))[..., None, None] * eye
    u = upper.double()
    residual = (u.transpose(-1, -2) @ u @ damped - eye).abs().max()
    assert residual < (1e-8 if dtype == torch.float64 else 1e-2)


def test_cholesky_retry_raises_only_failing_matrices():
    x = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(0))
    gram = x.transpose(-1, -2) @ x  # rank 4 of 20: needs dampening
    gram[1] = torch.eye(20) + 1.0  # this one is positive definite
    gram = gram.to(DEV)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upper, damp = cholesky.cholesky_inverse_upper(gram, 1e-9)
        _, ref_damp = reference.cholesky_inverse_upper(gram, 1e-9)
    assert torch.equal(damp, ref_damp) and damp[1] == 1e-9 and damp[0] > 1e-9
    assert any(issubclass(c.category, RuntimeWarning) for c in caught)
    # ill-conditioned in fp32: compare against the float64 truth, no worse than the reference
    truth, _ = reference.cholesky_inverse_upper(gram.double().cpu(), 0.0 + float(damp.max()))
    with pytest.warns(RuntimeWarning, match="dampening raised"):
        ref, _ = reference.cholesky_inverse_upper(gram, 1e-9)
    for b in (0, 2):  # the two damped to the same level as the truth
        if damp[b] != damp.max():
            continue
        err = (upper[b].double().cpu() - truth[b]).abs().max() / truth[b].abs().max()
        ref_err = (ref[b].double().cpu() - truth[b]).abs().max() / truth[b].abs().max()
        assert err <= 3 * ref_err + 1e-5


@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 0), (0, 5, 5)])
def test_cholesky_inverse_upper_of_no_matrices_or_empty_ones(shape):
    """The reference returns empty factors for no matrices or 0 x 0 ones; the kernel's glue
    reshaped 0 x 0 matrices to (-1, 0, 0), which torch refuses (the batch size is ambiguous)."""
    gram = torch.zeros(shape, device=DEV)
    upper, damp = cholesky.cholesky_inverse_upper(gram, 0.01)
    ref, ref_damp = reference.cholesky_inverse_upper(gram, 0.01)
    assert upper.shape == ref.shape == shape and upper.dtype == ref.dtype
    assert torch.equal(damp, ref_damp)


@pytest.mark.parametrize("n,tile", [(37, 8), (16, 16), (70, 16)])
def test_triangular_inverse(n, tile):
    lower = torch.linalg.cholesky(gram_matrix(n, seed=n)).to(DEV)
    inv = cholesky.tri_inverse_lower(lower, tile=tile)
    eye = torch.eye(n, dtype=torch.float64, device=DEV)
    assert torch.equal(inv, inv.tril())
    assert (inv @ lower - eye).abs().max() < 1e-10



def test_triangular_inverse_offsets_past_two_to_the_31():
    """The tile kernel's row offsets, row * stride, are int64: a Hessian wider than 46340
    (Llama-3.1-405B's 53248-wide MLP input) has rows past 2^31 elements from its start, where
    int32 offsets wrapped to negative ones. Here a 3 x 3 matrix with a row stride of 2^30 + 64
    (row 2 at 2^31 + 128) in a large allocation that is never touched but where it is read:
    before, row 2 was read at -2^31 + 128, from the NaNs put there, and written there too."""
    stride = 2 ** 30 + 64
    base = 2 ** 31  # the wrapped offset stays inside the allocation (no stray read)
    try:
        storage = torch.empty(base + 2 * stride + 64, dtype=torch.float16, device=DEV)  # 8 GiB, untouched
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve 8 GiB of address space")
    storage[:1024] = float("nan")
    lower = torch.tensor([[2.0, 0.0, 0.0], [1.0, 4.0, 0.0], [-1.0, 0.5, 1.0]], dtype=torch.float16)
    L = storage.as_strided((3, 3), (stride, 1), base)
    X = storage.as_strided((3, 3), (stride, 1), base + 8)
    L.copy_(lower)
    X.zero_()
    cholesky._tri_inv_tile_kernel[(1, 1)](L, X, 3, 0, stride, T=4, num_warps=1)
    torch.testing.assert_close(X.float().cpu(), torch.linalg.inv(lower.float()), rtol=2e-3, atol=2e-3)
    assert storage[:1024].isnan().all()  # nothing written at the wrapped offsets

# ---------------------------------------------------------------- SparseLLM steps (e)

STEP_SHAPES = [(37, 53), (3, 5000)]  # 5000: more than one chunk under the interpreter


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_z_steps(shape, dtype):
    p, m, s = (rand(i, *shape, dtype=dtype, device=DEV, scale=2.0) for i in range(3))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    alpha, gamma = 0.7, 1.3
    z = sparsellm_steps.relu_z_step(p, m, alpha, gamma)
    zr = reference.relu_z_step(p.double(), m.double(), alpha, gamma)
    assert z.dtype == dtype and (zr != 0).any() and (zr == 0).any()
    # the ReLU step picks one of two candidates; where their objectives tie to rounding the
    # pick may differ from the float64 one, so: equal almost everywhere, never worse
    close = torch.isclose(z.double(), zr, rtol=tol, atol=tol)
    assert close.float().mean() > 0.999
    obj = lambda t: alpha * (t - m.double()) ** 2 + gamma * (p.double() - t.clamp_min(0)) ** 2  # noqa: E731
    assert (obj(z.double()) <= obj(zr) * (1 + 10 * tol) + tol).all()
    z = sparsellm_steps.swiglu_z_step(p, m, s, 0.7, 1.3)
    zr = reference.swiglu_z_step(p.double(), m.double(), s.double(), 0.7, 1.3)
    torch.testing.assert_close(z.double(), zr, rtol=tol, atol=tol)


def test_relu_z_step_keeps_nan_as_the_reference():
    """A NaN in m (or p) gives NaN in the reference (clamp_min/clamp_max propagate it). The
    kernel's tl.maximum/tl.minimum returned the other operand, so a NaN m came out as 0 and
    hid the divergence from SparseLLM's objective."""
    p, m = rand(50, 7, 13, device=DEV, scale=2.0), rand(51, 7, 13, device=DEV, scale=2.0)
    m[1, 3] = p[2, 5] = m[4, 0] = p[4, 0] = float("nan")
    m[5, 7] = float("inf")
    z = sparsellm_steps.relu_z_step(p, m, 0.7, 1.3).cpu()
    zr = reference.relu_z_step(p.double().cpu(), m.double().cpu(), 0.7, 1.3)
    assert torch.isnan(zr[1, 3]) and torch.equal(torch.isnan(z), torch.isnan(zr))
    torch.testing.assert_close(z.double(), zr, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_z_step_broadcast_and_float64_declined():
    p = rand(1, 6, 10, device=DEV)
    m = rand(2, 10, device=DEV)
    torch.testing.assert_close(sparsellm_steps.relu_z_step(p, m, 1.0, 2.0), reference.relu_z_step(p, m, 1.0, 2.0))
    with pytest.raises(ops.Decline, match="float64"):  # fp32 kernels: ops runs the next backend
        sparsellm_steps.relu_z_step(p.double(), m.double(), 1.0, 2.0)


def test_steps_return_the_references_dtype_for_mixed_inputs():
    """A float16 s (or m) with float32 targets: the reference computes and returns float32,
    as eager promotion does; the kernels must not round the result to the first input's dtype."""
    s, g, p, z = (rand(40 + i, 5, 37, device=DEV, scale=2.0) for i in range(4))
    for step, args in ((sparsellm_steps.swiglu_s_step, (s.half(), g, p, z, 0.5, 2.0, 3)),
                       (sparsellm_steps.swiglu_z_step, (p, z.half(), s, 0.5, 2.0)),
                       (sparsellm_steps.relu_z_step, (p, z.half(), 0.5, 2.0))):
        got = step(*args)
        ref = getattr(reference, step.__name__)
        assert got.dtype == ref(*args).dtype == torch.float32
        # the values: the kernels compute in fp32 from the inputs as given (the s-step to the
        # rounding of its flat objective near a minimum, as in test_swiglu_s_step)
        want = ref(*(a.float() if torch.is_tensor(a) else a for a in args))
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_steps_promote_a_zero_dim_input_as_the_reference():
    """A 0-d float32 input (a scalar target broadcast over the chunk) with float16 tensors: the
    reference promotes the dtypes (float32 result); torch.result_type, which the kernels used,
    ignores a 0-d tensor's dtype within its category and gave a float16 result."""
    s, g, p = (rand(60 + i, 5, 37, device=DEV, scale=2.0).half() for i in range(3))
    z0 = rand(63, 1, device=DEV, scale=2.0)[0]  # 0-d float32
    assert z0.dim() == 0
    for step, args in ((sparsellm_steps.relu_z_step, (p, z0, 0.5, 2.0)),
                       (sparsellm_steps.swiglu_z_step, (p, z0, s, 0.5, 2.0)),
                       (sparsellm_steps.swiglu_s_step, (s, g, p, z0, 0.5, 2.0, 3))):
        got = step(*args)
        ref = getattr(reference, step.__name__)(*args)
        assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("omega", [1.6, 1.0])
def test_aux_updates_are_the_kernels_steps_relaxed_and_measured(omega):
    """The triton backend's auxiliary updates: z (and s) from the step kernels, relaxed from the
    old values by omega, and the squared norms of the objective's terms at the result (float64
    0-d), checked against float64 sums of the returned tensors and against the reference."""
    p, m, g, z_old, s_old = (rand(30 + i, 37, 53, device=DEV, scale=2.0) for i in range(5))
    alpha_z, alpha_s, gamma = 0.5, 0.8, 2.0
    z_step = sparsellm_steps.swiglu_z_step(p, m, s_old, alpha_z, gamma)
    s_step = sparsellm_steps.swiglu_s_step(s_old, g, p, z_step, alpha_s, gamma, 2)
    z, s, sq_s, sq_z, sq_p = K.swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, 2)
    torch.testing.assert_close(z, z_old + omega * (z_step - z_old), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_old + omega * (s_step - s_old), rtol=1e-5, atol=1e-5)
    d = {k: v.double() for k, v in dict(z=z, s=s, m=m, g=g, p=p).items()}
    for got, want in ((sq_s, (d["g"] - d["s"]).square().sum()), (sq_z, (d["m"] - d["z"]).square().sum()),
                      (sq_p, (torch.nn.functional.silu(d["s"]) * d["z"] - d["p"]).square().sum())):
        assert got.dtype == torch.float64 and float(got) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(z, reference.swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma,
                                                              omega, 2)[0], rtol=1e-4, atol=1e-4)
    z, sq_z, sq_p = K.relu_aux_update(p, m, z_old, alpha_z, gamma, omega)
    want_z = reference.relu_aux_update(p, m, z_old, alpha_z, gamma, omega)[0]
    assert not torch.equal(want_z, z_old)
    torch.testing.assert_close(z, want_z, rtol=1e-5, atol=1e-5)
    assert float(sq_p) == pytest.approx(float((torch.relu(z.double()) - p.double()).square().sum()), rel=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_swiglu_s_step(shape, dtype):
    s, g, p, z = (rand(10 + i, *shape, dtype=dtype, device=DEV, scale=2.0) for i in range(4))
    alpha, gamma = 0.5, 2.0
    out = sparsellm_steps.swiglu_s_step(s, g, p, z, alpha, gamma, iterations=5)
    ref = reference.swiglu_s_step(s.float(), g.float(), p.float(), z.float(), alpha, gamma, iterations=5)
    obj = lambda t: reference.swiglu_s_objective(t.double(), g.double(), p.double(), z.double(), alpha, gamma)  # noqa: E731
    start, mine, theirs = obj(s), obj(out), obj(ref)
    assert not torch.isnan(out).any()
    assert (mine <= start + 1e-3 * start.abs() + 1e-3).all(), "an s-step increased the objective"
    assert mine.sum() < start.sum()
    # the same safeguarded Newton path. Near a minimum the objective is flat, so s itself is
    # only determined to ~sqrt(eps) and step acceptance flips on rounding-level differences:
    # compare the objective reached, element by element; the objective is not convex, so a
    # flipped acceptance can (rarely) lead into another basin: allow a sliver of elements that
    # differ, with the total no worse
    if dtype == torch.float32:
        same = (mine - theirs).abs() <= 1e-5 * (1 + theirs)
        assert same.float().mean() > 0.99
        assert torch.isclose(out, ref, rtol=1e-4, atol=1e-5).float().mean() > 0.9
    assert mine.sum() <= theirs.sum() * (1 + 1e-3) + 1e-3


# ---------------------------------------------------------------- bfloat16 and compiled GPU runs

@pytest.mark.gpu
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 16)])
def test_bfloat16_masks_and_steps_gpu(n, m):
    w = rand(1, 64, 4096, dtype=torch.bfloat16, device="cuda")
    norm = rand(2, 4096, device="cuda").abs() + 0.05
    score = w.abs().float() * norm
    check_nm(K.wanda_prune_mask(w, norm, 0.5, n, m), reference.wanda_prune_mask(w, norm, 0.5, n, m), score, n, m)
    check_selection(K.wanda_prune_mask(w, norm, 0.5), reference.wanda_prune_mask(w, norm, 0.5), score, 2048)
    p, mm = rand(3, 128, 1000, dtype=torch.bfloat16, device="cuda"), rand(4, 128, 1000, dtype=torch.bfloat16, device="cuda")
    z = sparsellm_steps.relu_z_step(p, mm, 0.7, 1.3)
    torch.testing.assert_close(z.float(), reference.relu_z_step(p.float(), mm.float(), 0.7, 1.3), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
# 120: a width that is not a power of two (padded lanes in the kernel) yet a multiple of m=8
@pytest.mark.parametrize("rows,width,n,m", [(4096, 128, None, None), (4096, 128, 2, 4), (3000, 120, 4, 8)])
def test_obs_block_gpu_realistic(rows, width, n, m):
    hinv = hinv_factor(width, "cuda", seed=1)
    w = rand(2, rows, width, device="cuda")
    q, err, loss = obs_block.obs_prune_block(w, hinv, 0.5, n, m)
    qr, errr, lossr = reference.obs_prune_block(w, hinv, 0.5, n, m)
    assert (q == 0).eq(qr == 0).float().mean() > 0.9999
    torch.testing.assert_close(loss, lossr, rtol=1e-4, atol=0)
