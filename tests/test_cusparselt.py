"""Our cuSPARSELt 2:4 linear with cached plans (sparsellm.export.cusparselt,
csrc/cusparselt/cusparselt_linear.cpp).

- CPU (run everywhere): on a CPU-only torch :func:`available` says no, with the reason, and
  nothing is compiled (the loader is never called, the cache folder stays empty); the library
  search by ``$CUSPARSELT_PATH``; the source stays out of the main extension's build.
- GPU (``gpu``; skipped without CUDA or where the extension is unavailable): forward against
  ``F.linear`` on fresh random 2:4 weights at LLaMA-2-7B shapes and several token counts, the
  plan cache, search, padding of odd token counts, and the errors.

Errors are relative to the largest float32 reference output; NaN fails every comparison.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsellm import _extension, kernel_constants
from sparsellm.export import cusparselt

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA and torch.version.cuda is not None:
    AVAILABLE, WHY = cusparselt.available()
else:
    AVAILABLE, WHY = False, "no CUDA device"
needs_ext = pytest.mark.skipif(not AVAILABLE, reason=f"cuSPARSELt extension unavailable: {WHY}")

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out) of LLaMA-2-7B's linears
TOKENS = (16, 256, 2048)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    assert want.abs().max() > 0
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max()).item()


def weight_24(out_features, in_features, dtype=torch.float16, seed=0, device="cuda"):
    """Random weight keeping the 2 largest of every group of 4 consecutive inputs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    groups = w.view(out_features, in_features // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).view(out_features, in_features).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ CPU


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch")
def test_unavailable_on_cpu_torch_without_compiling(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compile(*args, **kwargs):
        raise AssertionError("cpp_extension.load must not be called on a CPU-only torch")

    monkeypatch.setattr(cpp_extension, "load", no_compile)
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(_extension.JIT_ENV, raising=False)
    monkeypatch.setattr(cusparselt, "_module", None)

    ok, why = cusparselt.available()
    assert ok is False
    assert "not a CUDA build" in why and torch.__version__ in why
    with pytest.raises(ImportError, match="unavailable: .*not a CUDA build"):
        cusparselt.load()
    with pytest.raises(ImportError, match="not a CUDA build"):
        cusparselt.make_linear(torch.zeros(16, 16, dtype=torch.float16))
    assert not (tmp_path / "cache").exists()


def test_the_capability_checked_is_that_of_the_weights_gpu(monkeypatch):
    """On a machine of mixed GPUs (here by hand: no GPU needed) the check is of the GPU asked
    about, and make_linear's of its weight's GPU, also once the module is loaded."""
    import types

    capabilities = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(_extension, "why_no_jit", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capabilities[0 if device is None else torch.device(device).index])
    assert "compute capability 7.5 < 8.0" in cusparselt.why_unavailable(torch.device("cuda:1"))
    assert "compute capability" not in (cusparselt.why_unavailable(torch.device("cuda:0")) or "")
    built = []
    monkeypatch.setattr(cusparselt, "_module", types.SimpleNamespace(SparseLtLinear=lambda w, fuse: built.append(w)))
    on_gpu = {index: types.SimpleNamespace(device=torch.device("cuda", index)) for index in capabilities}
    with pytest.raises(ImportError, match="unavailable: compute capability 7.5 < 8.0"):
        cusparselt.make_linear(on_gpu[1])
    cusparselt.make_linear(on_gpu[0])
    assert built == [on_gpu[0]]


def test_jit_switch_makes_it_unavailable(monkeypatch):
    monkeypatch.setenv(_extension.JIT_ENV, "0")
    ok, why = cusparselt.available()
    assert ok is False and f"{_extension.JIT_ENV}=0" in why


def test_source_is_outside_the_main_extension():
    """setup.py and sparsellm._C compile csrc/*.cpp|cu and hash csrc/*: the cuSPARSELt source
    lives in a subfolder, so neither ever sees it."""
    src = cusparselt.source_file()
    assert src is not None and src.parent.name == "cusparselt"
    csrc = _extension.csrc_dir()
    assert str(src) not in kernel_constants.extension_sources(str(csrc))
    assert all("cusparselt" not in s for s in kernel_constants.extension_sources(str(csrc)))


def test_finds_cusparselt_from_env(monkeypatch, tmp_path):
    monkeypatch.setattr(cusparselt, "_nvidia_dir", lambda name: None)
    monkeypatch.delenv(cusparselt.PATH_ENV, raising=False)
    why = cusparselt.find_cusparselt()
    assert isinstance(why, str) and cusparselt.PATH_ENV in why

    root = tmp_path / "slt"
    (root / "include").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "include" / "cusparseLt.h").write_text("// header\n")
    monkeypatch.setenv(cusparselt.PATH_ENV, str(root))
    assert isinstance(cusparselt.find_cusparselt(), str)  # header but no library yet
    (root / "lib" / "libcusparseLt.so.0").write_text("")
    assert cusparselt.find_cusparselt() == (root / "include", root / "lib" / "libcusparseLt.so.0")
    (root / "lib" / "libcusparseLt.so").write_text("")  # the plain link name wins when present
    assert cusparselt.find_cusparselt() == (root / "include", root / "lib" / "libcusparseLt.so")


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_forward_matches_linear_fp16(shape):
    in_f, out_f = shape
    w = weight_24(out_f, in_f, seed=in_f + out_f)
    lin = cusparselt.make_linear(w)
    assert (lin.in_features, lin.out_features) == (in_f, out_f)
    for tokens in TOKENS:
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
        y = lin(x)
        assert y.shape == (tokens, out_f) and y.dtype == torch.float16 and y.is_contiguous()
        ref = F.linear(x.float(), w.float())
        err = rel_err(y, ref)
        assert err < 2e-3, f"T={tokens}: rel err {err:.2e} (fused_output={lin.fused_output(tokens)})"
        assert rel_err(F.linear(x, w), ref) < 2e-3  # the dense fp16 path is as close
    assert sorted(lin.cached_tokens()) == sorted(TOKENS)


@pytest.mark.gpu
@needs_ext
def test_unfused_output_layout():
    """fuse_output=False: cuSPARSELt writes y^T row-major and forward copies it to y."""
    w = weight_24(11008, 4096, seed=3)
    lin = cusparselt.make_linear(w, fuse_output=False)
    for tokens in (16, 20, 256):
        x = torch.randn(tokens, 4096, device="cuda", dtype=torch.float16)
        y = lin(x)
        assert y.shape == (tokens, 11008) and y.is_contiguous()
        assert rel_err(y, F.linear(x.float(), w.float())) < 2e-3
        assert lin.fused_output(tokens) == 0


@pytest.mark.gpu
@needs_ext
def test_forward_bf16():
    w = weight_24(4096, 4096, dtype=torch.bfloat16, seed=1)
    lin = cusparselt.make_linear(w)
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    assert rel_err(lin(x), F.linear(x.float(), w.float())) < 1.5e-2


@pytest.mark.gpu
@needs_ext
def test_plan_cache_and_padding():
    w = weight_24(4096, 4096, seed=2)
    lin = cusparselt.make_linear(w)
    assert lin.cached_tokens() == [] and lin.alg_id(256) == -1
    lin.prepare(256)
    assert lin.cached_tokens() == [256] and lin.fused_output(256) in (0, 1)
    x = torch.randn(256, 4096, device="cuda", dtype=torch.float16)
    first = lin(x)
    assert rel_err(lin(x), first.float()) < 1e-3  # same plan (not asserted bit-equal: split-K may use atomics)
    assert lin.cached_tokens() == [256]
    assert rel_err(first, F.linear(x.float(), w.float())) < 2e-3

    # 13 tokens run as 16 (zero rows added and dropped); the plan is keyed by 16
    x13 = torch.randn(13, 4096, device="cuda", dtype=torch.float16)
    y13 = lin(x13)
    assert y13.shape == (13, 4096) and y13.is_contiguous()
    assert rel_err(y13, F.linear(x13.float(), w.float())) < 2e-3
    assert sorted(lin.cached_tokens()) == [16, 256]
    # a non-contiguous input is copied, not misread
    xt = torch.randn(4096, 32, device="cuda", dtype=torch.float16).t()
    assert rel_err(lin(xt), F.linear(xt.float(), w.float())) < 2e-3
    assert lin(x[:0]).shape == (0, 4096)


@pytest.mark.gpu
@needs_ext
def test_errors():
    dense = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="not 2:4"):
        cusparselt.make_linear(dense)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        cusparselt.make_linear(weight_24(24, 64))
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        cusparselt.make_linear(weight_24(256, 256, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cusparselt.make_linear(weight_24(256, 256, device="cpu"))
    lin = cusparselt.make_linear(weight_24(256, 256))
    with pytest.raises(RuntimeError, match=r"\[T, 256\]"):
        lin(torch.randn(8, 32, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="weight is"):
        lin(torch.randn(8, 256, device="cuda", dtype=torch.bfloat16))


# Known bug: on an H200 (cuSPARSELt 0.8 from nvidia-cusparselt-cu13, torch 2.11) search() failed
# with CUSPARSE_STATUS_INTERNAL_ERROR and left the context broken (the next launch hit an illegal
# instruction). Run in its own process (pytest-forked is not available): it goes last in the file.
@pytest.mark.xfail(strict=True, reason="cusparseLtMatmulSearch fails with INTERNAL_ERROR (see comment)")
@pytest.mark.gpu
@needs_ext
def test_search_picks_an_algorithm():
    w = weight_24(4096, 4096, seed=2)
    lin = cusparselt.make_linear(w)
    x = torch.randn(256, 4096, device="cuda", dtype=torch.float16)
    alg = lin.search(256)
    assert alg >= 0 and lin.alg_id(256) == alg and lin.searched(256)
    assert rel_err(lin(x), F.linear(x.float(), w.float())) < 2e-3


@pytest.mark.gpu
@needs_ext
def test_the_export_runs_cusparselt_from_its_prefill_crossover():
    """to_sparse_gpu with a prefill crossover builds each 2:4 linear's cuSPARSELt copy at the
    export (the report says so) and runs it from that many tokens on, bias added, matching the
    dense product; below, the Triton kernel (1 token) and dense."""
    from torch import nn

    from sparsellm.export import SparseGPULinear, to_sparse_gpu

    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 512, bias=False)).to("cuda", torch.float16)
    with torch.no_grad():
        for i, lin in enumerate(model):
            lin.weight.copy_(weight_24(lin.out_features, lin.in_features, seed=i))
            if lin.bias is not None:
                lin.bias.normal_()
    x = torch.randn(2, 40, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want = model.float()(x.float())
        model.half()
    report = to_sparse_gpu(model, prefill_min_tokens=64)
    assert all(v["prefill"]["note"] == "cuSPARSELt built" for v in report["converted"].values()), report
    assert all(isinstance(m, SparseGPULinear) and m.prefill_min_tokens == 64 for m in model)
    with torch.no_grad():
        assert rel_err(model(x), want) < 4e-3  # 80 tokens: cuSPARSELt
        assert rel_err(model(x[:1, :10]), want[:1, :10]) < 4e-3  # 10: dense
        assert rel_err(model(x[:1, :1]), want[:1, :1]) < 4e-3  # 1: the Triton kernel
    assert all(m.prefill_error is None for m in model)
