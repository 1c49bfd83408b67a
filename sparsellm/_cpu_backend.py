"""The ``cpu`` backend of :mod:`sparsellm.ops`: the OBS sweep of a column block on CPU tensors,
in C (``csrc/obs_sweep_cpu.c``), compiled on first use and loaded with ctypes.

Why: the reference sweep runs about seven PyTorch operations per column of a block, and on the
2-core CPU each costs several microseconds of dispatch, more than its arithmetic: a 128-column
block of a 1536-row weight took ~18 ms, of which the column loop ~15 ms. The C loop does the
same arithmetic in one call (~2 ms there; the mask selection, torch's topk as in the
reference, stays). SparseGPT sweeps about 5,000 columns per decoder layer of the default
model, SparseLLM about 14,600 (its W-steps prune the FFN once per iteration).

Equal to the reference bit for bit where torch's rank-1 update rounds each product before the
subtraction (MKL on x86-64 does; tests/test_cpu_backend.py checks it there): the C code does
the same operations in the same order and is compiled with ``-ffp-contract=off``.

Compiling: the system C compiler (``$CC``, else ``cc``), ``-O3 -ffp-contract=off``, no
``-march`` (the library may sit in a cache shared by machines), in well under a second; the
library is cached under :func:`sparsellm._extension.cache_root` keyed by a hash of the source
and the flags, written to a temporary name and renamed, so an interrupted compile leaves
nothing half-written. Without a compiler (or if it fails) importing this module raises
ImportError with the reason, which ops records: the backend is unavailable and the reference
runs. ``SPARSELLM_JIT=0`` turns compiling off here too.

Declined (ops runs the next backend): tensors not on the CPU, dtypes other than float32, and
N:M blocks without a given mask (their mask is chosen group by group during the sweep).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import ops, reference
from ._extension import JIT_ENV, _OFF, cache_root, csrc_dir

SOURCE_NAME = "obs_sweep_cpu.c"
CFLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
# Blocks with fewer weight rows than this are swept by one thread: below it, handing half to a
# second thread costs about as much as it saves.
MIN_ROWS_PER_THREAD = 256
# The C code's row tile (csrc/obs_sweep_cpu.c): threads get whole tiles.
TILE_ROWS = 64


def _source() -> Path:
    src = csrc_dir()
    if src is None or not (src / SOURCE_NAME).is_file():
        raise ImportError(f"the CPU kernels' source {SOURCE_NAME} is not installed (sparsellm/csrc)")
    return src / SOURCE_NAME


def _compiler() -> list[str]:
    """$CC as a command, its program found on PATH: it may carry a launcher or flags ("ccache
    gcc", "gcc -m64"), as make and setuptools take it."""
    words = shlex.split(os.environ.get("CC", "")) or ["cc"]
    path = shutil.which(words[0])
    if path is None:
        raise ImportError(f"no C compiler: {words[0]!r} is not on PATH (set CC)")
    return [path, *words[1:]]


def library_path(source: Path, compiler: list[str]) -> Path:
    """Where the compiled library of ``source`` lives: keyed by the source, the flags, the
    compiler and the machine's architecture."""
    digest = hashlib.sha256(source.read_bytes() + b"\0" + " ".join(CFLAGS).encode() + b"\0" + " ".join(compiler).encode())
    tag = f"{sys.platform}-{platform.machine()}-{digest.hexdigest()[:16]}"
    return cache_root() / "cpu" / f"obs_sweep_cpu-{tag}.so"


def compile_library(source: Path, compiler: list[str], target: Path) -> Path:
    """Compile ``source`` into ``target`` (atomically: a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *CFLAGS, str(source), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0][:300]
            raise ImportError(f"compiling {source.name} with {' '.join(compiler)} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library() -> ctypes.CDLL:
    """The compiled sweep, compiled first if it is not cached; ImportError with the reason."""
    if os.environ.get(JIT_ENV, "").strip().lower() in _OFF:
        raise ImportError(f"{JIT_ENV}={os.environ[JIT_ENV]}: the CPU kernels are not compiled")
    source, compiler = _source(), _compiler()
    path = library_path(source, compiler)
    if not path.exists():
        compile_library(source, compiler, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        # a cached library this machine cannot load (damaged, or written by another system
        # sharing the cache): compiled again in its place, once
        compile_library(source, compiler, path)
        lib = ctypes.CDLL(str(path))
    fn = lib.sparsellm_obs_sweep_f32
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    # work_t, mask_t, hinv, hinv_stride, err_t, losses, rows, width, row_begin, row_end
    fn.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64]
    fn.restype = None
    return lib


_sweep = load_library().sparsellm_obs_sweep_f32
# ctypes releases the GIL during the call, so threads sweep their rows in parallel. One pool per
# process: a forked child does not inherit the parent's threads, so it makes its own.
_pools: dict[int, tuple[ThreadPoolExecutor, int]] = {}  # pid -> (pool, its worker count)


def _pool(workers: int) -> ThreadPoolExecutor:
    pool, size = _pools.get(os.getpid(), (None, 0))
    if pool is None or size < workers:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsellm-obs")
        _pools[os.getpid()] = (pool, workers)
    return pool


def obs_prune_block(weight, hinv, fraction, n=None, m=None, prune_mask=None):
    """:func:`sparsellm.reference.obs_prune_block`, the column loop in C."""
    if weight.device.type != "cpu":
        raise ops.Decline("not a CPU tensor")
    # ops dispatches on the weight's device, but the C code reads the factor and the mask through
    # host pointers too: one on another device (a CUDA mask) would crash the process there. The
    # reference refuses the mixed devices with its usual error.
    for name, tensor in (("hinv", hinv), ("prune_mask", prune_mask)):
        if tensor is not None and tensor.device.type != "cpu":
            raise ops.Decline(f"{name} is not on the CPU")
    if weight.dtype != torch.float32 or hinv.dtype != torch.float32:
        raise ops.Decline(f"{weight.dtype} (the C sweep is float32)")
    rows, width = weight.shape
    if hinv.shape != (width, width):  # the C code indexes hinv by the block's columns
        raise ValueError(f"hinv has shape {tuple(hinv.shape)}; the block has {width} columns")
    if prune_mask is None:
        if n is not None:
            raise ops.Decline("N:M mask chosen during the sweep")
        prune_mask = reference.obs_unstructured_mask(weight, torch.diagonal(hinv), fraction)
    # clone, not contiguous: the C sweep writes into work, never into the caller's weight
    work = weight.t().clone(memory_format=torch.contiguous_format)
    # expand: a broadcastable mask (one row for all rows) becomes rows x width, as the C code
    # reads it; any other shape is an error here, not a read past its end
    mask_t = prune_mask.to(torch.bool).expand(rows, width).t().contiguous()  # one byte, 0 or 1
    hinv = hinv if hinv.stride(1) == 1 else hinv.contiguous()
    err = torch.empty_like(work)
    losses = torch.empty(rows, dtype=torch.float32)
    args = (work.data_ptr(), mask_t.data_ptr(), hinv.data_ptr(), hinv.stride(0), err.data_ptr(), losses.data_ptr(),
            rows, width)
    threads = min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD)
    if threads <= 1:
        _sweep(*args, 0, rows)
    else:
        tiles = -(-rows // TILE_ROWS)
        cuts = [min(rows, tiles * i // threads * TILE_ROWS) for i in range(threads)] + [rows]
        pool = _pool(threads)
        # each part holds the tensors behind the pointers until it is done: a caller that stops
        # waiting (KeyboardInterrupt) must not free them under the threads still writing to them
        tensors = (work, mask_t, hinv, err, losses)
        for future in [pool.submit(_sweep_part, tensors, args, cuts[i], cuts[i + 1]) for i in range(threads)]:
            future.result()
    return work.t(), err.t(), losses.sum() / 2


def _sweep_part(tensors, args, row_begin, row_end):
    """One thread's rows of the sweep; ``tensors`` (unused here) keeps ``args``' memory alive."""
    _sweep(*args, row_begin, row_end)


ops.register("obs_prune_block", "cpu", obs_prune_block)
