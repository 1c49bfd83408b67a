"""The CUDA extension (sparsellm._C via sparsellm._cuda_backend) against the reference.

Every test needs a GPU (``gpu`` marker: skipped cleanly without one) and the built extension
(skipped with the reason when it is not built; see benchmarks/build_cuda_ext.sh).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from sparsellm import ops, reference
from kernel_checks import (NM_PATTERNS, check_nm, check_selection, gram_matrix, hinv_factor, rand,
                           reconstruction_error)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cb():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        import sparsellm._cuda_backend as backend
    except ImportError as exc:
        pytest.skip(f"CUDA extension not built: {exc}")
    return backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,m", NM_PATTERNS)
@pytest.mark.parametrize("rows", [1, 37, 1000])
def test_nm_mask_raw(cb, rows, n, m, dtype):
    score = rand(rows + m, rows, 48 * 7, dtype=dtype, device="cuda")
    ref_score = score.double() if dtype == torch.float64 else score.float()
    mask = cb.nm_prune_mask(score, n, m)
    assert check_nm(mask, reference.nm_prune_mask(ref_score, n, m), ref_score, n, m) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 16), (2, 3)])
def test_nm_mask_fused_wanda(cb, n, m, dtype):
    w = rand(1, 256, 4800, dtype=dtype, device="cuda")
    aux = rand(2, 4800, device="cuda").abs() + 0.1
    score = w.abs().float() * aux
    assert check_nm(cb.wanda_prune_mask(w, aux, 0.5, n, m), reference.nm_prune_mask(score, n, m), score, n, m) > 0


def test_nm_mask_ties(cb):
    score = torch.randint(0, 3, (64, 256), device="cuda").float()
    for n, m in NM_PATTERNS[:4]:
        check_nm(cb.nm_prune_mask(score, n, m), reference.nm_prune_mask(score, n, m), score, n, m)


def test_nan_scores_rank_above_every_number(cb):
    """As torch.topk (the reference) orders them: a NaN, whatever its sign bit, is pruned last and
    every group loses exactly n entries."""
    negative_nan = torch.tensor([-4194304], dtype=torch.int32).view(torch.float32)  # 0xFFC00000
    score = rand(43, 6, 16)
    score[0, 1] = float("nan")
    score[2, 5] = negative_nan
    score[3, 14] = float("nan")
    mask = cb.nm_prune_mask(score.cuda(), 2, 4).cpu()
    assert torch.equal(mask, reference.nm_prune_mask(score, 2, 4)) and (mask.reshape(6, 4, 4).sum(-1) == 2).all()
    weight = rand(44, 6, 16)
    weight[:, 0] = 0.0
    norm = rand(45, 16).abs()
    norm[0] = float("inf")  # zero times inf: a NaN Wanda score
    wanda = cb.wanda_prune_mask(weight.cuda(), norm.cuda(), 0.5, 2, 4).cpu()
    assert torch.equal(wanda, reference.wanda_prune_mask(weight, norm, 0.5, 2, 4))


def test_float64_obs_blocks_are_declined(cb):
    weight = rand(46, 8, 32, dtype=torch.float64, device="cuda")
    hinv = hinv_factor(32, device="cuda", seed=47).double()
    with pytest.raises(ops.Decline, match="float64"):
        cb.obs_prune_block(weight, hinv, 0.5)
    ops.reset_usage()
    with ops.backend_scope("cuda"):
        got = ops.obs_prune_block(weight, hinv, 0.5)
    assert ops.usage() == {"obs_prune_block": {"reference": 1}} and got[0].dtype == torch.float64
    assert torch.equal(got[0], reference.obs_prune_block(weight, hinv, 0.5)[0])


def test_obs_block_broadcast_mask(cb):
    """A one-row mask applies to every row, as in the reference."""
    weight = rand(49, 9, 24)
    hinv = hinv_factor(24, seed=50)
    given = rand(51, 1, 24) > 0
    q, _, loss = cb.obs_prune_block(weight.cuda(), hinv.cuda(), 0.5, prune_mask=given.cuda())
    qr, _, lossr = reference.obs_prune_block(weight, hinv, 0.5, prune_mask=given)
    torch.testing.assert_close(q.cpu(), qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.cpu(), lossr, rtol=1e-5, atol=0)


def test_obs_block_host_mask_is_an_error(cb):
    """The kernel reads the mask through a device pointer: a CPU mask with CUDA weights was passed
    to it as is (an illegal memory access); now refused, as the reference and Triton refuse it."""
    weight = rand(52, 5, 16).cuda()
    hinv = hinv_factor(16, seed=53).cuda()
    given = rand(54, 5, 16) > 0
    with pytest.raises(RuntimeError, match="prune_mask must be on the weight's device"):
        cb.obs_prune_block(weight, hinv, 0.5, prune_mask=given)
    torch.cuda.synchronize()  # the context is still usable
    q, _, _ = cb.obs_prune_block(weight, hinv, 0.5, prune_mask=given.cuda())
    assert (q.cpu()[given] == 0).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_obs_block_factor_on_another_device_is_an_error(cb):
    """The kernel runs on the weight's device and read hinv through its raw pointer: a factor on
    another GPU was an illegal access (or a silent peer read); now refused, as the reference
    refuses mixed devices."""
    weight = rand(55, 5, 16).to("cuda:0")
    hinv = hinv_factor(16, seed=56).to("cuda:1")
    with pytest.raises(RuntimeError, match="hinv must be on the weight's device"):
        cb.obs_prune_block(weight, hinv, 0.5)
    torch.cuda.synchronize(0)  # the context is still usable
    q, _, _ = cb.obs_prune_block(weight, hinv.to("cuda:0"), 0.5)
    assert (q == 0).any()


def test_float64_wanda_masks_are_declined(cb):
    """The kernel scores |W| * norm in fp32, the reference float64 inputs in float64 (pairs
    1e-12 apart, the larger first, tie in fp32: see the Triton test of the same name)."""
    g = torch.Generator().manual_seed(48)
    weight = torch.randn(4, 16, generator=g, dtype=torch.float64).repeat_interleave(2, dim=1)
    weight[:, 0::2] *= 1 + 1e-12
    norm = (torch.rand(16, generator=g, dtype=torch.float64) + 0.5).repeat_interleave(2)
    with pytest.raises(ops.Decline, match="float64"):
        cb.wanda_prune_mask(weight.cuda(), norm.cuda(), 0.5, 1, 2)
    with ops.backend_scope("cuda"):
        got = ops.wanda_prune_mask(weight.cuda(), norm.cuda(), 0.5, 1, 2).cpu()
    assert torch.equal(got, reference.wanda_prune_mask(weight, norm, 0.5, 1, 2))
    assert torch.equal(got, torch.tensor([False, True]).repeat(4, 16))

def test_unstructured_wanda_is_handed_to_a_selection(cb):
    """The extension has no per-row selection: it declines, and ops runs Triton's (or the
    reference where Triton is missing), recording the backend that ran and why."""
    w = rand(3, 64, 1000, device="cuda")
    norm = rand(4, 1000, device="cuda").abs() + 0.1
    with pytest.raises(ops.Decline, match="unstructured"):
        cb.wanda_prune_mask(w, norm, 0.5)
    ops.reset_usage()
    with ops.backend_scope("cuda"):
        mask = ops.wanda_prune_mask(w, norm, 0.5)
    ran = "triton" if ops.available("triton", "cuda") else "reference"
    assert ops.usage() == {"wanda_prune_mask": {ran: 1}}
    assert ops.fallbacks() == {"wanda_prune_mask": {f"cuda->{ran}: unstructured": 1}}
    check_selection(mask, reference.wanda_prune_mask(w, norm, 0.5), w.abs() * norm, 500)


OBS_CASES = [(7, 16, None, None), (33, 40, None, None), (4096, 128, None, None), (300, 200, None, None),
             (33, 40, 2, 4), (33, 40, 3, 4), (1000, 64, 4, 8), (1000, 128, 1, 16), (129, 96, 2, 3),
             (300, 200, 2, 4)]  # 200 columns: 8 slots per lane and the Hinv block outside shared memory


@pytest.mark.parametrize("rows,width,n,m", OBS_CASES)
def test_obs_block(cb, rows, width, n, m):
    hinv = hinv_factor(width, "cuda", seed=width)
    w = rand(rows, rows, width, device="cuda")
    q, err, loss = cb.obs_prune_block(w, hinv, 0.5, n, m)
    qr, errr, lossr = reference.obs_prune_block(w, hinv, 0.5, n, m)
    same = (q == 0).eq(qr == 0)
    assert same.float().mean() > 0.9999 and (q == 0).any() and (q != 0).any()
    rows_same = same.all(1)  # rows whose masks agree must agree numerically
    torch.testing.assert_close(q[rows_same], qr[rows_same], rtol=1e-4, atol=1e-4 * w.abs().max())
    torch.testing.assert_close(err[rows_same], errr[rows_same], rtol=1e-4, atol=1e-4 * errr.abs().max())
    torch.testing.assert_close(loss, lossr, rtol=1e-4, atol=0)


def test_obs_block_given_mask_and_half(cb):
    hinv = hinv_factor(64, "cuda", seed=3)
    w = rand(5, 100, 64, device="cuda")
    given = rand(6, 100, 64, device="cuda") > 0
    q, _, loss = cb.obs_prune_block(w, hinv, 0.5, prune_mask=given)
    qr, _, lossr = reference.obs_prune_block(w, hinv, 0.5, prune_mask=given)
    torch.testing.assert_close(q, qr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, lossr, rtol=1e-4, atol=0)
    q16, _, _ = cb.obs_prune_block(w.half(), hinv, 0.5, 2, 4)
    qr32, _, _ = reference.obs_prune_block(w.half().float(), hinv, 0.5, 2, 4)
    assert q16.dtype == torch.float16
    torch.testing.assert_close(q16.float(), qr32, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("n,m", [(None, None), (2, 4)])
def test_obs_prune_sweep_reconstruction_error(cb, n, m):
    cols = 300
    gram = gram_matrix(cols, seed=4)
    hinv = reference.cholesky_inverse_upper(gram, 0.01)[0].float().cuda()
    w = rand(9, 512, cols, device="cuda")
    ops.reset_usage()
    with ops.backend_scope("cuda"):
        q, loss = ops.obs_prune(w, hinv, 0.5, n, m, blocksize=128)
    assert ops.usage()["obs_prune_block"] == {"cuda": 3}
    qr, lossr = reference.obs_prune(w, hinv, 0.5, n, m, blocksize=128)
    e, er = reconstruction_error(w, q, gram), reconstruction_error(w, qr, gram)
    assert er > 0 and abs(e - er) <= 1e-3 * er


@pytest.mark.parametrize("n,batch,dtype", [(5, (), torch.float64), (33, (), torch.float32), (40, (2, 3), torch.float64),
                                           (768, (), torch.float32), (100, (4,), torch.float32)])
def test_cholesky_inverse_upper(cb, n, batch, dtype):
    gram = gram_matrix(n, batch, dtype=dtype, device="cuda", seed=n)
    upper, damp = cb.cholesky_inverse_upper(gram, 0.01)
    ref, ref_damp = reference.cholesky_inverse_upper(gram, 0.01)
    assert torch.equal(damp, ref_damp) and torch.equal(upper, upper.triu())
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(upper, ref, rtol=tol, atol=tol * ref.abs().max())
    lower, damp2 = cb.damped_cholesky(gram, 0.01)
    ref_lower, _ = reference.damped_cholesky(gram, 0.01)
    assert torch.equal(damp2, ref_damp)
    torch.testing.assert_close(lower, ref_lower, rtol=tol, atol=tol * ref_lower.abs().max())


def test_damped_cholesky_retries_only_failing(cb):
    x = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(0))
    gram = (x.transpose(-1, -2) @ x).cuda()
    gram[1] = torch.eye(20, device="cuda") + 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lower, damp = cb.damped_cholesky(gram, 1e-9)
    _, ref_damp = reference.damped_cholesky(gram, 1e-9)
    assert torch.equal(damp, ref_damp) and damp[1] == 1e-9 and damp[0] > 1e-9
    assert any(issubclass(c.category, RuntimeWarning) for c in caught)
    eye = torch.eye(20, device="cuda")
    damped = gram + (damp * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1))[:, None, None] * eye
    torch.testing.assert_close(lower @ lower.transpose(-1, -2), damped, rtol=1e-4, atol=1e-4 * damped.abs().max())
    with pytest.raises(reference.NotPositiveDefinite):
        cb.damped_cholesky(-gram, 0.0)


def test_obs_block_of_no_columns_has_zero_loss(cb):
    """A block of rows but no columns launches no kernel, and its loss was summed from
    uninitialised memory; now 0, the reference's."""
    weight = torch.randn(7, 0, device="cuda")
    hinv = torch.empty(0, 0, device="cuda")
    for kwargs in ({}, {"n": 2, "m": 4}, {"prune_mask": torch.zeros(7, 0, dtype=torch.bool, device="cuda")}):
        q, err, loss = cb.obs_prune_block(weight, hinv, 0.5, **kwargs)
        assert q.shape == err.shape == (7, 0) and loss.item() == 0.0


@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 0), (0, 4, 4)])
def test_empty_gram_matrices(cb, shape):
    """A 0 x 0 Gram matrix: reshape's -1 was ambiguous (an error); now the empty factor and the
    dampening, as the reference's damped_cholesky returns them."""
    gram = torch.zeros(shape, device="cuda")
    lower, damp = cb.damped_cholesky(gram, 0.01)
    want, want_damp = reference.damped_cholesky(gram.cpu(), 0.01)
    assert lower.shape == want.shape and torch.equal(damp.cpu(), want_damp)
    upper, damp = cb.cholesky_inverse_upper(gram, 0.01)
    want_upper, want_damp = reference.cholesky_inverse_upper(gram.cpu(), 0.01)
    assert upper.shape == want_upper.shape == shape and torch.equal(damp.cpu(), want_damp)
