"""The arithmetic of float32 matmuls inside a block of code: SparseLLM's large products
(``SparseLLMSettings.product_precision``) and Elsa's training passes
(``ElsaSettings.train_precision``) switch it the same way; and which library multiplies float32
matrices on the CPU (``SparseLLMSettings.cpu_gemm``)."""
from __future__ import annotations

import contextlib

import torch

# float32 GEMMs on the CPU (SparseLLMSettings.cpu_gemm, config.CPU_GEMMS). torch's matmul calls
# MKL, which dispatches its AVX-512 kernels on Intel CPUs only: on a 2-core AMD EPYC with AVX-512
# (Zen 5) a [5461, 576] x [576, 1536] product took 50 ms (194 GFLOP/s, the AVX2 kernels' rate)
# where oneDNN's float32 GEMM, which torch ships for its mkldnn operators, took 23 ms, in IEEE
# float32 (a product with the identity comes out exact; 1.6x to 2.2x faster on every product
# shape of SparseLLM's solver, one or two threads). The results differ from MKL's in summation
# order only (about 1e-6 of the largest entry against float64, MKL's 3e-7 to 4e-7).


def onednn_gemm_available() -> bool:
    """Whether this torch can run float32 GEMMs through oneDNN in IEEE float32: built with it,
    with its linear operator, and not told to let oneDNN round float32 operands to bfloat16 or
    TF32 (``torch.backends.mkldnn.matmul.fp32_precision``)."""
    mkldnn = torch.backends.mkldnn
    if not (mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return getattr(getattr(mkldnn, "matmul", None), "fp32_precision", "none") in ("none", "ieee")


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where neither it nor its transpose is contiguous: oneDNN's GEMM
    took 18 s instead of 15 ms on a [1280, 5461] operand sliced from a [5461, 1536] tensor's
    columns (a row stride wider than the row), where the same product of dense operands ran fast."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T of 2-D float32 CPU tensors by oneDNN's float32 GEMM (see the comment above; check
    :func:`onednn_gemm_available` first). An operand that is a strided slice is copied first."""
    return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(w), None, "none", [], "")


@contextlib.contextmanager
def large_products(device: torch.device, precision: str):
    """Inside the block, float32 matmuls on ``device`` run in ``precision`` ("tf32": the tensor
    cores' TF32 mode, on CUDA only; anything else: unchanged). The setting before is restored."""
    matmul = torch.backends.cuda.matmul
    if device.type != "cuda" or precision != "tf32" or getattr(matmul, "fp32_precision", None) == "tf32":
        yield  # nothing to switch: not asked, or TF32 already (set through torch >= 2.9's fp32_precision)
        return
    # The switch goes through the legacy allow_tf32 on every torch: torch >= 2.9 keeps the two
    # names in step when allow_tf32 is set, but once fp32_precision is set to "tf32" a read of
    # allow_tf32 raises ("mix of the legacy and new APIs"), and code inside the block reads it
    # (torch.compile's inductor among others). Not TF32 before, so allow_tf32 reads False or
    # True (set through it) without raising, and is restored through it.
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the local methods' statistics and solves for a model in ``dtype``: float32,
    or the model's own where it is wider. A float64 model (the benchmarks' ``--float64``) is
    pruned in float64 throughout, which takes rounding out of comparisons of two methods that
    should agree (``benchmarks/sparsegpt_reference_loop.py``): at high sparsity, float32 rounding
    alone moves a pruned model's perplexity by a factor of two or more (README, Quality)."""
    return torch.promote_types(dtype, torch.float32)
