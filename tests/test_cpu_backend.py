"""The cpu backend (sparsellm/_cpu_backend.py): the OBS sweep of a column block in C, compiled on
first use, against the reference on fresh random inputs; what it declines; what happens when it
cannot be compiled; and the pruned model it gives, against the reference backend's."""
from __future__ import annotations

import gc
import multiprocessing
import os
import platform
import shlex
import shutil
import threading

import pytest
import torch

from helpers import VOCAB, tiny_llama
from kernel_checks import hinv_factor
from sparsellm import ops, reference
from sparsellm._extension import _OFF, JIT_ENV
from sparsellm.config import PruneConfig
from sparsellm.driver import LayerDriver
from sparsellm.methods import get_method
from sparsellm.models import get_adapter

# Skipped only where no C compiler is on PATH (or SPARSELLM_JIT turns compiling off): where one
# is, a C source that fails to compile is an ImportError that must fail this file, not skip it
# (importorskip did, and ops then ran the reference silently).
if shutil.which((shlex.split(os.environ.get("CC", "")) or ["cc"])[0]) is None or os.environ.get(JIT_ENV, "").strip().lower() in _OFF:
    pytest.skip("needs a C compiler (the CI machines have one)", allow_module_level=True)
from sparsellm import _cpu_backend as cpu  # noqa: E402

# Bit for bit where torch's rank-1 update rounds the product before subtracting it, as MKL does
# on x86-64 (the C code does the same operations in the same order). Elsewhere, float32
# rounding of the ~width updates each weight gets.
EXACT = platform.machine() in ("x86_64", "AMD64")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_same(got, want):
    (q, err, loss), (q_ref, err_ref, loss_ref) = got, want
    assert torch.equal(q == 0, q_ref == 0)  # the same weights pruned
    if EXACT:
        assert torch.equal(q, q_ref) and torch.equal(err, err_ref) and torch.equal(loss, loss_ref)
    else:
        torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5 * float(q_ref.abs().max()))
        torch.testing.assert_close(err, err_ref, rtol=1e-5, atol=1e-5 * float(err_ref.abs().max()))
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)


# rows: fewer than a tile, whole tiles split between threads, a ragged last tile; widths: the
# default block, an odd one
@pytest.mark.parametrize("rows,width", [(5, 17), (192, 128), (700, 37), (1100, 128)])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_sweep_matches_the_reference(rows, width, fraction):
    weight = torch.randn(rows, width, generator=_gen(rows + width))
    hinv = hinv_factor(width, seed=width)
    got = cpu.obs_prune_block(weight, hinv, fraction)
    want = reference.obs_prune_block(weight, hinv, fraction)
    _assert_same(got, want)
    assert not torch.equal(got[0][got[0] != 0], weight[got[0] != 0])  # the kept weights were updated
    assert float((got[0] == 0).float().mean()) == pytest.approx(fraction, abs=1 / (rows * width) + 1e-6)
    assert torch.isfinite(got[1]).all() and float(got[2]) > 0


