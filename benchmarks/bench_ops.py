"""Benchmarks of the hot operations, every backend present, at realistic shapes.

    pytest benchmarks/bench_ops.py                       # time them (pytest-benchmark)
    pytest benchmarks/bench_ops.py --benchmark-disable   # run each once (CI: seconds)

With a GPU: reference, triton and cuda backends (those available) at OPT-125m (768/3072),
LLaMA-2-7B (4096x4096, 11008x4096) and 8192-wide shapes; CUDA is synchronised inside the
timed function and warm-up rounds run first. Without a GPU the reference runs (and, for the
OBS block, the cpu backend's C sweep where it compiles), on tiny shapes (so collection and a --benchmark-disable run stay fast), unless
SPARSELLM_BENCH_CPU_FULL=1 asks for the realistic shapes on the CPU too. Each result
carries the effective bandwidth (GB/s: bytes that must at least be read and written) and,
where the work is arithmetic, GFLOP/s, in its extra_info.
"""
from __future__ import annotations

import os

import pytest
import torch

from sparsellm import ops, reference

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
FULL = HAS_CUDA or os.environ.get("SPARSELLM_BENCH_CPU_FULL") == "1"

# (rows, cols) of weight matrices: OPT-125m fc1/fc2, LLaMA-2-7B q/k/v/o and up/down, 8192-wide
MATRICES = [(3072, 768), (768, 3072), (4096, 4096), (11008, 4096), (8192, 8192)] if FULL else [(64, 256)]
GRAMS = [768, 3072, 4096, 8192] if FULL else [64]
OBS_ROWS = [768, 4096, 11008, 8192] if FULL else [64]
TOKENS_FEATURES = [(2048, 3072), (2048, 11008)] if FULL else [(64, 256)]


def _backends():
    out = ["reference"]
    for name in ("triton", "cuda"):
        if HAS_CUDA and ops.available(name, "cuda"):
            out.append(name)
    return out


BACKENDS = _backends()
# The OBS block also has the cpu backend (the C sweep) on a CPU; it sweeps unstructured blocks
# only (an N:M block's mask is chosen during the sweep: the reference does it).
OBS_CASES = [(b, p) for b in BACKENDS + (["cpu"] if not HAS_CUDA and ops.available("cpu", "cpu") else [])
             for p in [(2, 4), None] if not (b == "cpu" and p is not None)]


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _run(benchmark, backend, fn, *, bytes_moved=0, flops=0, rounds=None):
    def timed():
        out = fn()
        _sync()
        return out
    with ops.backend_scope(backend):
        result = benchmark.pedantic(timed, rounds=rounds or (10 if HAS_CUDA else 3),
                                    warmup_rounds=2 if HAS_CUDA else 1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        seconds = stats.stats.median
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
        if bytes_moved:
            benchmark.extra_info["GB/s"] = round(bytes_moved / seconds / 1e9, 2)
        if flops:
            benchmark.extra_info["GFLOP/s"] = round(flops / seconds / 1e9, 2)
    return result


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", MATRICES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), None], ids=["2:4", "4:8", "50%"])
def test_wanda_mask(benchmark, backend, shape, pattern):
    rows, cols = shape
    w = torch.randn(rows, cols, device=DEV, generator=_gen(0)).half()
    norm = torch.rand(cols, device=DEV, generator=_gen(1)) + 0.1
    n, m = pattern or (None, None)
    benchmark.group = f"wanda_mask {pattern or 'unstructured'}"
    mask = _run(benchmark, backend, lambda: ops.wanda_prune_mask(w, norm, 0.5, n, m),
                bytes_moved=w.numel() * (2 + 1) + cols * 4)
    assert mask.sum().item() == rows * cols // 2


@pytest.mark.parametrize("backend,pattern", OBS_CASES,
                         ids=[f"{b}-{'2:4' if p else '50%'}" for b, p in OBS_CASES])
@pytest.mark.parametrize("rows", OBS_ROWS)
def test_obs_prune_block(benchmark, backend, rows, pattern):
    B = 128 if FULL else 32
    x = torch.randn(4 * B, B, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hinv = reference.cholesky_inverse_upper(x.T @ x, 0.01)[0].float().to(DEV)
    w = torch.randn(rows, B, device=DEV, generator=_gen(3))
    n, m = pattern or (None, None)
    benchmark.group = f"obs_prune_block B={B} {pattern or 'unstructured'}"
    q, _, _ = _run(benchmark, backend, lambda: ops.obs_prune_block(w, hinv, 0.5, n, m),
                   bytes_moved=w.numel() * 4 * 3 + B * B * 4, flops=rows * B * B)  # B^2/2 FMAs per row
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", GRAMS)
def test_cholesky_inverse_upper(benchmark, backend, n):
    x = torch.randn(2 * n, n, device=DEV, generator=_gen(4))
    gram = x.T @ x
    benchmark.group = "cholesky_inverse_upper"
    upper, _ = _run(benchmark, backend, lambda: ops.cholesky_inverse_upper(gram, 0.01),
                    bytes_moved=2 * n * n * 4, flops=2 * n ** 3 / 3, rounds=5 if FULL else None)
    assert torch.isfinite(upper).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", TOKENS_FEATURES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("step", ["relu_z", "swiglu_z", "swiglu_s"])
def test_sparsellm_steps(benchmark, backend, shape, step):
    t = [torch.randn(*shape, device=DEV, generator=_gen(10 + i)) for i in range(4)]
    fn, inputs = {
        "relu_z": (lambda: ops.relu_z_step(t[0], t[1], 0.5, 2.0), 2),
        "swiglu_z": (lambda: ops.swiglu_z_step(t[0], t[1], t[2], 0.5, 2.0), 3),
        "swiglu_s": (lambda: ops.swiglu_s_step(t[0], t[1], t[2], t[3], 0.5, 2.0, 5), 4),
    }[step]
    benchmark.group = f"sparsellm {step}"
    out = _run(benchmark, backend, fn, bytes_moved=t[0].numel() * 4 * (inputs + 1))
    assert torch.isfinite(out).all()
