"""Declines: a backend that does not handle a call raises ops.Decline, ops runs the next one,
and usage() records the backend that computed the call (fallbacks() says why). One test per
fallback path of the Triton kernels and of the CUDA backend, plus backend_scope and api.run.

The CUDA backend is imported over a fake ``sparsellm._C`` that records its calls: its declines
happen before the extension is called, so they are checked on CPU tensors (ops is told the
fake backend can run them). Everything is put back afterwards.
"""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

import sparsellm
from sparsellm import api, ops, reference
from sparsellm.config import PruneConfig

INTERPRETED = not torch.cuda.is_available()  # conftest set TRITON_INTERPRET=1


@pytest.fixture(autouse=True)
def _clean_dispatch_state():
    ops.reset_usage()
    with ops.backend_scope(None):  # whatever a test sets is undone
        yield
    ops.reset_usage()


def _forced_run(backend, call):
    """Run ``call`` with ``backend`` forced; return (result, usage, fallbacks)."""
    ops.reset_usage()
    with ops.backend_scope(backend):
        result = call()
    return result, ops.usage(), ops.fallbacks()


# ------------------------------------------------------------------ Triton kernels (interpreter)

@pytest.fixture
def triton_backend():
    pytest.importorskip("triton")
    if not INTERPRETED:
        pytest.skip("checks the CPU interpreter route")
    return importlib.import_module("sparsellm._triton_backend")


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


F64 = torch.float64
TRITON_DECLINES = {  # case: (op, call, reason)
    "nm m > 16": ("nm_prune_mask", lambda: ops.nm_prune_mask(_rand(3, 64), 7, 32), "m=32 > 16"),
    "wanda m > 16": ("wanda_prune_mask", lambda: ops.wanda_prune_mask(_rand(3, 64), _rand(64).abs(), 0.5, 7, 32),
                     "m=32 > 16"),
    "row float64": ("row_prune_mask", lambda: ops.row_prune_mask(_rand(3, 40, dtype=F64), 9), "float64 score"),
    "relu_z float64": ("relu_z_step", lambda: ops.relu_z_step(*_rand(2, 3, 5, dtype=F64), 1.0, 2.0), "float64"),
    "swiglu_z float64": ("swiglu_z_step", lambda: ops.swiglu_z_step(*_rand(3, 3, 5, dtype=F64), 1.0, 2.0), "float64"),
    "swiglu_s float64": ("swiglu_s_step", lambda: ops.swiglu_s_step(*_rand(4, 3, 5, dtype=F64), 0.5, 2.0), "float64"),
}


@pytest.mark.parametrize("case", list(TRITON_DECLINES))
def test_triton_declines_are_run_and_recorded_as_the_reference(triton_backend, case):
    op, call, reason = TRITON_DECLINES[case]
    _, used, fell = _forced_run("triton", call)
    assert used == {op: {"reference": 1}}
    if "inductor" in ops._registry.get(op, {}):  # the next in order: it declines small calls
        from sparsellm._inductor_backend import MIN_ELEMENTS

        assert fell == {op: {f"triton->inductor: {reason}": 1,
                             f"inductor->reference: fewer than {MIN_ELEMENTS} elements: eager is cheaper than compiling": 1}}
    else:
        assert fell == {op: {f"triton->reference: {reason}": 1}}


def test_triton_obs_block_declines_float64(triton_backend):
    """The kernel sweeps in fp32: a float64 block goes on, and the C sweep (float32 too) passes
    it to the reference, which computes it in float64."""
    weight = _rand(4, 16, dtype=F64)
    hinv = reference.cholesky_inverse_upper(weight.T @ weight + torch.eye(16, dtype=F64), 0.01)[0]
    result, used, fell = _forced_run("triton", lambda: ops.obs_prune_block(weight, hinv, 0.5))
    assert used == {"obs_prune_block": {"reference": 1}}
    assert "triton->cpu: float64 (the kernel sweeps in fp32)" in fell["obs_prune_block"]
    want = reference.obs_prune_block(weight, hinv, 0.5)
    assert result[0].dtype == F64 and all(torch.equal(a, b) for a, b in zip(result, want))

