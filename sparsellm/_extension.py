"""Where the CUDA extension ``sparsellm._C`` comes from (:func:`load_extension`).

1. The extension built at install time (``sparsellm._C``, built by setup.py where the build
   sees a CUDA build of torch, e.g. ``pip install --no-build-isolation .``).
2. Otherwise, on a machine that can use it (a CUDA build of torch, a visible GPU, the CUDA
   toolkit and ninja), it is compiled once on first use with ``torch.utils.cpp_extension.load``
   from the sources shipped in the package (``sparsellm/csrc``; ``csrc/`` in a checkout) and
   kept in a per-user cache keyed by the torch and CUDA versions, the GPU architectures and a
   hash of the sources, definitions and flags; later imports only load it.
   ``SPARSELLM_JIT=0`` turns this off; ``SPARSELLM_EXT_CACHE`` chooses the cache folder
   (default ``$TORCH_EXTENSIONS_DIR/sparsellm``, else ``~/.cache/sparsellm/extension``).
3. Otherwise ImportError, with the reason. On a CPU-only machine nothing is compiled and
   nothing is printed: the cuda backend is just unavailable.

Either way the module must report the constants of :mod:`sparsellm.kernel_constants` it was
compiled with, equal to Python's; a stale build is refused (and, where possible, rebuilt).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from . import kernel_constants

JIT_ENV = "SPARSELLM_JIT"
CACHE_ENV = "SPARSELLM_EXT_CACHE"
MODULE_NAME = "sparsellm_C"
COMPILING_MESSAGE = "compiling the sparsellm CUDA extension (about a minute, once)..."
_OFF = ("0", "off", "false", "no")
_PKG_DIR = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def load_extension():
    """The extension module, built-in or compiled on first use; ImportError with the reason."""
    try:
        from . import _C
    except ImportError as exc:
        problem = f"not built ({exc})"
    else:
        problem = constants_mismatch(_C)
        if problem is None:
            return _C
        problem = f"built but {problem}"
    why_not = why_no_jit()
    if why_not is not None:
        raise ImportError(f"the CUDA extension sparsellm._C is {problem}, and it is not compiled on first use "
                          f"here: {why_not}")
    module = _jit_load()
    mismatch = constants_mismatch(module)
    if mismatch is not None:  # only a bug can get here: the build was just given the definitions
        raise ImportError(f"the CUDA extension compiled on first use {mismatch}")
    return module


def constants_mismatch(module) -> str | None:
    """Why ``module`` does not match :mod:`sparsellm.kernel_constants`, or None when it does."""
    compiled = getattr(module, "compiled_constants", None)
    if compiled is None:
        return "predates compiled_constants() (built from older sources): rebuild it"
    compiled = dict(compiled())
    expected = kernel_constants.CONSTANTS
    if compiled != expected:
        diff = ", ".join(f"{name}={compiled.get(name)} (Python: {expected.get(name)})"
                         for name in sorted(set(compiled) | set(expected)) if compiled.get(name) != expected.get(name))
        return f"was compiled with other constants than sparsellm/kernel_constants.py: {diff}; rebuild it"
    return None


def why_no_jit() -> str | None:
    """Why the extension cannot be compiled on first use here, or None when it can. The cheap
    checks come first: a CPU-only torch never gets as far as looking for a toolkit."""
    if os.environ.get(JIT_ENV, "").strip().lower() in _OFF:
        return f"{JIT_ENV}={os.environ[JIT_ENV]}"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if csrc_dir() is None:
        return "its sources (sparsellm/csrc) are not installed"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc on PATH or CUDA_HOME)"
    if not _find_ninja():
        return "the ninja build tool is missing (pip install ninja)"
    return None


def csrc_dir() -> Path | None:
    """The extension's sources: ``sparsellm/csrc`` when installed, ``csrc/`` in a checkout."""
    for candidate in (_PKG_DIR / "csrc", _PKG_DIR.parent / "csrc"):
        if (candidate / "sparsellm_ops.h").is_file():
            return candidate
    return None


def source_hash(src: Path) -> str:
    """sha256 of what decides the compiled code: every source and header in ``src`` (names and
    contents) and the compile flags with the constants' definitions."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(src).iterdir() if p.suffix in _SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for flags in kernel_constants.compile_flags():
        digest.update("\0".join(flags).encode() + b"\1")
    return digest.hexdigest()


def cache_key(torch_version: str, cuda_version: str, arch: str, src_hash: str) -> str:
    """Folder name of one build: a build is reused only by the same torch, CUDA, Python,
    architectures and sources."""
    key = f"torch{torch_version}-cu{cuda_version}-{sys.implementation.cache_tag}-{arch}-{src_hash[:16]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def arch_tag() -> str:
    """The GPU architectures the build targets: TORCH_CUDA_ARCH_LIST, else the visible devices
    (what torch.utils.cpp_extension compiles for)."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list and arch_list != "native":
        return "arch" + arch_list
    import torch

    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "sm" + "_".join(f"{major}{minor}" for major, minor in caps)


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "sparsellm"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsellm" / "extension"


def _find_ninja() -> bool:
    """torch.utils.cpp_extension runs ``ninja`` from PATH; the ninja wheel (a dependency) puts it
    in the environment's bin folder, which PATH lacks when the venv is not activated."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def open_build_dir(build_dir: Path, module_name: str, what: str, compiling_message: str) -> Path:
    """Create the JIT build folder ``build_dir`` and return its FAILED marker's path. Refuses
    (ImportError) a folder where a build failed before: a toolchain that failed once fails
    again, so do not spend a minute on it at every import. Prints ``compiling_message`` when
    ``module_name`` is not built there yet."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    failed = build_dir / "FAILED"
    if failed.exists():
        raise ImportError(f"{what} in {build_dir} failed before (details in {failed}); delete that folder "
                          "to try again")
    if not (build_dir / f"{module_name}{cpp_extension.LIB_EXT}").exists():
        print(compiling_message, file=sys.stderr, flush=True)
    return failed


def _jit_load():
    import torch
    from torch.utils import cpp_extension

    src = csrc_dir()
    build_dir = cache_root() / cache_key(torch.__version__, torch.version.cuda, arch_tag(), source_hash(src))
    failed = open_build_dir(build_dir, MODULE_NAME, "the CUDA extension sparsellm._C is not built, and compiling it",
                            COMPILING_MESSAGE)
    cxx_flags, nvcc_flags = kernel_constants.compile_flags()
    try:
        return cpp_extension.load(name=MODULE_NAME, sources=kernel_constants.extension_sources(src),
                                  extra_cflags=cxx_flags, extra_cuda_cflags=nvcc_flags,
                                  extra_include_paths=[str(src)], build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # a failed compile only makes the backend unavailable
        failed.write_text(f"{type(exc).__name__}: {exc}\n")
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ImportError(f"the CUDA extension sparsellm._C is not built, and compiling it in {build_dir} failed: "
                          f"{first_line} (details in {failed})") from exc
