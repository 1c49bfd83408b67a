"""The inductor backend (sparsellm/_inductor_backend.py): SparseLLM's element-wise steps compiled
by torch.compile from the reference's own functions, against the eager reference; when ops
picks it and when it declines."""
import pytest
import torch

from sparsellm import ops, reference

# plain import, not importorskip: the module needs only torch, so an ImportError is a bug
from sparsellm import _inductor_backend as inductor  # noqa: E402


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def small_calls_compile(monkeypatch):
    """Let small inputs compile (one compilation per step, dynamic shapes: about 10-30 s)."""
    monkeypatch.setattr(inductor, "MIN_ELEMENTS", 1)
    monkeypatch.setitem(inductor._state, "broken", None)


def test_compiled_steps_match_the_reference(small_calls_compile):
    """Fresh random inputs, two shapes (one compilation each: dynamic shapes), penalties that
    change between calls (0-d tensors: no recompilation), results equal to the eager reference
    up to float32 rounding order."""
    for rows, seed in ((37, 1), (129, 2)):
        s, g, p, z = (_rand(rows, 48, seed=seed * 10 + i) for i in range(4))
        m = _rand(rows, 48, seed=seed * 10 + 5)
        for alpha, gamma in ((0.7, 1.3), (2.0, 0.25)):
            want = reference.swiglu_s_step(s, g, p, z, alpha, gamma, 2)
            got = inductor.swiglu_s_step(s, g, p, z, alpha, gamma, 2)
            assert not torch.equal(want, s)  # the step moved s: the comparison is not on the input
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(inductor.swiglu_z_step(p, m, s, alpha, gamma),
                                       reference.swiglu_z_step(p, m, s, alpha, gamma), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(inductor.relu_z_step(p, m, alpha, gamma),
                                       reference.relu_z_step(p, m, alpha, gamma), rtol=1e-6, atol=1e-6)
    # the s-step never raises the objective (the reference's safeguard, compiled too)
    f0 = reference.swiglu_s_objective(s, g, p, z, 2.0, 0.25)
    f1 = reference.swiglu_s_objective(inductor.swiglu_s_step(s, g, p, z, 2.0, 0.25, 2), g, p, z, 2.0, 0.25)
    assert (f1 <= f0).all() and (f1 < f0).any()


def test_mixed_dtypes_compile_in_the_promoted_dtype(small_calls_compile):
    """A float32 input with a float64 one: computed in float64 throughout, penalties included,
    as the reference computes it (penalties rounded to the first input's float32 moved the
    result by about 1e-8, far above float64 rounding)."""
    p, m = _rand(37, 48, seed=61), _rand(37, 48, seed=62).double()
    got, want = inductor.relu_z_step(p, m, 0.7, 1.3), reference.relu_z_step(p, m, 0.7, 1.3)
    assert got.dtype == want.dtype == torch.float64 and not torch.equal(want, m)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("omega", [1.6, 1.0])
def test_compiled_aux_updates_match_the_reference(small_calls_compile, omega):
    """SparseLLM's whole auxiliary update (steps, relaxation, squared norms) compiled into one
    loop equals the eager reference on fresh random inputs: z and s up to float32 rounding (the
    compiled code orders its arithmetic its own way), the norms float64 0-d tensors within the
    float32 sums' order (1e-5 relative)."""
    for rows, seed in ((37, 1), (129, 2)):
        p, m, g, z_old, s_old = (_rand(rows, 48, seed=seed * 10 + i) for i in range(5))
        for alpha_z, alpha_s, gamma in ((0.7, 0.4, 1.3), (2.0, 3.0, 0.25)):
            runs = [(reference.swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, 2),
                     inductor.swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, 2), 2),
                    (reference.relu_aux_update(p, m, z_old, alpha_z, gamma, omega),
                     inductor.relu_aux_update(p, m, z_old, alpha_z, gamma, omega), 1)]
            for want, got, n_tensors in runs:
                assert not torch.equal(want[0], z_old)  # the update moved z: not compared on its input
                for w, o in zip(want[:n_tensors], got[:n_tensors]):
                    torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)
                for w, o in zip(want[n_tensors:], got[n_tensors:]):
                    assert o.dtype == w.dtype == torch.float64 and o.dim() == 0
                    assert float(w) > 0 and float(o) == pytest.approx(float(w), rel=1e-5)


def test_ops_picks_inductor_for_large_cpu_calls_and_the_reference_for_small_ones(small_calls_compile,
                                                                                 monkeypatch):
    monkeypatch.setattr(inductor, "MIN_ELEMENTS", 1000)
    ops.reset_usage()
    with ops.backend_scope("auto"):
        ops.relu_z_step(_rand(40, 50, seed=1), _rand(40, 50, seed=2), 1.0, 2.0)  # 2000 elements
        ops.relu_z_step(_rand(4, 50, seed=3), _rand(4, 50, seed=4), 1.0, 2.0)    # 200
    assert ops.usage()["relu_z_step"] == {"inductor": 1, "reference": 1}
    assert ops.fallbacks()["relu_z_step"] == {
        "inductor->reference: fewer than 1000 elements: eager is cheaper than compiling": 1}
    with ops.backend_scope("reference"):
        ops.reset_usage()
        ops.relu_z_step(_rand(40, 50, seed=1), _rand(40, 50, seed=2), 1.0, 2.0)
    assert ops.usage()["relu_z_step"] == {"reference": 1}


