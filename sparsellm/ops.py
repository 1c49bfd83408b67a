"""The one dispatch point for the hot operations.

Every method calls the functions of this module, never a backend directly. Per call, the
backend is chosen among:

- ``cuda``: the compiled extension ``sparsellm._C`` (``csrc/``), CUDA tensors only;
- ``triton``: the Triton kernels (``kernels/``, installed as ``sparsellm.kernels``, registered
  by :mod:`sparsellm._triton_backend`), CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` is set before import;
- ``cpu``: the OBS sweep of a column block in C (``csrc/obs_sweep_cpu.c``, compiled on first
  use with the system C compiler: :mod:`sparsellm._cpu_backend`), float32 CPU tensors;
- ``inductor``: the reference's element-wise SparseLLM steps compiled by ``torch.compile``
  (:mod:`sparsellm._inductor_backend`), CPU tensors of at least a million elements;
- ``reference``: plain PyTorch (:mod:`sparsellm.reference`), always available.

``auto`` (default) takes the first available of cuda, triton, cpu, inductor, reference for the
tensor's device: on a CPU tensor, cpu or inductor (where they have the operation and take the
call) or the reference. The user can force one with
:func:`set_backend` (or, for a block of code, :func:`backend_scope`), the
``SPARSELLM_BACKEND`` environment variable, or ``--backend``. Forcing a backend that is not
available is an error.

Operations: the pruning steps (``obs_prune_block``/``obs_prune``, ``cholesky_inverse_upper``,
``damped_cholesky``, ``spd_solve``, ``nm_prune_mask``, ``row_prune_mask``, ``flat_prune_mask``,
``wanda_prune_mask``, ``relu_z_step``, ``swiglu_z_step``, ``swiglu_s_step``, and SparseLLM's whole
auxiliary update of a token chunk, ``relu_aux_update`` and ``swiglu_aux_update``) and the sparse
inference products ``nm24_linear`` (2:4-packed weight) and ``sell_linear`` (sliced ELLPACK),
which :class:`sparsellm.export.sparse_gpu.SparseGPULinear` calls for small token counts (only
the triton backend implements these two, so ops never loads the CUDA extension for them).

An operation the chosen backend does not implement, or a call it does not handle (an
implementation raises :class:`Decline` before computing anything: a block too wide for the
CUDA sweep, float64 for an fp32 kernel, ...), goes to the next backend in the order cuda,
triton, cpu, inductor, reference. No backend calls another one for an operation it declines, so
:func:`usage` records the backend that actually computed each call, and :func:`fallbacks`
why the ones before it declined.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from collections import Counter
from typing import Callable, Iterator

import torch

from . import reference

BACKENDS = ("auto", "cuda", "triton", "cpu", "inductor", "reference")
_ORDER = ("cuda", "triton", "cpu", "inductor", "reference")


class BackendUnavailable(RuntimeError):
    pass


class Decline(NotImplementedError):
    """Raised by a backend's implementation of an operation, before it computes anything, for a
    call it does not handle; the message is the reason (short: it is a key of
    :func:`fallbacks`). ops then runs the next backend. Called directly, outside ops, the
    implementation simply refuses the call with this error."""


# Operations whose only fast backends are known: the others are skipped for them, never loaded
# on their account (the CUDA extension compiles on first use, about a minute, where a toolkit
# is found: an inference-only run of the Triton decode kernels must not pay for it).
_FAST_BACKENDS = {"nm24_linear": ("triton",), "sell_linear": ("triton",)}

_state = {"backend": os.environ.get("SPARSELLM_BACKEND", "auto").lower()}
_registry: dict[str, dict[str, Callable]] = {}
_usage: Counter = Counter()
_fallbacks: Counter = Counter()
_loaded: dict[str, bool] = {}
_load_errors: dict[str, str] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    """Backends call this at import time for each operation they implement."""
    _registry.setdefault(op, {})[backend] = fn


def set_backend(name: str) -> None:
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name not in ("auto", "reference"):
        _ensure_loaded(name)
        if not _loaded[name]:
            raise BackendUnavailable(f"backend {name!r} is not available: {_load_errors.get(name, 'not installed')}")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def backend_scope(name: str | None) -> Iterator[str]:
    """Use backend ``name`` inside the block (``None``: keep the current setting), and restore
    the setting from before the block on the way out, exceptions included."""
    before = _state["backend"]
    try:
        if name is not None:
            set_backend(name)
        yield _state["backend"]
    finally:
        _state["backend"] = before


def _nested(counter: Counter) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (op, key), count in counter.items():
        out.setdefault(op, {})[key] = count
    return out


def usage() -> dict[str, dict[str, int]]:
    """{operation: {backend: calls}}: the backend that computed each call (after any declines),
    since the last :func:`reset_usage`."""
    return _nested(_usage)


def fallbacks() -> dict[str, dict[str, int]]:
    """{operation: {"declining->next: reason": calls}}: each time a backend declined a call,
    since the last :func:`reset_usage`."""
    return _nested(_fallbacks)


def reset_usage() -> None:
    _usage.clear()
    _fallbacks.clear()


def _ensure_loaded(backend: str) -> None:
    if backend in _loaded:
        return
    module = {"cuda": "sparsellm._cuda_backend", "triton": "sparsellm._triton_backend",
              "cpu": "sparsellm._cpu_backend", "inductor": "sparsellm._inductor_backend"}[backend]
    try:
        importlib.import_module(module)
        _loaded[backend] = True
    except Exception as exc:  # a missing or broken backend must never break the package
        _loaded[backend] = False
        _load_errors[backend] = f"{type(exc).__name__}: {exc}"


def available(backend: str, device: torch.device | str | None = None) -> bool:
    """Whether ``backend`` can run on tensors of ``device``."""
    if backend == "reference":
        return True
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if backend in ("cpu", "inductor"):  # CPU tensors only: not even loaded for others
        if device_type != "cpu":
            return False
        _ensure_loaded(backend)
        return _loaded[backend]
    _ensure_loaded(backend)
    if not _loaded[backend]:
        return False
    if device_type == "cuda":
        return True
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _candidates(op: str, device: torch.device) -> Iterator[tuple[str, Callable]]:
    """The implementations to try for ``op`` on ``device``, in order, the reference last; a
    backend is only loaded when the ones before it declined or lack the operation."""
    forced = _state["backend"]
    if forced not in BACKENDS:  # set_backend checks its argument: only the variable can get here
        raise ValueError(f"SPARSELLM_BACKEND={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    if forced == "reference":
        names = ["reference"]
    elif forced == "auto":
        names = list(_ORDER) if device.type == "cuda" else ["cpu", "inductor", "reference"]
    else:
        if not available(forced, device):
            raise BackendUnavailable(
                f"backend {forced!r} cannot run on {device.type} tensors"
                + (f" ({_load_errors[forced]})" if forced in _load_errors else ""))
        names = list(_ORDER[_ORDER.index(forced):])
    fast = _FAST_BACKENDS.get(op)
    for name in names:
        if fast is not None and name != "reference" and name not in fast:
            continue
        if name == "reference" or available(name, device):  # loads the backend: it registers
            fn = _registry.get(op, {}).get(name)
            if fn is not None:
                yield name, fn


def _call(op: str, device: torch.device, *args, **kwargs):
    declined = None  # (backend, reason) of the last backend that declined this call
    for backend, fn in _candidates(op, device):
        if declined is not None:
            _fallbacks[(op, f"{declined[0]}->{backend}: {declined[1]}")] += 1
        try:
            result = fn(*args, **kwargs)
        except Decline as why:
            if backend == "reference":  # the reference handles every call: a bug, not a fallback
                raise
            declined = (backend, str(why))
            continue
        _usage[(op, backend)] += 1
        return result
    raise KeyError(f"no reference implementation of {op!r}")  # the reference always registers


# ---- the operations (signatures and meaning: see sparsellm.reference) -------------------


def obs_prune_block(weight, hinv, fraction, n=None, m=None, prune_mask=None):
    if prune_mask is None:
        reference.check_nm_width(weight.shape[1], n, m)
    return _call("obs_prune_block", weight.device, weight, hinv, fraction, n, m, prune_mask)


def obs_prune(weight, hinv_upper, fraction, n=None, m=None, blocksize=128):
    """Blocked OBS sweep; the block operation is dispatched, the lazy updates are matmuls."""
    def block_fn(w, h, f, nn, mm):
        return obs_prune_block(w, h, f, nn, mm)
    return reference.obs_prune(weight, hinv_upper, fraction, n, m, blocksize, block_fn=block_fn)


def cholesky_inverse_upper(gram, percdamp):
    reference.check_percdamp(percdamp)  # before any backend: each retries by raising it tenfold
    return _call("cholesky_inverse_upper", gram.device, gram, percdamp)


def damped_cholesky(gram, percdamp):
    reference.check_percdamp(percdamp)
    return _call("damped_cholesky", gram.device, gram, percdamp)


def spd_solve(matrix, rhs, percdamp=0.0):
    return _call("spd_solve", matrix.device, matrix, rhs, percdamp)


def nm_prune_mask(score, n, m):
    return _call("nm_prune_mask", score.device, score, n, m)


def row_prune_mask(score, k):
    return _call("row_prune_mask", score.device, score, k)


def flat_prune_mask(score, k):
    return _call("flat_prune_mask", score.device, score, k)


def wanda_prune_mask(weight, in_norm, fraction, n=None, m=None):
    return _call("wanda_prune_mask", weight.device, weight, in_norm, fraction, n, m)


def relu_z_step(p, m, alpha, gamma):
    return _call("relu_z_step", p.device, p, m, alpha, gamma)


def swiglu_z_step(p, m, s, alpha, gamma):
    return _call("swiglu_z_step", p.device, p, m, s, alpha, gamma)


def swiglu_s_step(s, g, p, z, alpha, gamma, iterations=5):
    return _call("swiglu_s_step", s.device, s, g, p, z, alpha, gamma, iterations)


def relu_aux_update(p, m, z_old, alpha, gamma, omega):
    return _call("relu_aux_update", p.device, p, m, z_old, alpha, gamma, omega)


def swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, iterations=2):
    return _call("swiglu_aux_update", p.device, p, m, g, z_old, s_old, alpha_z, alpha_s, gamma, omega, iterations)


def nm24_linear(x, values, meta, in_features, bias=None):
    """y = x @ W^T (+ bias) for a 2:4-packed W (:func:`sparsellm.reference.nm24_pack`)."""
    return _call("nm24_linear", x.device, x, values, meta, in_features, bias)


def sell_linear(x, values, cols, slice_ptr, out_features, in_features, slice_rows, bias=None):
    """y = x @ W^T (+ bias) for a sliced-ELLPACK W (:func:`sparsellm.reference.sell_pack`)."""
    return _call("sell_linear", x.device, x, values, cols, slice_ptr, out_features, in_features, slice_rows, bias)


for _op in ("obs_prune_block", "cholesky_inverse_upper", "damped_cholesky", "spd_solve", "nm_prune_mask",
            "row_prune_mask", "flat_prune_mask", "wanda_prune_mask", "relu_z_step", "swiglu_z_step",
            "swiglu_s_step", "relu_aux_update", "swiglu_aux_update", "nm24_linear", "sell_linear"):
    register(_op, "reference", getattr(reference, _op))
