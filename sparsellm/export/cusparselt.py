"""Our own cuSPARSELt 2:4 linear (:class:`SparseLtLinear` in ``csrc/cusparselt/``), with the
matmul plan built once per (weight, token count) and reused.

Why: torch's 2:4 path (``to_sparse_semi_structured`` / ``torch._cslt_sparse_mm``) rebuilds the
cuSPARSELt descriptors and plan on every call, hundreds of microseconds on Hopper whatever the
size, so it cannot show whether the sparse tensor cores beat dense cuBLAS for prefill. This module
measures that (benchmarks/cusparselt_prefill.py, tests/test_cusparselt.py), and
:class:`sparsellm.export.SparseGPULinear` runs it for 2:4 prefill where the kernels' config table
says it beats dense.

The extension is compiled just in time with ``torch.utils.cpp_extension.load`` and cached like
``sparsellm._C`` (:mod:`sparsellm._extension`: same cache root, ``SPARSELLM_EXT_CACHE``,
``SPARSELLM_JIT=0``), in its own ``cusparselt/`` folder. It is deliberately separate from
``sparsellm._C`` and never built by setup.py: cuSPARSELt may be missing where the main
extension builds. Its source sits in a subfolder of csrc/ so the main extension's source glob
(``csrc/*.cpp``) and source hash never see it; the wheel ships it (``sparsellm/csrc/cusparselt/``)
for the export to build on first use.

cuSPARSELt is found from the ``nvidia.cusparselt`` Python package (nvidia-cusparselt-cu13 /
-cu12, which CUDA builds of torch install) if present, else from ``$CUSPARSELT_PATH``
(``include/cusparseLt.h`` and ``lib/libcusparseLt.so*``).

Use::

    ok, why = available()
    lin = make_linear(w)          # w: CUDA fp16/bf16 [out, in], 2:4 along in
    lin.prepare(T); lin.search(T) # optional: build / tune the plan for T tokens ahead of time
    y = lin(x)                    # x [T, in] -> [T, out]
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .. import _extension

MODULE_NAME = "sparsellm_cusparselt"
PATH_ENV = "CUSPARSELT_PATH"
SOURCE_NAME = "cusparselt_linear.cpp"
COMPILING_MESSAGE = "compiling the cuSPARSELt extension (sparsellm_cusparselt, under a minute, once)..."
_CXX_FLAGS = ["-O2"]
# (cuSPARSELt package folder names, CUDA-header package folder names) to look in, newest first
_NVIDIA_LIB_PACKAGES = ("cusparselt",)
_NVIDIA_HEADER_PACKAGES = ("cu13", "cusparse", "cu12")

_module = None


def source_file() -> Path | None:
    """``csrc/cusparselt/cusparselt_linear.cpp`` (``sparsellm/csrc/cusparselt/`` when installed)."""
    pkg = Path(_extension.__file__).resolve().parent
    for base in (pkg / "csrc", pkg.parent / "csrc"):
        candidate = base / "cusparselt" / SOURCE_NAME
        if candidate.is_file():
            return candidate
    return None


def _nvidia_dir(name: str) -> Path | None:
    """The folder of the ``nvidia.<name>`` wheel package, found without importing torch's CUDA."""
    try:
        spec = importlib.util.find_spec(f"nvidia.{name}")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    return Path(locations[0]) if locations else None


def _library_in(lib_dir: Path) -> Path | None:
    """libcusparseLt.so, else a versioned libcusparseLt.so.N (the wheels ship only the latter)."""
    plain = lib_dir / "libcusparseLt.so"
    if plain.exists():
        return plain
    versioned = sorted(lib_dir.glob("libcusparseLt.so.*"))
    return versioned[0] if versioned else None


def find_cusparselt() -> tuple[Path, Path] | str:
    """(include dir, library file) of cuSPARSELt, or the reason none was found."""
    candidates = []
    for name in _NVIDIA_LIB_PACKAGES:
        root = _nvidia_dir(name)
        if root is not None:
            candidates.append((f"the nvidia.{name} package", root))
    if os.environ.get(PATH_ENV):
        candidates.append((f"${PATH_ENV}", Path(os.environ[PATH_ENV])))
    for origin, root in candidates:
        header = root / "include" / "cusparseLt.h"
        lib = next((found for sub in ("lib", "lib64") if (found := _library_in(root / sub))), None)
        if header.is_file() and lib is not None:
            return header.parent, lib
    looked = ", ".join(f"{origin} ({root})" for origin, root in candidates) or "nothing to look in"
    return (f"cuSPARSELt not found (looked in: {looked}); pip install nvidia-cusparselt-cu13 "
            f"(or -cu12), or set {PATH_ENV} to a folder with include/cusparseLt.h and lib/libcusparseLt.so*")


