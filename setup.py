"""Build script: pure-Python install everywhere, plus the CUDA extension `sparsellm._C`
where a CUDA build of torch and a CUDA toolkit are present.

SPARSELLM_BUILD_EXT=auto (default) builds the extension only if torch is importable in the
build environment, is a CUDA build, and CUDA_HOME is found; =1 forces it (and fails loudly);
=0 never builds it. Because torch is not a build requirement, use
`pip install --no-build-isolation .` to build against the installed torch.
TORCH_CUDA_ARCH_LIST is honoured by torch.utils.cpp_extension.
"""
import glob
import os

from setuptools import setup


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
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return {}
    ext = CUDAExtension(
        name="sparsellm._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
