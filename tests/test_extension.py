"""Where the CUDA extension comes from (sparsellm._extension) and the one definition of the
constants it shares with Python (sparsellm.kernel_constants). Nothing here compiles: the
compiler is replaced by a stub wherever the build on first use is exercised."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import sparsellm
from sparsellm import _extension, kernel_constants

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"


# ---------------------------------------------------------------- the constants and their -D definitions

def test_definitions_list_every_constant():
    assert kernel_constants.compile_definitions() == [
        "-DSPARSELLM_MAX_M=16", "-DSPARSELLM_SCORE_RAW=0", "-DSPARSELLM_SCORE_WANDA=1",
        "-DSPARSELLM_OBS_MAX_BLOCK=256"]
    cxx, nvcc = kernel_constants.compile_flags()
    for flags in (cxx, nvcc):
        assert flags[-len(kernel_constants.CONSTANTS):] == kernel_constants.compile_definitions()


def test_definitions_follow_the_constants(monkeypatch):
    monkeypatch.setitem(kernel_constants.CONSTANTS, "MAX_M", 8)
    assert "-DSPARSELLM_MAX_M=8" in kernel_constants.compile_definitions()


def test_sources_require_and_report_every_constant():
    """The header refuses to compile without each definition, and the bindings report each
    one back (compiled_constants), so a constant added in Python cannot be forgotten there."""
    header = (CSRC / "sparsellm_ops.h").read_text()
    guard = header[header.index("#if !defined"):header.index("#error")]
    bindings = (CSRC / "bindings.cpp").read_text()
    for name in kernel_constants.CONSTANTS:
        assert f"defined(SPARSELLM_{name})" in guard, name
        assert f'out["{name}"] = SPARSELLM_{name};' in bindings, name
    # no literal copy of a constant left in the sources
    sources = "".join(p.read_text() for p in CSRC.iterdir() if p.is_file())  # csrc/cusparselt/ is a folder
    assert not re.search(r"kMaxM\s*=\s*\d|kScore\w+\s*=\s*\d|8 \* kWarp", sources)


def test_constants_module_imports_only_the_standard_library():
    # setup.py reads it with runpy, where neither torch nor sparsellm need be importable
    code = ("import runpy, sys; ns = runpy.run_path(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'sparsellm' not in sys.modules; print(ns['compile_definitions']())")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "sparsellm" / "kernel_constants.py")],
                         capture_output=True, text=True, check=True).stdout
    assert "-DSPARSELLM_MAX_M=16" in out


def test_python_users_share_the_definition():
    from sparsellm import sparsity
    assert sparsity.MAX_M is kernel_constants.MAX_M


# ---------------------------------------------------------------- no extension, no CUDA: nothing happens

@pytest.fixture
def no_builtin(monkeypatch, tmp_path):
    """No install-time build, the compiler replaced by a tripwire, the cache in tmp_path."""
    monkeypatch.delattr(sparsellm, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "sparsellm._C", None)  # makes `from . import _C` fail
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(_extension.JIT_ENV, raising=False)

    def tripwire():
        raise AssertionError("a compile was attempted")
    monkeypatch.setattr(_extension, "_jit_load", tripwire)


def _load_quietly(capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImportError) as info:
            _extension.load_extension()
    out, err = capfd.readouterr()
    assert not caught and not out and not err, (caught, out, err)
    return str(info.value)


def test_cpu_torch_compiles_nothing_and_says_why(no_builtin, monkeypatch, capfd):
    monkeypatch.setattr(torch.version, "cuda", None)
    reason = _load_quietly(capfd)
    assert "sparsellm._C is not built" in reason and "is not a CUDA build" in reason


def test_cuda_torch_without_gpu_compiles_nothing(no_builtin, monkeypatch, capfd):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device is visible" in _load_quietly(capfd)


def test_jit_can_be_disabled(no_builtin, monkeypatch, capfd):
    monkeypatch.setenv(_extension.JIT_ENV, "0")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "SPARSELLM_JIT=0" in _load_quietly(capfd)


def test_cuda_backend_import_fails_with_the_reason(no_builtin, monkeypatch, capfd):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delitem(sys.modules, "sparsellm._cuda_backend", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImportError, match="not built.*not a CUDA build"):
            import sparsellm._cuda_backend  # noqa: F401
    assert not caught and capfd.readouterr() == ("", "")


# ---------------------------------------------------------------- stale builds are refused

def _fake_extension(constants=None):
    module = types.ModuleType("fake_C")
    if constants is not None:
        module.compiled_constants = lambda: dict(constants)
    return module


def test_constants_mismatch():
    assert _extension.constants_mismatch(_fake_extension(kernel_constants.CONSTANTS)) is None
    assert "predates" in _extension.constants_mismatch(_fake_extension())
    stale = dict(kernel_constants.CONSTANTS, MAX_M=8)
    assert "MAX_M=8 (Python: 16)" in _extension.constants_mismatch(_fake_extension(stale))


def test_stale_builtin_is_refused(no_builtin, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "sparsellm._C", _fake_extension(dict(kernel_constants.CONSTANTS, SCORE_WANDA=7)))
    monkeypatch.setattr(torch.version, "cuda", None)
    reason = _load_quietly(capfd)
    assert "built but was compiled with other constants" in reason and "SCORE_WANDA=7" in reason


# ---------------------------------------------------------------- the build on first use (compiler stubbed)

@pytest.fixture
def jit_stub(monkeypatch, tmp_path):
    """A machine that could compile: the real loader runs up to torch's compiler, a stub."""
    from torch.utils import cpp_extension
    monkeypatch.delattr(sparsellm, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "sparsellm._C", None)
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(_extension, "why_no_jit", lambda: None)
    calls = []

    def load(name, sources, extra_cflags, extra_cuda_cflags, extra_include_paths, build_directory, verbose):
        calls.append(dict(name=name, sources=sources, cflags=extra_cflags, cuda_cflags=extra_cuda_cflags,
                          build_directory=build_directory))
        Path(build_directory, name + cpp_extension.LIB_EXT).write_bytes(b"")  # what ninja leaves
        return _fake_extension(kernel_constants.CONSTANTS)
    monkeypatch.setattr(cpp_extension, "load", load)
    return calls