def _cuda_header_dirs() -> list[str]:
    """cusparseLt.h includes cusparse.h, which a toolkit without the math libraries lacks (as
    on the build machine here): take it from the CUDA wheels torch depends on then."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "include" / "cusparse.h").is_file():
        return []
    for name in _NVIDIA_HEADER_PACKAGES:
        root = _nvidia_dir(name)
        if root is not None and (root / "include" / "cusparse.h").is_file():
            return [str(root / "include")]
    return []


def _no_sparse_cores(device=None) -> str | None:
    """Why GPU ``device`` (the current one for None) cannot run it, or None."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return f"it runs on a CUDA device, not on {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"compute capability {cap[0]}.{cap[1]} < 8.0 has no sparse tensor cores"
    return None


def why_unavailable(device=None) -> str | None:
    """Why the extension cannot be used here, on GPU ``device`` (the current one for None), or
    None when it can. Cheap checks first: on a CPU-only torch nothing else is looked at, and
    nothing is ever compiled here."""
    why = _extension.why_no_jit()  # JIT switched off, CPU torch, no GPU, no toolkit, no ninja
    if why is not None:
        return why
    why = _no_sparse_cores(device)
    if why is not None:
        return why
    if source_file() is None:
        return f"its source (csrc/cusparselt/{SOURCE_NAME}) is not installed"
    found = find_cusparselt()
    if isinstance(found, str):
        return found
    return None


def available(device=None) -> tuple[bool, str]:
    """(True, where cuSPARSELt was found) or (False, why not), on GPU ``device`` (the current
    one for None). Never compiles anything."""
    why = why_unavailable(device)
    if why is not None:
        return False, why
    include_dir, lib = find_cusparselt()
    return True, f"cuSPARSELt {lib} (headers {include_dir})"


def _build_key(src: Path, include_dir: Path, lib: Path, extra_includes: list[str]) -> str:
    """sha256 of what decides the build: the source, the cuSPARSELt header and library path,
    the flags."""
    digest = hashlib.sha256()
    for part in (src.read_bytes(), (include_dir / "cusparseLt.h").read_bytes(), str(lib).encode(),
                 "\0".join(_CXX_FLAGS + extra_includes).encode()):
        digest.update(part + b"\0")
    return digest.hexdigest()


def compile_extension(verbose: bool = False):
    """Compile (or load the cached build of) the extension and return the module, without the
    device checks of :func:`why_unavailable` (the compile check on a GPU-less machine calls this
    directly; loading the module may then fail, after compile and link succeeded)."""
    import torch
    from torch.utils import cpp_extension

    src = source_file()
    if src is None:
        raise ImportError(f"the cuSPARSELt extension source csrc/cusparselt/{SOURCE_NAME} is missing")
    found = find_cusparselt()
    if isinstance(found, str):
        raise ImportError(found)
    include_dir, lib = found
    if not _extension._find_ninja():
        raise ImportError("the ninja build tool is missing (pip install ninja)")
    extra_includes = [str(include_dir), *_cuda_header_dirs()]
    # The header's version and the library path are in the key: another cuSPARSELt rebuilds.
    # No GPU code is compiled (one host .cpp), so the key has no architecture.
    key = _extension.cache_key(torch.__version__, str(torch.version.cuda), "host",
                               _build_key(src, include_dir, lib, extra_includes))
    build_dir = _extension.cache_root() / "cusparselt" / key
    failed = _extension.open_build_dir(build_dir, MODULE_NAME, "compiling the cuSPARSELt extension",
                                       COMPILING_MESSAGE)
    # -l:<file> because the wheels ship only libcusparseLt.so.0 (no unversioned link name);
    # the rpath lets the module find it without LD_LIBRARY_PATH (when torch has not already
    # loaded the same soname, which it does for its own cuSPARSELt backend).
    ldflags = [f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]
    try:
        return cpp_extension.load(name=MODULE_NAME, sources=[str(src)], extra_cflags=_CXX_FLAGS,
                                  extra_include_paths=extra_includes, extra_ldflags=ldflags, with_cuda=True,
                                  build_directory=str(build_dir), verbose=verbose)
    except ImportError:
        raise  # built, but the module did not load (e.g. no driver): not a compile failure
    except Exception as exc:
        failed.write_text(f"{type(exc).__name__}: {exc}\n")
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ImportError(f"compiling the cuSPARSELt extension in {build_dir} failed: {first_line} "
                          f"(details in {failed})") from exc


def load(device=None):
    """The extension module (compiled on first use) for GPU ``device`` (the current one for
    None); ImportError with the reason when it is unavailable there. Once compiled, each call
    still checks its device: on a machine of mixed GPUs another one may lack sparse tensor cores."""
    global _module
    why = why_unavailable(device) if _module is None else _no_sparse_cores(device)
    if why is not None:
        raise ImportError(f"the cuSPARSELt extension is unavailable: {why}")
    if _module is None:
        _module = compile_extension()
    return _module


def make_linear(weight, fuse_output: bool = True):
    """A ``SparseLtLinear`` for a 2:4 CUDA weight [out, in] (fp16/bf16): checked and compressed
    once; ``lin(x)`` / ``lin.forward(x)`` computes ``x @ weight.T`` for x [T, in]. With
    ``fuse_output=False`` cuSPARSELt writes y^T and forward copies it to y (for comparison)."""
    return load(weight.device).SparseLtLinear(weight, fuse_output)
