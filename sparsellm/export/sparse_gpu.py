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
which picks the Triton kernel on CUDA and the reference elsewhere) at or below it. A 2:4 linear
runs cuSPARSELt instead of ``F.linear`` from ``prefill_min_tokens`` tokens on, where the kernels'
config table has measured that it beats dense there (:mod:`sparsellm.kernels.sparse_configs`;
none has yet, so by default prefill is dense): our binding (:mod:`.cusparselt`), its matmul plan
built once per token count and reused, its compressed copy of the weight built at the export (or
at the first such call) and kept beside the module.

Under ``torch.compile`` (:class:`sparsellm.decode.GreedyDecoder` with ``compile=True``) the sparse
products are the custom operators ``sparsellm::nm24_linear`` and ``sparsellm::sell_linear``:
opaque to the compiler (which fuses the small operations around them), so a decode step compiles
without a graph break at each linear. Eager calls skip the operator layer (its dispatch costs
microseconds, a visible share of a one-token call).
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from ..kernels import sparse_configs
from . import cusparselt
from ..sparsity import nm_violations, reaches_sparsity, zero_fraction
from .errors import ExportError
from .semi_structured import is_semi_structured
from .targets import ON_META, replace_module, resolve_targets

FORMATS = ("nm24", "sell")
# each format's packed buffers, in the order reference.nm24_pack / sell_pack return them
PACKED_BUFFERS = {"nm24": ("values", "meta"), "sell": ("values", "cols", "slice_ptr")}
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
PREFILL_DTYPES = (torch.float16, torch.bfloat16)  # what cuSPARSELt's 2:4 path multiplies
# Each module's cuSPARSELt linear, beside it rather than in it: a pybind object among a module's
# attributes would break deepcopy and pickling. Keyed weakly (it goes with its module) and
# stamped with the weight it was built from (device, dtype, storage, version): a moved, cast or
# modified weight gets a new one.
_PREFILL_LINEARS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# how building it fails: no cuSPARSELt or no GPU (ImportError), or the binding refusing the weight
_PREFILL_ERRORS = (ImportError, RuntimeError, ValueError)


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
    if w.device.type == "meta":
        return None, ON_META, 0.0
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


def _chosen(given: int | None, measured, default: int | None) -> tuple[int | None, str | None]:
    """(value, where it came from): the caller's ``given``, else the config table's
    (``measured()``), else ``default`` ("default"; None: neither, from None)."""
    if given is not None:
        return int(given), "argument"
    found = measured()
    if found is not None:
        return found, "table"
    return default, None if default is None else "default"


def _check_slice_rows(slice_rows: int, error: type[Exception]) -> None:
    """A sell slice height the kernel takes (a power of two >= 2), else ``error``."""
    if slice_rows < 2 or slice_rows & (slice_rows - 1):
        raise error(f"slice_rows must be a power of two >= 2, got {slice_rows}")