def test_jit_compiles_once_into_the_cache(jit_stub, tmp_path, capfd):
    module = _extension.load_extension()
    assert module.compiled_constants() == kernel_constants.CONSTANTS
    assert capfd.readouterr().err.strip() == _extension.COMPILING_MESSAGE
    (call,) = jit_stub
    build_dir = Path(call["build_directory"])
    assert build_dir.parent == tmp_path and "cu12.4" in build_dir.name and "arch8.0_9.0_PTX" in build_dir.name
    assert [Path(s).name for s in call["sources"]] == ["bindings.cpp", "cholesky.cu", "nm_mask.cu", "obs_block.cu"]
    for flags in (call["cflags"], call["cuda_cflags"]):
        assert set(kernel_constants.compile_definitions()) <= set(flags)
    _extension.load_extension()  # cached: torch's load is still called (ninja finds nothing to do), silently
    assert len(jit_stub) == 2 and jit_stub[1]["build_directory"] == call["build_directory"]
    assert capfd.readouterr().err == ""


def test_failed_compile_is_not_retried(jit_stub, monkeypatch, tmp_path, capfd):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        jit_stub.append(kwargs)
        raise RuntimeError("Error building extension 'sparsellm_C'\nnvcc fatal: unsupported gpu architecture")
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(ImportError, match="compiling it in .* failed: Error building extension"):
        _extension.load_extension()
    with pytest.raises(ImportError, match="failed before .*delete that folder"):
        _extension.load_extension()
    assert len(jit_stub) == 1
    (marker,) = tmp_path.glob("*/FAILED")
    assert "unsupported gpu architecture" in marker.read_text()


