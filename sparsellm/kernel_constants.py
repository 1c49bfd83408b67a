"""The one definition of the values shared by the Python code, the Triton kernels and the CUDA
extension (``csrc/``), and of how the extension is compiled.

Python and Triton code import the constants from here. The C++/CUDA sources get them as ``-D``
definitions (:func:`compile_definitions`), passed by ``setup.py`` (install-time build) and by
:mod:`sparsellm._extension` (build on first use); ``csrc/sparsellm_ops.h`` refuses to compile
without them, and the built extension reports the values it was compiled with
(``_C.compiled_constants()``), which the CUDA backend checks at import.

This file imports only the standard library: ``setup.py`` runs it with ``runpy`` without
importing sparsellm or torch (neither need be importable at build time).
"""
import glob
import os

MAX_M = 16  # largest M of an N:M pattern (masks rank by M^2 compares in registers)

# Score modes of the fused mask kernels: the score is computed in registers from the weight,
# never materialised in global memory.
SCORE_RAW = 0    # the tensor already is the score
SCORE_WANDA = 1  # |w| * ||x_j||                     (aux = the input-norm vector)
# (No OBS score w^2/hinv_jj^2 here: SparseGPT's N:M mask is chosen inside the OBS sweep, as it
# reaches each group, never for a whole matrix at once.)

# Widest block of the CUDA OBS sweep: one warp per row keeps the row in registers, 8 slots x
# 32 lanes at most (csrc/obs_block.cu); wider blocks fall back to the reference.
CUDA_OBS_MAX_BLOCK = 256

# name -> value of every constant the compiled code sees, as the macro SPARSELLM_<name>
CONSTANTS = {
    "MAX_M": MAX_M,
    "SCORE_RAW": SCORE_RAW,
    "SCORE_WANDA": SCORE_WANDA,
    "OBS_MAX_BLOCK": CUDA_OBS_MAX_BLOCK,
}

# Compiler options of the extension (besides the definitions), for both ways of building it.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def compile_definitions() -> list[str]:
    """``-DSPARSELLM_<NAME>=<value>`` for each constant, for the C++ and the nvcc command lines."""
    return [f"-DSPARSELLM_{name}={int(value)}" for name, value in CONSTANTS.items()]


def compile_flags() -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags) of the extension, the definitions included."""
    definitions = compile_definitions()
    return CXX_FLAGS + definitions, NVCC_FLAGS + definitions


def extension_sources(csrc_dir) -> list[str]:
    """The translation units of the extension in ``csrc_dir``, in a fixed order."""
    return sorted(glob.glob(os.path.join(csrc_dir, "*.cpp")) + glob.glob(os.path.join(csrc_dir, "*.cu")))
