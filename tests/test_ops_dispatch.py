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
