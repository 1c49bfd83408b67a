"""Sparse checkpoints and sparse inference kernels for pruned models.

One module per concern:

* :mod:`.targets` -- which linears are exported (compressed-tensors ``targets`` / ``ignore``).
* :mod:`.checkpoint` -- :func:`save_pruned` / :func:`load_pruned`, the output folder's checks,
  staging and atomic publish.
* :mod:`.compressed` -- the ``sparsity_config`` block, where it goes in config.json, and the
  ``sparse-bitmask`` weight format (compressed-tensors layout; the ``compressed`` extra).
* :mod:`.semi_structured` -- torch's 2:4 CUTLASS/cuSPARSELt kernels (CUDA, compute
  capability >= 8.0, fp16/bf16).
* :mod:`.csr` -- float32 CSR matmul, which beats dense on CPU only at high sparsity (see
  benchmarks/RESULTS.md for the measurement behind :data:`CSR_MIN_SPARSITY`).
* :mod:`.sparse_gpu` -- our Triton decode kernels (``kernels/sparse_matmul.py``): 2:4 packed
  (``nm24``) and sliced ELLPACK (``sell``) for unstructured sparsity >= :data:`SELL_MIN_SPARSITY`,
  with the dense weight kept for calls of many tokens (prefill).

:func:`apply_export` is the CLI's ``--export`` switch over the three kernel kinds.
"""
from __future__ import annotations

from .. import config
from .checkpoint import (EXPORT_META_KEY, NM_CONVENTION, StagedCheckpoint, check_output_dir, check_writable,
                         folder_holds, load_pruned, parse_structure, save_pruned, stage_pruned)
from .compressed import (COMPRESSED_SUFFIXES, EXTRA_INSTALL, FORMAT_BITMASK, FORMAT_DENSE, QUANT_METHOD,
                         QUANTIZATION_CONFIG_KEY, SAVE_FORMATS, SPARSITY_CONFIG_KEY, check_save_format,
                         compress_bitmask, decompress_bitmask, pack_bitmask, unpack_bitmask)
from .csr import CSR_MIN_SPARSITY, CSRLinear, to_csr
from .errors import CheckpointError, ExportError
from .semi_structured import semi_structured_eligible, to_semi_structured
from .sparse_gpu import SELL_MIN_SPARSITY, SparseGPULinear, to_sparse_gpu
from .targets import resolve_targets

EXPORT_KINDS = (None, *config.EXPORT_KINDS)  # the names are defined once, with the settings


def apply_export(model, kind: str | None) -> dict:
    """The CLI's ``--export`` switch: None (keep dense), ``"semi-structured"`` (torch's 2:4
    kernels), ``"csr"`` (CPU CSR) or ``"sparse-gpu"`` (our Triton 2:4 / sliced-ELLPACK decode
    kernels)."""
    if kind is None or kind == "none":
        return {"kind": None, "note": "model left dense"}
    if kind == "semi-structured":
        return to_semi_structured(model)
    if kind == "csr":
        return to_csr(model)
    if kind == "sparse-gpu":
        return to_sparse_gpu(model)
    raise ExportError(f"unknown export kind {kind!r}; expected one of None, 'semi-structured', 'csr', 'sparse-gpu'")


__all__ = [
    "save_pruned", "stage_pruned", "StagedCheckpoint", "load_pruned", "check_output_dir", "check_writable",
    "folder_holds", "check_save_format", "semi_structured_eligible",
    "to_semi_structured", "to_csr", "to_sparse_gpu", "apply_export", "CSRLinear", "SparseGPULinear", "ExportError",
    "CheckpointError", "resolve_targets", "parse_structure", "compress_bitmask", "decompress_bitmask", "pack_bitmask",
    "unpack_bitmask", "CSR_MIN_SPARSITY", "SELL_MIN_SPARSITY", "EXPORT_KINDS", "EXPORT_META_KEY", "NM_CONVENTION",
    "SAVE_FORMATS", "FORMAT_DENSE",
    "FORMAT_BITMASK", "COMPRESSED_SUFFIXES", "QUANT_METHOD", "QUANTIZATION_CONFIG_KEY", "SPARSITY_CONFIG_KEY",
    "EXTRA_INSTALL",
]