def test_triton_declined_result_is_the_reference_result(triton_backend):
    score = _rand(3, 64, dtype=F64)
    mask, used, _ = _forced_run("triton", lambda: ops.row_prune_mask(score, 20))
    assert torch.equal(mask, reference.row_prune_mask(score, 20)) and used == {"row_prune_mask": {"reference": 1}}
    with pytest.raises(ops.Decline, match="float64 score"):  # called directly, the kernel refuses
        triton_backend.row_select.row_prune_mask(score, 20)


def test_handled_calls_and_unimplemented_ops_record_no_fallback(triton_backend):
    score = torch.randn(3, 64)
    _, used, fell = _forced_run("triton", lambda: (ops.nm_prune_mask(score, 2, 4), ops.flat_prune_mask(score, 9)))
    assert used == {"nm_prune_mask": {"triton": 1}, "flat_prune_mask": {"reference": 1}}
    assert fell == {}


# ------------------------------------------------------------------ CUDA backend over a fake _C

def _fake_extension(calls: list):
    """A stand-in for sparsellm._C computing with the reference, recording each call's name."""
    fake = types.ModuleType("sparsellm._C")

    def recorded(name, fn):
        def wrapper(*args):
            calls.append(name)
            return fn(*args)
        return wrapper

    def nm_mask(x, aux, n, m, mode):
        score = x if aux is None else x.abs().float() * aux.float()
        return reference.nm_prune_mask(score, n, m)

    def obs_prune_block(weight, hinv, fraction, n, m, prune_mask):
        return reference.obs_prune_block(weight, hinv, fraction, n or None, m if n else None, prune_mask)

    def factor(fn):
        return lambda gram, percdamp, max_tries: (*fn(gram, percdamp), 0)

    fake.nm_mask = recorded("nm_mask", nm_mask)
    fake.obs_prune_block = recorded("obs_prune_block", obs_prune_block)
    fake.damped_cholesky = recorded("damped_cholesky", factor(reference.damped_cholesky))
    fake.cholesky_inverse_upper = recorded("cholesky_inverse_upper", factor(reference.cholesky_inverse_upper))
    try:  # the extension reports the constants it was compiled with (sparsellm._extension checks them)
        from sparsellm import kernel_constants
        fake.compiled_constants = lambda: dict(kernel_constants.CONSTANTS)
    except ImportError:
        pass
    return fake


@pytest.fixture
def fake_cuda(monkeypatch):
    """(the cuda backend module, the fake extension's call log, a switch for triton)."""
    ops.available("triton")  # load triton's registrations now, so the clean-up below keeps them
    calls: list = []
    names = ("_C", "_cuda_backend")
    saved_attrs = {name: vars(sparsellm)[name] for name in names if name in vars(sparsellm)}
    saved_modules = {f"sparsellm.{name}": sys.modules[f"sparsellm.{name}"] for name in names
                     if f"sparsellm.{name}" in sys.modules}
    saved_loaded, saved_errors = dict(ops._loaded), dict(ops._load_errors)
    saved_cuda = {op: impls["cuda"] for op, impls in ops._registry.items() if "cuda" in impls}
    for name in names:
        vars(sparsellm).pop(name, None)
        sys.modules.pop(f"sparsellm.{name}", None)
    sys.modules["sparsellm._C"] = _fake_extension(calls)
    ops._loaded.pop("cuda", None)
    ops._load_errors.pop("cuda", None)
    triton_on = {"value": False}
    real_available = ops.available

    def available(backend, device=None):
        if backend == "cuda":
            return real_available("cuda", "cuda")  # the fake backend "runs" CPU tensors
        if backend == "triton" and not triton_on["value"]:
            return False
        if backend in ("cpu", "inductor"):  # the tensors stand for CUDA ones: no CPU-only backend
            return False
        return real_available(backend, device)

    monkeypatch.setattr(ops, "available", available)
    try:
        yield importlib.import_module("sparsellm._cuda_backend"), calls, triton_on
    finally:
        for name in names:
            vars(sparsellm).pop(name, None)
            sys.modules.pop(f"sparsellm.{name}", None)
        vars(sparsellm).update(saved_attrs)
        sys.modules.update(saved_modules)
        ops._loaded.clear()
        ops._loaded.update(saved_loaded)
        ops._load_errors.clear()
        ops._load_errors.update(saved_errors)
        for impls in ops._registry.values():
            impls.pop("cuda", None)
        for op, fn in saved_cuda.items():
            ops._registry[op]["cuda"] = fn


