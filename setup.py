"""Build script: pure-Python install everywhere, plus the CUDA extension `sparsellm._C`
where a CUDA build of torch and a CUDA toolkit are present.

SPARSELLM_BUILD_EXT=auto (default) builds the extension only if torch is importable in the
build environment, is a CUDA build, and CUDA_HOME is found; =1 forces it (and fails loudly);
=0 never builds it. torch is not a build requirement, so a plain (isolated) `pip install .`
builds no extension: the sources ship in the package (sparsellm/csrc) and
sparsellm/_extension.py compiles them on first use where a CUDA torch, a GPU and nvcc are
present. `pip install --no-build-isolation .` builds it now, against the installed torch.
TORCH_CUDA_ARCH_LIST is honoured by torch.utils.cpp_extension.

The constants shared with the Python side and the compiler flags come from
sparsellm/kernel_constants.py, read with runpy (importing sparsellm would need torch).
"""
import os
import runpy

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_CONSTANTS = runpy.run_path(os.path.join(HERE, "sparsellm", "kernel_constants.py"))


def _extension_kwargs():
    mode = os.environ.get("SPARSELLM_BUILD_EXT", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode in ("1", "on", "true", "yes"):
            raise RuntimeError("SPARSELLM_BUILD_EXT=1 but torch is not importable; "
                               "use `pip install --no-build-isolation .`")
        return {}
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if not have_cuda:
        if mode in ("1", "on", "true", "yes"):
            raise RuntimeError("SPARSELLM_BUILD_EXT=1 but no CUDA build of torch / CUDA_HOME found")
        return {}
    # relative to the project root, where pip runs this script (setuptools wants relative sources)
    sources = KERNEL_CONSTANTS["extension_sources"]("csrc")
    if not sources:
        if mode in ("1", "on", "true", "yes"):
            raise RuntimeError(f"SPARSELLM_BUILD_EXT=1 but no extension sources in {os.path.abspath('csrc')}; "
                               f"run the build from the project root ({HERE})")
        return {}
    cxx_flags, nvcc_flags = KERNEL_CONSTANTS["compile_flags"]()
    ext = CUDAExtension(
        name="sparsellm._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
