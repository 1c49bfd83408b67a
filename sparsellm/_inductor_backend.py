"""The ``inductor`` backend of :mod:`sparsellm.ops`: SparseLLM's element-wise steps on CPU
tensors, compiled by ``torch.compile`` (TorchInductor's C++ code generation) from the very
functions of :mod:`sparsellm.reference`, so the reference stays their spec.

Why: in eager PyTorch each of the s-step's ~100 tensor operations per element is a separate
pass over memory; on the 2-core CPU the s-step (2 safeguarded Newton iterations) took 0.34 s on
one [5461, 1536] chunk of the default model, about a third of SparseLLM's FFN solver time. The
compiled step fuses them into one loop: 0.04 s on that chunk, with the same floats bit for bit
(tests/test_inductor_backend.py checks equality on fresh random inputs).

Compiling costs about 10-30 s once per process (TorchInductor caches its C++ on disk, so later
processes pay less): calls below :data:`MIN_ELEMENTS` are declined (ops then runs the
reference), so small models and the test suite never compile. Shapes are dynamic and the
penalties are passed as 0-d tensors, so one compilation serves every chunk size and every
layer. Where compiling fails (no C++ compiler, an unsupported platform) the first failure is
recorded and every call declines with that reason (``ops.fallbacks()`` shows it).

Registered: relu_z_step, swiglu_z_step, swiglu_s_step, and SparseLLM's whole auxiliary update
of a token chunk (relu_aux_update, swiglu_aux_update: the steps, the relaxation and the
objective's squared norms in one compiled loop, where the eager sequence made about a dozen
passes over memory and as many chunk-sized allocations). CUDA tensors are declined (the triton
backend has kernels for them).
"""
from __future__ import annotations

import torch

from . import ops, reference

# Below this many elements per call the eager reference is cheaper than a first compilation
# (the default model's chunks are 8.4M elements; tiny test models stay far below).
MIN_ELEMENTS = 1 << 20

_state = {"broken": None, "compiled": {}}


def _compiled(name: str, fn):
    if name not in _state["compiled"]:
        _state["compiled"][name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _state["compiled"][name]


def _run(name: str, fn, tensors: tuple, scalars: tuple, *extra):
    first = tensors[0]
    if first.device.type != "cpu":
        raise ops.Decline("not a CPU tensor")
    if first.numel() < MIN_ELEMENTS:
        raise ops.Decline(f"fewer than {MIN_ELEMENTS} elements: eager is cheaper than compiling")
    if _state["broken"] is not None:
        raise ops.Decline(_state["broken"])
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        # the reference computes these in float32 (reference._blockwise); compiled in their own
        # dtype, the penalties would be rounded to it (1e-9 is 0 in float16)
        raise ops.Decline(f"{first.dtype}: the reference computes it in float32")
    # the caller's mistake is an error here, as in the reference, and not a compile failure
    # that would send every later call of every step to the reference
    torch.broadcast_shapes(*(t.shape for t in tensors))
    # mixed inputs computed in their promoted dtype throughout, penalties included, as the
    # reference computes them (reference._blockwise): a float64 call's scalars in the first
    # input's float32 would round them
    dtype, tensors = reference.promoted(tensors)
    # 0-d tensors, not Python floats: a float would be baked into the compiled code, and every
    # layer's penalties would compile anew
    scalar_tensors = tuple(torch.tensor(float(v), dtype=dtype) for v in scalars)
    try:
        return _compiled(name, fn)(*tensors, *scalar_tensors, *extra)
    except (MemoryError, torch.OutOfMemoryError) as exc:  # this call's size, not the compiler
        raise ops.Decline(f"out of memory: {exc}"[:300]) from exc
    except Exception as exc:  # noqa: BLE001 - any compile failure means: run the reference
        if isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc):
            # torch's CPU allocator fails with a plain RuntimeError ("DefaultCPUAllocator: can't
            # allocate memory"), not OutOfMemoryError: this call's size too, not the compiler
            raise ops.Decline(f"out of memory: {exc}"[:300]) from exc
        _state["broken"] = f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
        raise ops.Decline(_state["broken"]) from exc


def relu_z_step(p, m, alpha, gamma):
    return _run("relu_z", reference._relu_z, (p, m), (alpha, gamma))


def swiglu_z_step(p, m, s, alpha, gamma):
    return _run("swiglu_z", reference._swiglu_z, (p, m, s), (alpha, gamma))


def swiglu_s_step(s, g, p, z, alpha, gamma, iterations=5):
    return _run("swiglu_s", reference._swiglu_s, (s, g, p, z), (alpha, gamma), int(iterations))


def _one_dtype(*tensors):
    # The reference computes each step in the promoted dtype of its own inputs and relaxes it from
    # z_old (s_old) with torch.lerp, which refuses another dtype; compiled in the dtype of all of
    # them together, a mixed call gave a result where the reference raises, or (omega == 1)
    # another dtype than its. Declined: the reference does what it does.
    if len({t.dtype for t in tensors}) > 1:
        raise ops.Decline("mixed dtypes: the reference computes the steps and the relaxation apart")


def relu_aux_update(p, m, z_old, alpha, gamma, omega):
    _one_dtype(p, m, z_old)
    return reference.widen_sums(_run("relu_aux", reference._relu_aux, (p, m, z_old), (alpha, gamma, omega),
                                     omega != 1), 2)


def swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, iterations=2):
    _one_dtype(p, m, g, z_old, s_old)
    return reference.widen_sums(_run("swiglu_aux", reference._swiglu_aux, (p, m, g, z_old, s_old),
                                     (alpha_z, alpha_s, gamma, omega), int(iterations), omega != 1), 3)


for _name, _fn in {"relu_z_step": relu_z_step, "swiglu_z_step": swiglu_z_step,
                   "swiglu_s_step": swiglu_s_step, "relu_aux_update": relu_aux_update,
                   "swiglu_aux_update": swiglu_aux_update}.items():
    ops.register(_name, "inductor", _fn)