def _hinv(width):
    gram = torch.randn(3 * width, width, dtype=torch.float64)
    return reference.cholesky_inverse_upper(gram.T @ gram, 0.01)[0].float()


def test_cuda_handled_calls_reach_the_extension(fake_cuda):
    _, calls, _ = fake_cuda
    w = torch.randn(4, 128)
    _, used, fell = _forced_run("cuda", lambda: (ops.nm_prune_mask(w, 2, 4), ops.obs_prune_block(w, _hinv(128), 0.5),
                                                 ops.wanda_prune_mask(w, torch.rand(128) + 0.1, 0.5, 2, 4)))
    assert used == {"nm_prune_mask": {"cuda": 1}, "obs_prune_block": {"cuda": 1}, "wanda_prune_mask": {"cuda": 1}}
    assert fell == {} and calls == ["nm_mask", "obs_prune_block", "nm_mask"]


def test_cuda_wide_obs_block_goes_to_the_reference(fake_cuda):
    _, calls, _ = fake_cuda  # triton off: the next backend is the reference
    w, hinv = torch.randn(3, 300), _hinv(300)
    (q, _, _), used, fell = _forced_run("cuda", lambda: ops.obs_prune_block(w, hinv, 0.5))
    assert used == {"obs_prune_block": {"reference": 1}}
    assert fell == {"obs_prune_block": {"cuda->reference: width 300 > 256": 1}}
    assert calls == [] and torch.equal(q, reference.obs_prune_block(w, hinv, 0.5)[0])


def test_cuda_wide_obs_block_goes_to_triton(fake_cuda):
    pytest.importorskip("triton")
    _, calls, triton_on = fake_cuda
    triton_on["value"] = True
    w, hinv = torch.randn(2, 260), _hinv(260)
    _, used, fell = _forced_run("cuda", lambda: ops.obs_prune_block(w, hinv, 0.5))
    assert used == {"obs_prune_block": {"triton": 1}}
    assert fell == {"obs_prune_block": {"cuda->triton: width 260 > 256": 1}} and calls == []


def test_cuda_unstructured_wanda_goes_to_triton(fake_cuda):
    pytest.importorskip("triton")
    _, calls, triton_on = fake_cuda
    triton_on["value"] = True
    w, norm = torch.randn(4, 40), torch.rand(40) + 0.1
    mask, used, fell = _forced_run("cuda", lambda: ops.wanda_prune_mask(w, norm, 0.5))
    assert used == {"wanda_prune_mask": {"triton": 1}}
    assert fell == {"wanda_prune_mask": {"cuda->triton: unstructured": 1}} and calls == []
    assert torch.equal(mask.sum(1), torch.full((4,), 20))


def test_cuda_unstructured_wanda_without_triton_goes_to_the_reference(fake_cuda):
    _, calls, _ = fake_cuda
    w, norm = torch.randn(4, 40), torch.rand(40) + 0.1
    mask, used, fell = _forced_run("cuda", lambda: ops.wanda_prune_mask(w, norm, 0.5))
    assert used == {"wanda_prune_mask": {"reference": 1}}
    assert fell == {"wanda_prune_mask": {"cuda->reference: unstructured": 1}} and calls == []
    assert torch.equal(mask, reference.wanda_prune_mask(w, norm, 0.5))