class SparseGPULinear(nn.Module):
    """A pruned linear with a packed sparse copy of its weight for small token counts.

    ``forward`` runs the sparse product (``ops.nm24_linear`` / ``ops.sell_linear``) when the
    call has at most ``max_sparse_tokens`` tokens (rows of x), else dense ``F.linear`` on the
    kept dense weight. ``max_sparse_tokens`` None takes the crossover measured for this format,
    dtype and shape from the kernels' config table (:mod:`sparsellm.kernels.sparse_configs`),
    else :data:`MAX_SPARSE_TOKENS`; ``crossover_from`` says which ("argument", "table",
    "default"). A 2:4 (``nm24``) linear runs cuSPARSELt instead of ``F.linear`` for calls of at
    least ``prefill_min_tokens`` tokens (None: the table's measured prefill crossover, if any;
    ``prefill`` False: never; ``prefill_from`` says where it came from); where cuSPARSELt cannot
    be built there it warns once and stays dense (``prefill_error``). ``format`` None picks it
    with :func:`choose_format` (ValueError if the weight fits neither). The dense ``weight`` is
    the one computed with: changed in place or loaded since the packing, it is packed again at
    the next eager sparse call (ValueError if a 2:4 linear's no longer fits nm24)."""

    def __init__(self, linear: nn.Linear, format: str | None = None, *, max_sparse_tokens: int | None = None,
                 min_sparsity: float = SELL_MIN_SPARSITY, slice_rows: int = SELL_SLICE_ROWS,
                 slot_block: int = SELL_SLOT_BLOCK, prefill_min_tokens: int | None = None, prefill: bool = True):
        super().__init__()
        if linear.weight.device.type == "meta":
            raise ValueError(f"linear not convertible: {ON_META}")
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
        self._given = (max_sparse_tokens, prefill_min_tokens, prefill)
        self._choose_crossovers(weight.dtype)
        self.prefill_error: str | None = None  # why a first prefill call could not build cuSPARSELt
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.slot_block = int(slot_block)
        if format == "sell":
            _check_slice_rows(self.slice_rows, ValueError)
        self._pack(weight, register=True)

    def _choose_crossovers(self, dtype: torch.dtype) -> None:
        """The token counts that pick each path, measured per dtype: chosen again when a cast
        (``.half()``) changes the weight's dtype, unless given as arguments."""
        max_sparse_tokens, prefill_min_tokens, prefill = self._given
        shape = (self.in_features, self.out_features)
        self.max_sparse_tokens, self.crossover_from = _chosen(
            max_sparse_tokens, lambda: sparse_configs.max_sparse_tokens(
                self.format, dtype, *shape, self.slice_rows if self.format == "sell" else None),
            MAX_SPARSE_TOKENS[self.format])
        # prefill through cuSPARSELt (nm24 only): from this many tokens on, or never (None); the
        # sparse kernel still runs up to max_sparse_tokens, whichever is larger
        self.prefill_min_tokens, self.prefill_from = None, None
        if prefill and self.format == "nm24":
            self.prefill_min_tokens, self.prefill_from = _chosen(
                prefill_min_tokens, lambda: sparse_configs.prefill_min_tokens(self.format, dtype, *shape), None)

    def _pack(self, weight: torch.Tensor, register: bool = False) -> None:
        """Pack ``weight`` into the format's buffers, stamped with the weight they were built from."""
        self.sparsity = zero_fraction(weight)
        packed = (reference.nm24_pack(weight) if self.format == "nm24"
                  else reference.sell_pack(weight, self.slice_rows, self.slot_block))
        for name, tensor in zip(PACKED_BUFFERS[self.format], packed):
            if register:
                self.register_buffer(name, tensor)
            else:
                setattr(self, name, tensor)
        self._packed_from = self._weight_stamp()

    def _weight_stamp(self) -> tuple:
        w = self.weight
        # a tensor made under torch.inference_mode tracks no version (reading it raises): its
        # storage only, so a model loaded and exported there still runs
        return (w.data_ptr(), None if w.is_inference() else w._version)

    def _apply(self, *args, **kwargs):
        # .to() / .half() / .cuda() convert the packed buffers with the weight: still in sync
        dtype = self.weight.dtype
        out = super()._apply(*args, **kwargs)
        self._packed_from = self._weight_stamp()
        if self.weight.dtype != dtype:  # the table's crossovers are per dtype
            self._choose_crossovers(self.weight.dtype)
        return out

    def _repack_if_changed(self) -> None:
        """The weight is what the module computes with (dense above the crossover, cuSPARSELt's
        copy rebuilt from it): a weight changed in place or loaded alone since the packing is
        packed again, else the sparse calls would multiply the old one. Eager calls only (a
        compiled or graph-replayed step runs the buffers it was traced with)."""
        if self._packed_from == self._weight_stamp():
            return
        try:
            self._pack(self.weight.detach())
        except ValueError as exc:
            raise ValueError(f"SparseGPULinear: the changed weight no longer fits {self.format}: {exc}") from exc

    def packed_bytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in PACKED_BUFFERS[self.format])

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

    def prefill_unavailable(self) -> str | None:
        """Why cuSPARSELt cannot multiply this weight where it is now, or None when it can."""
        w = self.weight
        if w.device.type != "cuda":
            return f"weights on {w.device.type}: cuSPARSELt runs on CUDA GPUs"
        if w.dtype not in PREFILL_DTYPES:
            return f"weight dtype {w.dtype}: cuSPARSELt's 2:4 path takes float16/bfloat16"
        return cusparselt.why_unavailable(w.device)

    def prefill_linear(self):
        """The cuSPARSELt linear of the current weight, built on first use (the extension
        compiled once, the weight compressed); ImportError / RuntimeError when it cannot be."""
        w = self.weight
        stamp = (w.device, w.dtype, *self._weight_stamp())
        held = _PREFILL_LINEARS.get(self)
        if held is None or held[0] != stamp:
            why = self.prefill_unavailable()
            if why is not None:
                raise ImportError(f"cuSPARSELt unavailable: {why}")
            held = _PREFILL_LINEARS[self] = (stamp, cusparselt.make_linear(w))
        return held[1]

    def prefill_forward(self, x: torch.Tensor, lin) -> torch.Tensor:
        y = lin(x.reshape(-1, self.in_features).contiguous())
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _prefill_or_none(self):
        """The cuSPARSELt linear, or None (dense) after a warning the first time it fails."""
        if self.prefill_error is not None:
            return None
        try:
            return self.prefill_linear()
        except _PREFILL_ERRORS as exc:
            self.prefill_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"SparseGPULinear: prefill runs dense F.linear: {self.prefill_error}", RuntimeWarning,
                          stacklevel=3)
            return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        if n <= self.max_sparse_tokens * self.in_features:
            if not torch.compiler.is_compiling():
                self._repack_if_changed()
            return self.sparse_forward(x)
        # cuSPARSELt is opaque to torch.compile (a pybind call): a compiled model's prefill is dense
        if (self.prefill_min_tokens is not None and n >= self.prefill_min_tokens * self.in_features
                and not torch.compiler.is_compiling()):
            lin = self._prefill_or_none()
            if lin is not None:
                try:
                    return self.prefill_forward(x, lin)
                except RuntimeError as exc:  # a call the built linear refuses: dense from now on, said once
                    self.prefill_error = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"SparseGPULinear: cuSPARSELt failed on a {n // self.in_features}-token call; "
                                  f"prefill runs dense F.linear: {self.prefill_error}", RuntimeWarning, stacklevel=2)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        prefill = ("" if self.prefill_min_tokens is None
                   else f", cusparselt_from_tokens={self.prefill_min_tokens} ({self.prefill_from})")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, sparsity={self.sparsity:.3f}, max_sparse_tokens={self.max_sparse_tokens} "
                f"({self.crossover_from}){prefill}")