def _pool_in_child(queue):
    queue.put([cpu._pool(2).submit(pow, 2, k).result(timeout=30) for k in range(3)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_gets_its_own_thread_pool():
    """The parent's worker threads do not exist in a forked child: the child makes its own pool
    (handed the parent's, its tasks would never run). Only the pool is exercised in the child:
    torch's own OpenMP threads are not fork-safe after the parent used them."""
    weight = torch.randn(1100, 128, generator=_gen(9))
    cpu.obs_prune_block(weight, hinv_factor(128, seed=10), 0.5)  # two threads: the parent's pool exists
    assert os.getpid() in cpu._pools
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_pool_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert queue.get(timeout=5) == [1, 2, 4]


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_given_mask_and_a_strided_factor_block(layout):
    """obs_prune passes a diagonal block of the whole factor (a strided view: column-major as
    torch.linalg.cholesky(upper=True) returns it, or row-major) and, for N:M patterns chosen
    elsewhere, a mask."""
    weight = torch.randn(300, 64, generator=_gen(1))
    whole = hinv_factor(192, seed=2)
    whole = whole.contiguous() if layout == "row-major" else whole.t().contiguous().t()
    hinv = whole[64:128, 64:128]
    assert hinv.stride() == ((192, 1) if layout == "row-major" else (1, 192))
    mask = torch.rand(300, 64, generator=_gen(3)) < 0.6
    got = cpu.obs_prune_block(weight, hinv, 0.0, prune_mask=mask)
    _assert_same(got, reference.obs_prune_block(weight, hinv, 0.0, prune_mask=mask))
    assert torch.equal(got[0] == 0, mask)


def test_whole_sweep_through_ops_uses_it_on_cpu():
    weight = torch.randn(257, 300, generator=_gen(4))
    hinv = hinv_factor(300, seed=5)
    ops.reset_usage()
    with ops.backend_scope("auto"):
        got, loss = ops.obs_prune(weight, hinv, 0.7, blocksize=128)
    assert ops.usage() == {"obs_prune_block": {"cpu": 3}}  # blocks of 128, 128, 44 columns
    want, loss_ref = reference.obs_prune(weight, hinv, 0.7, blocksize=128)
    _assert_same((got, got, loss), (want, want, loss_ref))


@pytest.mark.parametrize("case", ["float64", "nm"])
def test_declines_go_to_the_reference(case):
    weight = torch.randn(8, 16, generator=_gen(6))
    hinv = hinv_factor(16, seed=7)
    args = {"float64": (weight.double(), hinv.double(), 0.5), "nm": (weight, hinv, 0.5, 2, 4)}[case]
    reason = {"float64": "torch.float64 (the C sweep is float32)", "nm": "N:M mask chosen during the sweep"}[case]
    with pytest.raises(ops.Decline, match=reason.replace("(", r"\(").replace(")", r"\)")):
        cpu.obs_prune_block(*args)
    ops.reset_usage()
    with ops.backend_scope("cpu"):
        q = ops.obs_prune_block(*args)[0]
    assert ops.usage() == {"obs_prune_block": {"reference": 1}}
    assert ops.fallbacks() == {"obs_prune_block": {f"cpu->reference: {reason}": 1}}
    assert torch.equal(q, reference.obs_prune_block(*args)[0])


def test_compiling_writes_the_library_or_nothing(tmp_path, monkeypatch):
    """A fresh cache: the library is compiled into it; a compiler that fails leaves no file and
    says why; a missing compiler is an ImportError (ops: the backend is unavailable)."""
    monkeypatch.setenv("SPARSELLM_EXT_CACHE", str(tmp_path))
    source, compiler = cpu._source(), cpu._compiler()
    target = cpu.library_path(source, compiler)
    assert target.is_relative_to(tmp_path) and not target.exists()
    cpu.compile_library(source, compiler, target)
    assert target.stat().st_size > 0

    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    with pytest.raises(ImportError, match="compiling broken.c with .* failed"):
        cpu.compile_library(broken, compiler, tmp_path / "out" / "broken.so")
    assert list((tmp_path / "out").iterdir()) == []  # no half-written library

    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(ImportError, match="no C compiler: 'no-such-compiler-here'"):
        cpu.load_library()
    monkeypatch.setenv("SPARSELLM_JIT", "0")
    with pytest.raises(ImportError, match="SPARSELLM_JIT=0"):
        cpu.load_library()


def test_cc_with_a_launcher_and_a_damaged_cached_library(tmp_path, monkeypatch):
    """$CC may be a command with words ("ccache gcc" as make takes it): its program is found on
    PATH and the rest passed on. A cached library that cannot be loaded is compiled again in
    its place."""
    monkeypatch.setenv("SPARSELLM_EXT_CACHE", str(tmp_path))
    plain = cpu._compiler()
    launcher = tmp_path / "launcher"
    launcher.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/launched"\nexec "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("CC", f"{launcher} {plain[0]}")
    compiler = cpu._compiler()
    assert compiler == [str(launcher), plain[0]]
    target = cpu.library_path(cpu._source(), compiler)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared library")
    lib = cpu.load_library()
    assert (tmp_path / "launched").read_text().startswith(plain[0])  # the launcher ran the compiler
    assert hasattr(lib, "sparsellm_obs_sweep_f32") and target.read_bytes()[:4] == b"\x7fELF"
    # the cache key is the whole command: a launcher or flags (-m32) make another library
    assert target != cpu.library_path(cpu._source(), plain)
    assert cpu.library_path(cpu._source(), [*plain, "-m32"]) != cpu.library_path(cpu._source(), plain)


def test_pruned_model_equals_the_reference_backends():
    """SparseGPT of a tiny LLaMA, the driver's whole layer loop: the cpu backend prunes the
    same weights as the reference."""
    models = {}
    ids = torch.randint(0, VOCAB, (4, 32), generator=_gen(8))
    for backend in ("auto", "reference"):
        model = tiny_llama(seed=0)
        config = PruneConfig(method="sparsegpt", sparsity="0.6", nsamples=4, seqlen=32, quiet=True, device="cpu")
        ops.reset_usage()
        with ops.backend_scope(backend):
            LayerDriver(model, get_adapter(model), get_method(config), config).run(ids)
        assert set(ops.usage()["obs_prune_block"]) == {"cpu" if backend == "auto" else "reference"}
        models[backend] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, want in models["reference"].items():
        got = models["auto"][name]
        assert torch.equal(got == 0, want == 0), name
        if EXACT:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["one row", "column-major"])
def test_the_sweep_never_writes_into_the_callers_tensors(layout):
    """A one-row or column-major weight is already contiguous as its transpose, the layout both
    sweeps work in: each must still work on a copy (and leave a given mask alone)."""
    if layout == "one row":
        weight, mask = torch.randn(1, 32, generator=_gen(11)), torch.rand(1, 32, generator=_gen(12)) < 0.5
    else:
        weight = torch.randn(32, 24, generator=_gen(11)).t()
        mask = (torch.rand(32, 24, generator=_gen(12)) < 0.5).t()
    hinv = hinv_factor(weight.shape[1], seed=13)
    weight_before, mask_before = weight.clone(), mask.clone()
    for sweep in (cpu.obs_prune_block, reference.obs_prune_block):
        for kwargs in ({}, {"prune_mask": mask}):
            q = sweep(weight, hinv, 0.5, **kwargs)[0]
            assert (q == 0).any() and not torch.equal(q, weight)
            assert torch.equal(weight, weight_before) and torch.equal(mask, mask_before)
    reference.obs_prune_block(weight, hinv, 0.5, 2, 4)  # the N:M mask, chosen in the sweep
    assert torch.equal(weight, weight_before)


def test_a_given_mask_is_used_as_given_even_with_n_and_m():
    """With a mask given, n and m only describe it: no backend chooses another one (before, the
    reference chose a 2:4 mask of its own, the cpu backend used the given one)."""
    weight = torch.randn(8, 16, generator=_gen(14))
    hinv = hinv_factor(16, seed=15)
    mask = torch.rand(8, 16, generator=_gen(16)) < 0.3  # not 2:4
    got = cpu.obs_prune_block(weight, hinv, 0.5, 2, 4, prune_mask=mask)
    _assert_same(got, reference.obs_prune_block(weight, hinv, 0.5, 2, 4, prune_mask=mask))
    assert torch.equal(got[0] == 0, mask)


def test_a_one_row_mask_applies_to_every_row_and_wrong_shapes_are_errors():
    """The C code reads rows x width mask bytes and a width x width factor: a mask of one row is
    expanded (as the reference broadcasts it), other shapes are refused before the C code runs."""
    weight = torch.randn(300, 64, generator=_gen(17))
    hinv = hinv_factor(64, seed=18)
    mask = torch.rand(1, 64, generator=_gen(19)) < 0.5
    got = cpu.obs_prune_block(weight, hinv, 0.0, prune_mask=mask)
    _assert_same(got, reference.obs_prune_block(weight, hinv, 0.0, prune_mask=mask))
    assert torch.equal(got[0] == 0, mask.expand(300, 64))
    with pytest.raises(RuntimeError, match="expanded size"):
        cpu.obs_prune_block(weight, hinv, 0.0, prune_mask=mask[:, :63])
    with pytest.raises(ValueError, match=r"hinv has shape \(32, 32\); the block has 64 columns"):
        cpu.obs_prune_block(weight, hinv[:32, :32], 0.0, prune_mask=mask.expand(300, 64))


@pytest.mark.parametrize("where", ["hinv", "prune_mask"])
def test_a_factor_or_mask_off_the_cpu_is_declined_not_read(where):
    """The C code reads every tensor through a host pointer. With CPU weights, a factor or mask on
    another device (a CUDA mask, here a meta tensor: data pointer 0) was passed to it as is, and
    the process died (SIGSEGV); the backend now declines it, and the reference refuses the
    mixed devices with its usual error."""
    weight = torch.randn(8, 16, generator=_gen(20))
    hinv = hinv_factor(16, seed=21)
    mask = torch.rand(8, 16, generator=_gen(22)) < 0.5
    if where == "hinv":
        hinv = hinv.to("meta")
    else:
        mask = mask.to("meta")
    with pytest.raises(ops.Decline, match=f"{where} is not on the CPU"):
        cpu.obs_prune_block(weight, hinv, 0.5, prune_mask=mask)
    with ops.backend_scope("cpu"), pytest.raises(RuntimeError, match="device"):
        ops.obs_prune_block(weight, hinv, 0.5, prune_mask=mask)


def test_a_caller_that_stops_waiting_leaves_the_threads_their_tensors(monkeypatch):
    """The threads get raw pointers into the block's work tensors. When the caller stopped waiting
    for them (Ctrl-C in a notebook; here one part that fails), those tensors were freed while the
    other parts still wrote into them; now each part holds them until it is done."""
    started, release, pointers = threading.Event(), threading.Event(), []

    def fake_sweep(*args):
        if args[-2] == 0:  # the first part: fails once the second one runs
            started.wait(30)
            raise RuntimeError("interrupted")
        pointers.extend(args[i] for i in (0, 1, 4, 5))  # work, mask, err, losses
        started.set()
        release.wait(30)

    monkeypatch.setattr(cpu, "_sweep", fake_sweep)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weight = torch.randn(1100, 64, generator=_gen(23))
        with pytest.raises(RuntimeError, match="interrupted"):
            cpu.obs_prune_block(weight, hinv_factor(64, seed=24), 0.5)
        gc.collect()
        alive = {t.data_ptr() for t in gc.get_objects() if type(t) is torch.Tensor}
        assert set(pointers) <= alive
    finally:
        release.set()
        torch.set_num_threads(threads)
    cpu._pool(2).submit(int).result(timeout=30)  # the second part has finished
