"""The arithmetic of float32 matmuls inside a block of code: SparseLLM's large products
(``SparseLLMSettings.product_precision``) and Elsa's training passes
(``ElsaSettings.train_precision``) switch it the same way."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def large_products(device: torch.device, precision: str):
    """Inside the block, float32 matmuls on ``device`` run in ``precision`` ("tf32": the tensor
    cores' TF32 mode, on CUDA only; anything else: unchanged). The setting before is restored."""
    matmul = torch.backends.cuda.matmul
    if device.type != "cuda" or precision != "tf32":
        yield
        return
    # torch >= 2.9 names the mode fp32_precision; older releases have the allow_tf32 switch
    attr, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    before = getattr(matmul, attr)
    setattr(matmul, attr, value)
    try:
        yield
    finally:
        setattr(matmul, attr, before)


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the local methods' statistics and solves for a model in ``dtype``: float32,
    or the model's own where it is wider. A float64 model (the benchmarks' ``--float64``) is
    pruned in float64 throughout, which takes rounding out of comparisons of two methods that
    should agree (``benchmarks/sparsegpt_reference_loop.py``): at high sparsity, float32 rounding
    alone moves a pruned model's perplexity by a factor of two or more (README, Quality)."""
    return torch.promote_types(dtype, torch.float32)