@pytest.mark.parametrize("op", ["nm_prune_mask", "wanda_prune_mask"])
def test_cuda_wide_groups_are_declined_by_cuda_and_triton(fake_cuda, op):
    pytest.importorskip("triton")
    _, calls, triton_on = fake_cuda
    triton_on["value"] = True
    w = torch.randn(3, 64)
    call = {"nm_prune_mask": lambda: ops.nm_prune_mask(w, 7, 32),
            "wanda_prune_mask": lambda: ops.wanda_prune_mask(w, torch.rand(64) + 0.1, 0.5, 7, 32)}[op]
    _, used, fell = _forced_run("cuda", call)
    assert used == {op: {"reference": 1}}
    assert fell == {op: {"cuda->triton: m=32 > 16": 1, "triton->reference: m=32 > 16": 1}} and calls == []


def test_cuda_declines_before_calling_the_extension(fake_cuda):
    module, calls, _ = fake_cuda
    with pytest.raises(ops.Decline, match="width 300 > 256"):
        module.obs_prune_block(torch.randn(2, 300), torch.eye(300), 0.5)
    with pytest.raises(ops.Decline, match="m=32 > 16"):
        module.nm_prune_mask(torch.randn(2, 64), 7, 32)
    assert calls == []


def test_a_declining_reference_is_an_error(monkeypatch):
    def declines(*args):
        raise ops.Decline("never")
    monkeypatch.setitem(ops._registry["relu_z_step"], "reference", declines)
    with ops.backend_scope("reference"), pytest.raises(ops.Decline):  # (auto: inductor first, declining the small call)
        ops.relu_z_step(torch.randn(2), torch.randn(2), 1.0, 1.0)
    assert ops.usage() == {} and ops.fallbacks() == {}


# ------------------------------------------------------------------ backend_scope and api.run

def test_backend_scope_restores_on_exit_and_on_error():
    ops.set_backend("auto")
    with ops.backend_scope("reference") as name:
        assert name == "reference" == ops.get_backend()
    assert ops.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="boom"):
        with ops.backend_scope("reference"):
            raise RuntimeError("boom")
    assert ops.get_backend() == "auto"
    with ops.backend_scope(None):  # keep the current setting
        assert ops.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.backend_scope("tpu"):
            pass
    assert ops.get_backend() == "auto"


def test_api_run_forces_its_backend_for_the_run_only(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(api, "_run", lambda config: seen.append(ops.get_backend()) or {})
    ops.set_backend("auto")
    api.run(PruneConfig(backend="reference"))
    api.run(PruneConfig())  # a later auto run is not forced by the earlier one
    assert seen == ["reference", "auto"] and ops.get_backend() == "auto"
    monkeypatch.undo()
    # a run that fails early (the real _run) restores it too
    (tmp_path / "taken").write_text("x")
    with pytest.raises(FileExistsError):
        api.run(PruneConfig(backend="reference", save=str(tmp_path)))
    assert ops.get_backend() == "auto"


def test_the_report_carries_the_fallbacks():
    from sparsellm.report import build_report

    from helpers import tiny_llama

    model = tiny_llama(layers=1)
    fell = {"obs_prune_block": {"cuda->triton: width 300 > 256": 2}}
    report = build_report(PruneConfig(), model, [], dense_ppl={}, pruned_ppl={}, prune_seconds=0.0,
                          peak_memory={"host_max_rss": 1}, backend_usage={"obs_prune_block": {"triton": 2}},
                          backend_fallbacks=fell, export_info=None, version="0")
    assert report["backend_usage"] == {"obs_prune_block": {"triton": 2}} and report["backend_fallbacks"] == fell


@pytest.mark.parametrize("percdamp", [0.0, -0.01, float("nan"), float("inf")])
def test_dampening_must_be_positive(percdamp):
    """Failed factorisations are retried with the dampening raised tenfold, which from 0 (or
    below, or NaN) retries the same factorisation: refused before any backend runs."""
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    gram = x.T @ x / 40
    for fn in (ops.damped_cholesky, ops.cholesky_inverse_upper, reference.damped_cholesky):
        with pytest.raises(ValueError, match="percdamp must be positive"):
            fn(gram, percdamp)