def _prefill_report(mod: SparseGPULinear) -> dict:
    """A converted linear's prefill path for the report: its cuSPARSELt copy built now when the
    weight is on a GPU (one that cannot be built turns the path off, the reason kept), checked at
    the first prefill call when it is elsewhere."""
    if mod.prefill_min_tokens is None:
        return {"prefill": None}
    if mod.weight.device.type == "cuda":
        try:
            mod.prefill_linear()
        except _PREFILL_ERRORS as exc:
            off = {"prefill": None, "prefill_off": f"{type(exc).__name__}: {exc}"[:300],
                   "prefill_asked": {"min_tokens": mod.prefill_min_tokens, "from": mod.prefill_from}}
            mod.prefill_min_tokens = mod.prefill_from = None
            return off
        note = "cuSPARSELt built"
    else:
        note = f"weights on {mod.weight.device.type}: cuSPARSELt is built at the first prefill call on a GPU"
    return {"prefill": {"path": "cusparselt", "min_tokens": mod.prefill_min_tokens, "from": mod.prefill_from,
                        "note": note}}


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
                  max_sparse_tokens: dict | int | None = None, slice_rows: int = SELL_SLICE_ROWS,
                  prefill_min_tokens: int | None = None, prefill: bool = True) -> dict:
    """Replace targeted pruned linears by :class:`SparseGPULinear` (2:4 -> ``nm24``, else
    sparsity >= ``min_sparsity`` -> ``sell``; the others stay dense). ``max_sparse_tokens``:
    one crossover for both formats, or {format: tokens}; a format without one takes each
    linear's measured crossover from the kernels' config table, else :data:`MAX_SPARSE_TOKENS`.
    ``prefill_min_tokens``: from how many tokens 2:4 linears run cuSPARSELt (None: each linear's
    measured prefill crossover from the table, if any); ``prefill`` False keeps prefill dense.
    A linear whose weights are on a GPU builds its cuSPARSELt copy here, and one that cannot
    (no cuSPARSELt, a dtype or shape it refuses) stays dense above its crossover, the report
    saying why. Returns a JSON-able report of what each linear runs on (format, crossovers and
    where they came from, the config table in effect) and why the others stay dense."""
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
    if prefill_min_tokens is not None and int(prefill_min_tokens) < 1:
        raise ExportError(f"prefill_min_tokens must be >= 1, got {prefill_min_tokens}")
    _check_slice_rows(slice_rows, ExportError)  # before any linear is replaced
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
        new = SparseGPULinear(lin, fmt, max_sparse_tokens=given.get(fmt), slice_rows=slice_rows,
                              prefill_min_tokens=prefill_min_tokens, prefill=prefill)
        entry = {"format": fmt, "why": reason, "sparsity": round(sparsity, 6)}
        entry.update(_prefill_report(new))
        replace_module(model, name, new)
        devices.add(str(lin.weight.device))
        packed, dense = new.packed_bytes(), new.dense_bytes()
        entry.update(bytes=packed, dense_bytes=dense, bytes_ratio=round(packed / dense, 6),
                     max_sparse_tokens=new.max_sparse_tokens, crossover_from=new.crossover_from)
        report["converted"][name] = entry
    report["n_converted"] = len(report["converted"])
    report["n_dense"] = len(report["dense"])
    report["formats"] = {f: sum(1 for v in report["converted"].values() if v["format"] == f) for f in FORMATS}
    notes = [kernels_available(d) for d in sorted(devices)]
    report["available"] = bool(notes) and all(ok for ok, _ in notes)
    if not report["available"]:
        report["note"] = ("; ".join(why for ok, why in notes if not ok) if notes
                          else "no linear converted (see 'dense' for the reasons)")
    return report