def test_a_failing_compiler_declines_every_later_call(small_calls_compile, monkeypatch):
    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler here")
        return fails
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setitem(inductor._state, "compiled", {})
    p, m = _rand(6, 7, seed=1), _rand(6, 7, seed=2)
    ops.reset_usage()
    with ops.backend_scope("auto"):
        got = ops.relu_z_step(p, m, 1.0, 2.0)
        ops.relu_z_step(p, m, 1.0, 2.0)
    assert torch.equal(got, reference.relu_z_step(p, m, 1.0, 2.0))
    assert ops.usage()["relu_z_step"] == {"reference": 2}
    (reason, count), = ops.fallbacks()["relu_z_step"].items()
    assert count == 2 and "no C++ compiler here" in reason and reason.startswith("inductor->reference: torch.compile failed")
    with pytest.raises(ops.Decline, match="not a CPU tensor"):
        inductor.relu_z_step(p.to("meta"), m.to("meta"), 1.0, 2.0)


def test_shapes_that_do_not_broadcast_are_the_callers_error_not_a_broken_compiler(small_calls_compile):
    """Before, any error inside the compiled call marked the compiler broken for the process, and
    every later call of every step ran on the reference."""
    with pytest.raises(RuntimeError, match="broadcast"):
        inductor.relu_z_step(_rand(6, 7, seed=1), _rand(6, 5, seed=2), 1.0, 2.0)
    assert inductor._state["broken"] is None


def test_float16_calls_go_to_the_reference_which_computes_them_in_float32(small_calls_compile):
    """Compiled in float16, the 0-d penalties would be float16 (3e-9 rounds to 0)."""
    p, m = _rand(8, 16, seed=1).half(), _rand(8, 16, seed=2).half()
    with pytest.raises(ops.Decline, match="float32"):
        inductor.relu_z_step(p, m, 3e-9, 2e-9)


def test_a_call_out_of_cpu_memory_is_declined_without_marking_the_compiler_broken(small_calls_compile,
                                                                                     monkeypatch):
    """torch's CPU allocator reports a failed allocation as a RuntimeError ("DefaultCPUAllocator:
    can't allocate memory"), not torch.OutOfMemoryError: one call too large for the memory left
    marked the compiler broken, and every later call of every step ran on the reference."""
    def compiled_out_of_memory(fn, **kwargs):
        def allocates(*args):
            return torch.empty(1 << 60, dtype=torch.uint8)  # more than any machine: the allocator's own error
        return allocates
    monkeypatch.setattr(torch, "compile", compiled_out_of_memory)
    monkeypatch.setitem(inductor._state, "compiled", {})
    p, m = _rand(6, 7, seed=1), _rand(6, 7, seed=2)
    with pytest.raises(ops.Decline, match="out of memory"):
        inductor.relu_z_step(p, m, 1.0, 2.0)
    assert inductor._state["broken"] is None
    ops.reset_usage()
    with ops.backend_scope("auto"):
        got = ops.relu_z_step(p, m, 1.0, 2.0)
    assert torch.equal(got, reference.relu_z_step(p, m, 1.0, 2.0))
    assert ops.usage()["relu_z_step"] == {"reference": 1}
    (reason, count), = ops.fallbacks()["relu_z_step"].items()
    assert count == 1 and reason.startswith("inductor->reference: out of memory")


@pytest.mark.parametrize("omega", [1.6, 1.0])
def test_aux_updates_of_mixed_dtypes_go_to_the_reference(small_calls_compile, omega):
    """The reference computes z in the promoted dtype of the z-step's inputs and relaxes it from
    z_old with torch.lerp, which refuses another dtype (omega != 1), or returns that z as it is
    (omega == 1). Compiled with z_old promoted among them, a float64 z_old made a float64 z: a
    result where the reference raises, and another dtype where it does not."""
    p, m, g, s_old = (_rand(6, 7, seed=70 + i) for i in range(4))
    z_old = _rand(6, 7, seed=75).double()
    calls = {"relu_aux_update": (p, m, z_old, 0.7, 1.3, omega),
             "swiglu_aux_update": (p, m, g, z_old, s_old, 0.7, 0.4, 1.3, omega, 2)}
    for op, args in calls.items():
        with pytest.raises(ops.Decline, match="mixed dtypes"):
            getattr(inductor, op)(*args)
        ops.reset_usage()
        with ops.backend_scope("auto"):
            if omega != 1:
                with pytest.raises(RuntimeError, match="dtype"):
                    getattr(ops, op)(*args)
            else:
                got, want = getattr(ops, op)(*args), getattr(reference, op)(*args)
                assert got[0].dtype == want[0].dtype == torch.float32
                assert all(torch.equal(a, b) for a, b in zip(got, want))
                assert ops.usage()[op] == {"reference": 1}