# ---------------------------------------------------------------- cache key

def test_source_hash_covers_sources_constants_and_flags(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    base = _extension.source_hash(src)
    assert base == _extension.source_hash(CSRC) and re.fullmatch(r"[0-9a-f]{64}", base)
    (src / "notes.txt").write_text("not a source")
    assert _extension.source_hash(src) == base
    with open(src / "nm_mask.cu", "a") as f:
        f.write("\n// edited\n")
    edited = _extension.source_hash(src)
    assert edited != base
    monkeypatch.setitem(kernel_constants.CONSTANTS, "OBS_MAX_BLOCK", 224)
    assert _extension.source_hash(src) != edited
    monkeypatch.undo()
    monkeypatch.setattr(kernel_constants, "NVCC_FLAGS", ["-O2"])
    assert _extension.source_hash(src) != edited


def test_cache_key_separates_builds():
    h = "ab" * 32
    key = _extension.cache_key("2.6.0+cu124", "12.4", "arch8.0;9.0+PTX", h)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key) and h[:16] in key and sys.implementation.cache_tag in key
    others = {_extension.cache_key("2.7.0+cu124", "12.4", "arch8.0;9.0+PTX", h),
              _extension.cache_key("2.6.0+cu124", "12.6", "arch8.0;9.0+PTX", h),
              _extension.cache_key("2.6.0+cu124", "12.4", "sm90", h),
              _extension.cache_key("2.6.0+cu124", "12.4", "arch8.0;9.0+PTX", "cd" * 32)}
    assert len(others) == 4 and key not in others


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv(_extension.CACHE_ENV, raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _extension.cache_root() == tmp_path / "xdg" / "sparsellm" / "extension"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert _extension.cache_root() == tmp_path / "te" / "sparsellm"
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path / "mine"))
    assert _extension.cache_root() == tmp_path / "mine"


def test_an_empty_xdg_cache_home_counts_as_unset(monkeypatch, tmp_path):
    """README: both caches live under ${XDG_CACHE_HOME:-~/.cache}, the shell's reading, where an
    empty variable takes the default too (not a folder relative to the working directory)."""
    from sparsellm import default_model

    for name in (_extension.CACHE_ENV, "TORCH_EXTENSIONS_DIR", "SPARSELLM_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert _extension.cache_root() == tmp_path / "home" / ".cache" / "sparsellm" / "extension"
    assert default_model.cache_root() == tmp_path / "home" / ".cache" / "sparsellm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_root() == tmp_path / "xdg" / "sparsellm"
    monkeypatch.setenv("SPARSELLM_CACHE", str(tmp_path / "mine"))
    assert default_model.cache_root() == tmp_path / "mine"


def test_sources_found_in_a_checkout():
    assert _extension.csrc_dir() in (CSRC, Path(_extension.__file__).resolve().parent / "csrc")


# ---------------------------------------------------------------- the wheel ships the sources

def test_wheel_ships_the_extension_sources(tmp_path):
    """`pip wheel .` (no build isolation: offline, with the setuptools at hand; no extension
    build) puts csrc/ into the package as sparsellm/csrc, beside the constants module, and the
    data files beside their modules."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("sparsellm", "kernels", "csrc"):
        shutil.copytree(REPO / name, tree / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, tree / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["SPARSELLM_BUILD_EXT"] = "0"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
                    "-w", str(tmp_path / "dist")], cwd=tree, env=env, check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("sparsellm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"sparsellm/csrc/{p.name}" for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu", ".h")}
    assert expected and expected <= names
    assert {"sparsellm/kernel_constants.py", "sparsellm/_extension.py"} <= names
    # the cuSPARSELt binding the sparse-gpu export builds for 2:4 prefill, and the sparse
    # kernels' measured config table
    assert {"sparsellm/csrc/cusparselt/cusparselt_linear.cpp", "sparsellm/kernels/sparse_configs.json"} <= names
