"""GPU sparse decode: our Triton 2:4 and sliced-ELLPACK kernels (:class:`SparseGPULinear`,
:func:`to_sparse_gpu`).

Decode (a few tokens per call) is memory-bound: it reads every weight once for two flops, so a
linear that stores fewer bytes runs faster. torch's 2:4 path (cuSPARSELt/CUTLASS) is tuned for
large matmuls and loses to dense cuBLAS there; ``kernels/sparse_matmul.py`` reads the packed
weight once with wide loads and decompresses in registers. Formats (specified, packed and
unpacked in :mod:`sparsellm.reference`):

* ``nm24``: at most 2 non-zeros per group of 4 inputs (2:4 and 3:4 patterns), in_features a
  multiple of 32: fp16 values for half the weights plus 4 bits of positions per group
  (0.5625x the dense bytes in fp16).
* ``sell``: sliced ELLPACK for unstructured weights of sparsity >= :data:`SELL_MIN_SPARSITY`:
  values and int16 column indices of the non-zeros (plus slice padding).

Prefill (many tokens) is compute-bound, where the dense tensor-core GEMM wins, so a
:class:`SparseGPULinear` keeps the dense weight too and runs ``F.linear`` above
``max_sparse_tokens`` tokens per call, and the sparse kernel (through :mod:`sparsellm.ops`,
which picks the Triton kernel on CUDA and the reference elsewhere) at or below it.

Under ``torch.compile`` (:class:`sparsellm.decode.GreedyDecoder` with ``compile=True``) the sparse
products are the custom operators ``sparsellm::nm24_linear`` and ``sparsellm::sell_linear``:
opaque to the compiler (which fuses the small operations around them), so a decode step compiles
without a graph break at each linear. Eager calls skip the operator layer (its dispatch costs
microseconds, a visible share of a one-token call).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from ..kernels import sparse_configs
from ..sparsity import nm_violations, reaches_sparsity, zero_fraction
from .errors import ExportError
from .semi_structured import is_semi_structured
from .targets import replace_module, resolve_targets

FORMATS = ("nm24", "sell")
# Unstructured weights below this sparsity stay dense: int16 index + value per non-zero is
# 2x the dense bytes per kept weight in fp16, so below ~50% sparsity it reads more than dense,
# and the gathers need a margin on top. To be measured on the GPU (benchmarks/bench_export.py).
SELL_MIN_SPARSITY = 0.7
# Tokens per call up to which the sparse kernel runs; above, the dense GEMM (kept alongside).
# Measured on an H100 (benchmarks/RESULTS.md, "GPU sparse decode", kernel time at 7B shapes):
# at 1 token the kernels beat dense (2:4 1.28-1.44x, 90% 2.26-3.09x); at 16 tokens, the next
# size measured, both lose (2:4 0.22-0.62x, 90% 0.47-0.58x). Sizes 2-15 are not measured, and
# 2 tokens and more take the multi-token paths, which lost at 16: so 1 token only, for now.
NM24_MAX_TOKENS = 1
SELL_MAX_TOKENS = 1
MAX_SPARSE_TOKENS = {"nm24": NM24_MAX_TOKENS, "sell": SELL_MAX_TOKENS}
# Rows per slice (a power of two: a program's row block). A slice's [slots, rows] tile is
# contiguous whatever its height, so smaller slices cost nothing in coalescing, pad less (each
# slice is as wide as its longest row) and give more programs. 8 rows: in the one-token sweep
# (benchmarks/sparse_gpu_sweep.py, H200, commit f8def43, 90% magnitude-pruned fp16, 128-slot
# blocks, 4 warps) 8-row slices ran at 2.08x / 2.77x / 2.87x dense on 4096->4096 / 4096->11008 /
# 11008->4096, 16-row slices at 2.04x / 2.46x / 2.74x (benchmarks/results/gpu_h200_f8def43/).
SELL_SLICE_ROWS = 8
SELL_SLOT_BLOCK = 16  # slice widths are rounded up to this many slots


@torch.library.custom_op("sparsellm::nm24_linear", mutates_args=(),
                         schema="(Tensor x, Tensor values, Tensor meta, int in_features, Tensor? bias) -> Tensor")
def _nm24_linear_op(x, values, meta, in_features, bias):
    return ops.nm24_linear(x, values, meta, in_features, bias)


@_nm24_linear_op.register_fake
def _(x, values, meta, in_features, bias):
    return x.new_empty(*x.shape[:-1], values.shape[0])


@torch.library.custom_op("sparsellm::sell_linear", mutates_args=(),
                         schema="(Tensor x, Tensor values, Tensor cols, Tensor slice_ptr, int out_features, "
                                "int in_features, int slice_rows, Tensor? bias) -> Tensor")
def _sell_linear_op(x, values, cols, slice_ptr, out_features, in_features, slice_rows, bias):
    return ops.sell_linear(x, values, cols, slice_ptr, out_features, in_features, slice_rows, bias)


@_sell_linear_op.register_fake
def _(x, values, cols, slice_ptr, out_features, in_features, slice_rows, bias):
    return x.new_empty(*x.shape[:-1], out_features)


def choose_format(linear: nn.Module, min_sparsity: float = SELL_MIN_SPARSITY) -> tuple[str | None, str, float]:
    """(format or None, reason, sparsity) for a linear: ``nm24`` when its weight is 2:4 (at
    most 2 non-zeros per group of 4 inputs) and in_features % 32 == 0, else ``sell`` when it
    is pruned to at least ``min_sparsity`` (up to the pruners' rounding: :func:`reaches_sparsity`),
    else None with the reason it stays dense."""
    if not isinstance(linear, nn.Linear):
        return None, f"not an nn.Linear ({type(linear).__name__})", 0.0
    w = linear.weight
    if is_semi_structured(w):
        return None, "already a torch semi-structured weight", 0.0
    if w.dim() != 2:
        return None, f"weight is {w.dim()}-D", 0.0
    if not w.is_floating_point():
        return None, f"weight dtype {w.dtype} is not a float type", 0.0
    rows, cols = w.shape
    sparsity = zero_fraction(w.detach())
    nm_note = ""
    if cols % 4 == 0 and nm_violations(w, 2, 4) == 0:
        if cols % reference.NM24_K_MULTIPLE == 0:
            return "nm24", "2:4", sparsity
        nm_note = f"2:4 but in_features {cols} % {reference.NM24_K_MULTIPLE} != 0; "
    if reaches_sparsity(sparsity, min_sparsity, cols):
        if cols > 65536:
            return None, f"{nm_note}in_features {cols} > 65536 does not fit int16 column indices", sparsity
        return "sell", f"{nm_note}unstructured, sparsity {sparsity:.5f} >= {min_sparsity:g}", sparsity
    return None, (f"{nm_note}not 2:4 and sparsity {sparsity:.5f} < {min_sparsity:g}, "
                  "below which the sparse kernel does not beat dense"), sparsity


class SparseGPULinear(nn.Module):
    """A pruned linear with a packed sparse copy of its weight for small token counts.

    ``forward`` runs the sparse product (``ops.nm24_linear`` / ``ops.sell_linear``) when the
    call has at most ``max_sparse_tokens`` tokens (rows of x), else dense ``F.linear`` on the
    kept dense weight. ``max_sparse_tokens`` None takes the crossover measured for this format,
    dtype and shape from the kernels' config table (:mod:`sparsellm.kernels.sparse_configs`),
    else :data:`MAX_SPARSE_TOKENS`; ``crossover_from`` says which ("argument", "table",
    "default"). ``format`` None picks it with :func:`choose_format` (ValueError if the weight
    fits neither)."""

    def __init__(self, linear: nn.Linear, format: str | None = None, *, max_sparse_tokens: int | None = None,
                 min_sparsity: float = SELL_MIN_SPARSITY, slice_rows: int = SELL_SLICE_ROWS,
                 slot_block: int = SELL_SLOT_BLOCK):
        super().__init__()
        if format is None:
            format, reason, _ = choose_format(linear, min_sparsity)
            if format is None:
                raise ValueError(f"linear not convertible: {reason}")
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.format = format
        weight = linear.weight.detach()
        self.slice_rows = int(slice_rows)
        if max_sparse_tokens is not None:
            self.max_sparse_tokens, self.crossover_from = int(max_sparse_tokens), "argument"
        else:
            measured = sparse_configs.max_sparse_tokens(format, weight.dtype, self.in_features, self.out_features,
                                                        self.slice_rows if format == "sell" else None)
            self.max_sparse_tokens, self.crossover_from = ((MAX_SPARSE_TOKENS[format], "default") if measured is None
                                                           else (measured, "table"))
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.sparsity = zero_fraction(weight)
        if format == "nm24":
            values, meta = reference.nm24_pack(weight)
            self.register_buffer("values", values)
            self.register_buffer("meta", meta)
        else:
            if self.slice_rows < 2 or self.slice_rows & (self.slice_rows - 1):
                raise ValueError(f"slice_rows must be a power of two >= 2, got {slice_rows}")
            values, cols, slice_ptr = reference.sell_pack(weight, self.slice_rows, slot_block)
            self.register_buffer("values", values)
            self.register_buffer("cols", cols)
            self.register_buffer("slice_ptr", slice_ptr)

    def packed_bytes(self) -> int:
        names = ("values", "meta") if self.format == "nm24" else ("values", "cols", "slice_ptr")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def dense_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()  # the custom operators (module docs), else ops directly
        if self.format == "nm24":
            fn = _nm24_linear_op if compiling else ops.nm24_linear
            return fn(x, self.values, self.meta, self.in_features, self.bias)
        fn = _sell_linear_op if compiling else ops.sell_linear
        return fn(x, self.values, self.cols, self.slice_ptr, self.out_features, self.in_features, self.slice_rows,
                  self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.max_sparse_tokens * self.in_features:
            return F.linear(x, self.weight, self.bias)
        return self.sparse_forward(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, sparsity={self.sparsity:.3f}, max_sparse_tokens={self.max_sparse_tokens} "
                f"({self.crossover_from})")


def kernels_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether the Triton kernels run for weights on ``device``, and why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, (f"weights on {device.type}: the sparse kernels need a CUDA GPU (Triton); the sparse "
                       "products run the plain-PyTorch reference instead, correct but slower than dense")
    if not ops.available("triton", device):
        return False, ("triton is not available (pip install 'sparsellm[triton]'): the sparse products run "
                       "the plain-PyTorch reference, slower than dense")
    return True, "ok"


def to_sparse_gpu(model, *, targets: list[str] | None = None, min_sparsity: float = SELL_MIN_SPARSITY,
                  max_sparse_tokens: dict | int | None = None, slice_rows: int = SELL_SLICE_ROWS) -> dict:
    """Replace targeted pruned linears by :class:`SparseGPULinear` (2:4 -> ``nm24``, else
    sparsity >= ``min_sparsity`` -> ``sell``; the others stay dense). ``max_sparse_tokens``:
    one crossover for both formats, or {format: tokens}; a format without one takes each
    linear's measured crossover from the kernels' config table, else :data:`MAX_SPARSE_TOKENS`.
    Returns a JSON-able report of what each linear runs on (format, crossover and where it came
    from, the config table in effect) and why the others stay dense."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise ExportError(f"min_sparsity must lie in [0, 1], got {min_sparsity}")
    given: dict = {}  # the caller's crossovers, by format
    if isinstance(max_sparse_tokens, dict):
        unknown = set(max_sparse_tokens) - set(FORMATS)
        if unknown:
            raise ExportError(f"max_sparse_tokens: unknown formats {sorted(unknown)}; expected {FORMATS}")
        given = {k: int(v) for k, v in max_sparse_tokens.items()}
    elif max_sparse_tokens is not None:
        given = {k: int(max_sparse_tokens) for k in FORMATS}
    if any(v < 0 for v in given.values()):
        raise ExportError(f"max_sparse_tokens must be >= 0 (0: always dense), got {max_sparse_tokens}")
    try:
        kernel_configs = sparse_configs.describe()
    except sparse_configs.ConfigTableError as exc:  # a bad table: refused before any linear is replaced
        raise ExportError(str(exc)) from exc
    selected, _, _ = resolve_targets(model, targets)
    # max_sparse_tokens: the caller's, else the constants (each linear's own, perhaps measured, in "converted")
    report = {"kind": "sparse-gpu", "min_sparsity": min_sparsity, "max_sparse_tokens": {**MAX_SPARSE_TOKENS, **given},
              "kernel_configs": kernel_configs, "converted": {}, "dense": {}}
    devices = set()
    for name, lin in selected.items():
        fmt, reason, sparsity = choose_format(lin, min_sparsity)
        if fmt is None:
            report["dense"][name] = reason
            continue
        new = SparseGPULinear(lin, fmt, max_sparse_tokens=given.get(fmt), slice_rows=slice_rows)
        replace_module(model, name, new)
        devices.add(str(lin.weight.device))
        packed, dense = new.packed_bytes(), new.dense_bytes()
        report["converted"][name] = {"format": fmt, "why": reason, "sparsity": round(sparsity, 6),
                                     "bytes": packed, "dense_bytes": dense, "bytes_ratio": round(packed / dense, 6),
                                     "max_sparse_tokens": new.max_sparse_tokens, "crossover_from": new.crossover_from}
    report["n_converted"] = len(report["converted"])
    report["n_dense"] = len(report["dense"])
    report["formats"] = {f: sum(1 for v in report["converted"].values() if v["format"] == f) for f in FORMATS}
    notes = [kernels_available(d) for d in sorted(devices)]
    report["available"] = bool(notes) and all(ok for ok, _ in notes)
    if not report["available"]:
        report["note"] = ("; ".join(why for ok, why in notes if not ok) if notes
                          else "no linear converted (see 'dense' for the reasons)")
    return report
