"""GPU kernel time of a decode-size call, free of the host's launch cost.

``triton.testing.do_bench`` flushes L2 by zeroing a 256 MB buffer before each timed call and
times the call with CUDA events. A call whose Python launch path (ops dispatch, the Triton
launcher) takes longer on the host than that flush takes on the GPU (about 55 us on an H200)
is timed waiting for its own launch: on one H200 machine the same one-token kernel timed
12-16 us in one run and 48-76 us in the next, depending on the config at random (commit
4721ae8, benchmarks/RESULTS.md). :func:`kernel_us` flushes with a 1 GiB buffer (about 220 us of
GPU work, so the host is far ahead when the call starts) and takes the median over ``reps``.
"""
from __future__ import annotations

import torch

FLUSH_BYTES = 1 << 30
_flush: dict = {}


def kernel_us(fn, reps: int = 50, warmup: int = 3) -> float:
    """Median GPU time (microseconds) of ``fn()``, L2 flushed before each call."""
    device = torch.cuda.current_device()
    if device not in _flush:
        _flush[device] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    buf = _flush[device]
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        buf.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2] * 1e3
