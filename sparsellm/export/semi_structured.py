"""GPU sparse inference: torch's 2:4 semi-structured kernels (CUTLASS / cuSPARSELt; CUDA,
compute capability >= 8.0, fp16/bf16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sparsity import nm_violations
from .targets import ON_META, resolve_targets


def is_semi_structured(t) -> bool:
    cls = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return cls is not None and isinstance(t, cls)


def _semi_structured_backend() -> tuple[str, type | None]:
    """The subclass ``to_sparse_semi_structured`` will pick: cuSPARSELt unless it is missing or
    CUTLASS is forced."""
    base = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    if base is None:
        return "none", None
    cusparselt = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)()
    if getattr(base, "_FORCE_CUTLASS", False) or not cusparselt:
        return "cutlass", torch.sparse.SparseSemiStructuredTensorCUTLASS
    return "cusparselt", torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def _semi_structured_shape_rule(dtype) -> tuple[int, int]:
    """(row multiple, column multiple) the active backend needs for a weight of ``dtype``."""
    _, cls = _semi_structured_backend()
    rule = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype) if cls is not None else None
    if rule is None:  # torch without the class table: CUTLASS fp16/bf16 limits, the stricter ones
        return 32, 64
    return rule.sparse_min_rows, rule.sparse_min_cols


def semi_structured_eligible(linear) -> tuple[bool, str]:
    """Can this linear's weight go to ``torch.sparse.to_sparse_semi_structured`` without
    changing the model? Checks, in order: a 2:4 pattern (at least 2 zeros in every 4 input
    weights -- the converter keeps 2 per group and silently drops any others), the backend's
    shape multiples, fp16/bf16, and a CUDA device of compute capability >= 8.0."""
    if not isinstance(linear, nn.Linear):
        return False, f"not an nn.Linear ({type(linear).__name__})"
    w = linear.weight
    if is_semi_structured(w):
        return False, "already semi-structured"
    if w.dim() != 2:
        return False, f"weight is {w.dim()}-D"
    if w.device.type == "meta":
        return False, ON_META
    rows, cols = w.shape
    if cols % 4:
        return False, f"input size {cols} is not a multiple of 4, so it has no 2:4 groups"
    bad = nm_violations(w, 2, 4)
    if bad:
        return False, f"not 2:4 sparse: {bad} of {w.numel() // 4} groups of 4 hold more than 2 non-zeros"
    backend, _ = _semi_structured_backend()
    row_mult, col_mult = _semi_structured_shape_rule(w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16)
    if rows % row_mult or cols % col_mult:
        return False, (f"shape {rows}x{cols} is not a multiple of {row_mult}x{col_mult}, which the {backend} "
                       "2:4 kernels need (padding the input dimension would cost a copy of every input)")
    if w.dtype not in (torch.float16, torch.bfloat16):
        return False, f"dtype {w.dtype} is not float16/bfloat16; cast the model first"
    if w.device.type != "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device: torch's 2:4 kernels (CUTLASS/cuSPARSELt) run only on NVIDIA GPUs"
        return False, f"weight is on {w.device}; move the model to CUDA first"
    cap = torch.cuda.get_device_capability(w.device)
    if cap < (8, 0):
        return False, f"compute capability {cap[0]}.{cap[1]} < 8.0 has no sparse tensor cores"
    return True, "ok"


def to_semi_structured(model, *, targets: list[str] | None = None) -> dict:
    """Swap eligible targeted linears' weights in place for 2:4 semi-structured tensors; the
    others stay dense. Returns a JSON-able report."""
    from torch.sparse import to_sparse_semi_structured

    selected, _, _ = resolve_targets(model, targets)
    backend, _ = _semi_structured_backend()
    report = {"kind": "semi-structured", "backend": backend, "converted": [], "dense": {}}
    if not torch.cuda.is_available():
        report["available"] = False
        report["note"] = ("no CUDA device: there is no 2:4 semi-structured path on CPU "
                          "(torch's kernels need an NVIDIA GPU of compute capability >= 8.0); the model stays dense")
    else:
        report["available"] = True
    for name, lin in selected.items():
        ok, reason = semi_structured_eligible(lin)
        if not ok:
            report["dense"][name] = reason
            continue
        dense = lin.weight.detach()
        sparse = to_sparse_semi_structured(dense.contiguous())
        # Guard against the converter's silent drop of extra non-zeros (or a backend bug): one
        # small product must match the dense one before the swap is kept. The probe has its own
        # seeded generator: the same check on every run, and the caller's random state untouched.
        with torch.no_grad():
            gen = torch.Generator(device=dense.device).manual_seed(0)
            probe = torch.randn(16, dense.shape[1], dtype=dense.dtype, device=dense.device, generator=gen)
            want = F.linear(probe, dense).float()
            got = F.linear(probe, sparse).float()
        err = (got - want).abs().max().item()
        tol = 1e-2 * want.abs().max().item() + 1e-3
        if not err <= tol:
            report["dense"][name] = f"converted weight changed the output (max error {err:.3g} > {tol:.3g})"
            continue
        lin.weight = nn.Parameter(sparse, requires_grad=False)
        report["converted"].append(name)
    report["n_converted"] = len(report["converted"])
    report["n_dense"] = len(report["dense"])
    return report
