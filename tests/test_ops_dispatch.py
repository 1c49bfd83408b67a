"""The one dispatch point: auto on CPU -> reference, forced backends, fallbacks, usage."""
from __future__ import annotations

import pytest
import torch

from sparsellm import ops, reference


@pytest.fixture(autouse=True)
def _restore_backend():
    before = ops.get_backend()
    ops.reset_usage()
    yield
    ops._state["backend"] = before
    ops.reset_usage()


def test_auto_on_cpu_runs_the_reference():
    ops.set_backend("auto")
    score = torch.randn(4, 16)
    mask = ops.nm_prune_mask(score, 2, 4)
    assert torch.equal(mask, reference.nm_prune_mask(score, 2, 4))
    ops.relu_z_step(torch.randn(3, 5), torch.randn(3, 5), 1.0, 1.0)
    assert ops.usage() == {"nm_prune_mask": {"reference": 1}, "relu_z_step": {"reference": 1}}


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("tpu")


def test_forcing_an_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(ops._loaded, "cuda", False)
    monkeypatch.setitem(ops._load_errors, "cuda", "ImportError: sparsellm._C is not built")
    with pytest.raises(ops.BackendUnavailable, match=r"'cuda' is not available.*_C is not built"):
        ops.set_backend("cuda")
    assert not ops.available("cuda", "cuda")


def test_forced_triton_on_cpu_without_interpreter_errors_per_call(monkeypatch):
    pytest.importorskip("triton")
    ops.set_backend("triton")  # the package imports: the backend exists...
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ops.BackendUnavailable, match="cannot run on cpu tensors"):
        ops.nm_prune_mask(torch.randn(2, 8), 2, 4)  # ...but not for CPU tensors without the interpreter
    assert ops.usage() == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter route")
def test_forced_triton_records_usage_and_falls_back(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # conftest set it before the kernels were imported
    ops.set_backend("triton")
    score = torch.randn(3, 8)
    assert torch.equal(ops.nm_prune_mask(score, 2, 4), reference.nm_prune_mask(score, 2, 4))
    ops.flat_prune_mask(score, 5)  # not a Triton op: falls back to the reference
    gram = torch.eye(6) * 2 + 0.1
    ops.damped_cholesky(gram, 0.01)
    ops.cholesky_inverse_upper(gram, 0.01)
    assert ops.usage() == {"nm_prune_mask": {"triton": 1}, "flat_prune_mask": {"reference": 1},
                           "damped_cholesky": {"reference": 1}, "cholesky_inverse_upper": {"triton": 1}}


def test_every_triton_registration_has_the_reference_signature():
    pytest.importorskip("triton")
    import inspect

    import sparsellm._triton_backend  # noqa: F401  (registers)
    for op, impls in ops._registry.items():
        ref_params = list(inspect.signature(getattr(reference, op)).parameters)
        for backend, fn in impls.items():
            params = list(inspect.signature(fn).parameters)
            assert params[:len(ref_params)] == ref_params[:len(params)], (op, backend)
            assert len(params) >= sum(1 for p in inspect.signature(getattr(reference, op)).parameters.values()
                                      if p.default is inspect.Parameter.empty), (op, backend)


def test_cuda_backend_import_fails_cleanly_without_extension():
    try:
        import sparsellm._C  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("extension is built here")
    with pytest.raises(ImportError, match="not built"):
        import sparsellm._cuda_backend  # noqa: F401


def test_a_misspelt_backend_variable_is_an_error_naming_it(monkeypatch):
    monkeypatch.setitem(ops._state, "backend", "tritn")  # what SPARSELLM_BACKEND=tritn sets at import
    with pytest.raises(ValueError, match="SPARSELLM_BACKEND='tritn' is not a backend; choose one of auto, cuda"):
        ops.nm_prune_mask(torch.randn(2, 8), 2, 4)


def test_nm_sweeps_whose_width_m_does_not_divide_are_refused():
    """An N:M sweep groups columns from each block's first: a block width that m does not divide
    would leave a ragged group (one backend pruned it, another failed on a reshape)."""
    weight = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    hinv = reference.cholesky_inverse_upper(torch.eye(12) + 0.1, 0.01)[0]
    with pytest.raises(ValueError, match=r"1:3 pruning needs a blocksize \(columns per block\) width that is a multiple of 3, got 8"):
        ops.obs_prune(weight, hinv, 1 / 3, 1, 3, blocksize=8)
    with pytest.raises(ValueError, match="1:3 pruning needs a block width that is a multiple of 3, got 8"):
        ops.obs_prune_block(weight[:, :8], hinv[:8, :8], 1 / 3, 1, 3)
    with pytest.raises(ValueError, match="multiple of 3, got 8"):
        reference.obs_prune_block(weight[:, :8], hinv[:8, :8], 1 / 3, 1, 3)
    pruned, _ = ops.obs_prune(weight, hinv, 1 / 3, 1, 3, blocksize=6)  # widths m divides: fine
    assert ((pruned == 0).reshape(4, 4, 3).sum(-1) == 1).all()


def test_the_elementwise_steps_broadcast_and_promote_as_eager_above_the_block_size():
    """Above ELEMENTWISE_BLOCK elements the reference works on flat blocks; inputs of other
    shapes are broadcast as eager broadcasts them, inputs of other dtypes are widened to the
    promoted dtype first (every operation in it, not op by op)."""
    g = torch.Generator().manual_seed(1)
    rows = reference.ELEMENTWISE_BLOCK // 1000 + 2  # above the block size
    p = torch.randn(rows, 1000, generator=g)
    for m in (torch.randn(1, 1000, generator=g), torch.randn(rows, 1000, generator=g, dtype=torch.float64)):
        got = reference.relu_z_step(p, m, 1.0, 2.0)
        want = reference._relu_z(p.to(m.dtype), m, 1.0, 2.0)
        assert got.shape == (rows, 1000) and got.dtype == want.dtype and torch.equal(got, want)


def test_an_inverse_that_rounds_to_indefinite_is_factored_in_float64():
    """The damped Gram factors, but its float32 inverse rounds to indefinite (8 tokens over 48
    features of scales 1 to 1000, dampening 1e-6): the second factorisation is made in float64
    instead of failing."""
    x = torch.randn(8, 48, generator=torch.Generator().manual_seed(36)) * torch.logspace(0, 3, 48)
    gram = x.T @ x
    chol, _ = reference.damped_cholesky(gram, 1e-6)
    inverse = torch.cholesky_inverse(chol)
    assert torch.linalg.cholesky_ex(inverse, upper=True).info != 0  # the case this test is about
    upper, damp = reference.cholesky_inverse_upper(gram, 1e-6)
    assert upper.dtype == torch.float32 and float(damp) == pytest.approx(1e-6) and torch.equal(upper, upper.triu())
    u = upper.double()
    torch.testing.assert_close(u.T @ u, inverse.double(), rtol=1e-5, atol=1e-5 * float(inverse.abs().max()))
