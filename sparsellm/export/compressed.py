"""The checkpoint's sparsity metadata and the compressed (``sparse-bitmask``) weight format.

Layout, as compressed-tensors' ``ModelCompressor`` / ``BitmaskCompressor`` wrote and read it:

* ``config.json`` of a **compressed** save: ``quantization_config = {"quant_method":
  "compressed-tensors", "version": <compressed-tensors version>, "sparsity_config": {...},
  "transform_config": {}}``, where ``sparsity_config`` holds ``format`` ("sparse-bitmask"),
  ``global_sparsity``, ``sparsity_structure``, ``targets``, ``ignore`` and
  ``registry_requires_subclass``, built and validated by the library's
  ``SparsityCompressionConfig`` registry.
* the weights stay in ``save_pretrained``'s files (``model.safetensors``, or shards listed in
  ``model.safetensors.index.json``); each targeted ``<module>.weight`` is replaced by
  ``<module>.shape`` (int64 ``[rows, cols]``), ``<module>.compressed`` (the stored values, row
  by row), ``<module>.bitmask`` (uint8 ``(rows, ceil(cols / 8))``, numpy ``packbits`` little bit
  order) and ``<module>.row_offsets`` (int64, where each row starts in ``.compressed``).
* a **dense** save keeps ``sparsity_config`` (format "dense") at the top level of
  ``config.json`` instead; see :func:`place_sparsity_config` for why.

The codec is this module's own: compressed-tensors removed its sparse compressors in 0.15, and
the releases that still have them (<= 0.14.0.1) require transformers < 5, which this package
cannot run with. tests/test_export_compat.py checks the codec against the library's
``pack_bitmasks`` / ``unpack_bitmasks`` and, where a release with ``BitmaskCompressor`` is
importable, loads our checkpoints with ``ModelCompressor`` itself.

Version 1 of this package's checkpoints (``sparsellm_export.version == 1``) put a compressed
save's ``sparsity_config`` at the top level, its weights in ``sparse-bitmask*.safetensors``
listed in ``sparse-bitmask.index.json`` and its keys as ``<module>.weight.<part>``; they are
still read.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, ExportError

QUANTIZATION_CONFIG_KEY = "quantization_config"
SPARSITY_CONFIG_KEY = "sparsity_config"
QUANT_METHOD = "compressed-tensors"
FORMAT_DENSE = "dense"
FORMAT_BITMASK = "sparse-bitmask"
SAVE_FORMATS = {"dense": FORMAT_DENSE, "compressed": FORMAT_BITMASK}
COMPRESSED_SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")
EXTRA_INSTALL = 'pip install "sparsellm[compressed]"'
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
LEGACY_INDEX = "sparse-bitmask.index.json"


# --------------------------------------------------------------------------------------------
# the compressed-tensors library (optional extra)


def compressed_tensors_library():
    """The ``compressed_tensors`` module; :class:`ExportError` naming the extra if it cannot be
    imported (a broken install fails here too, not after the prune)."""
    try:
        import compressed_tensors
        from compressed_tensors.config import SparsityCompressionConfig  # noqa: F401
    except ImportError as err:
        raise ExportError(f"save_format 'compressed' (--save-format compressed) writes its config through the "
                          f"compressed-tensors library, which cannot be imported ({err}); install the optional "
                          f"extra: {EXTRA_INSTALL}") from None
    return compressed_tensors


def check_save_format(save_format: str):
    """Cheap check before any long work: a known format, and for ``"compressed"`` the
    compressed-tensors library. Returns that library's module for ``"compressed"``, else None."""
    if save_format not in SAVE_FORMATS:
        raise ExportError(f"save_format must be one of {sorted(SAVE_FORMATS)}, got {save_format!r}")
    return compressed_tensors_library() if save_format == "compressed" else None


# --------------------------------------------------------------------------------------------
# the sparsity_config block and where it goes in config.json


def sparsity_config_block(fmt: str, global_sparsity: float, structure: str, targets: list[str],
                          ignore: list[str], library=None) -> dict:
    """The ``sparsity_config`` block; passed through the library's ``SparsityCompressionConfig``
    registry (which validates it and fills its own fields) when ``library`` is given."""
    block = {"format": fmt, "global_sparsity": global_sparsity, "sparsity_structure": structure,
             "targets": targets, "ignore": ignore, "registry_requires_subclass": False}
    if library is not None:
        from compressed_tensors.config import SparsityCompressionConfig

        block = SparsityCompressionConfig.load_from_registry(fmt, **block).model_dump()
    return block


def place_sparsity_config(cfg: dict, block: dict, library=None) -> None:
    """Put ``block`` into the config.json dict ``cfg``.

    Compressed (``library`` given): nested in ``quantization_config`` with ``quant_method
    "compressed-tensors"``, where compressed-tensors looks for it. Dense: at the top level.
    transformers' ``from_pretrained`` hands any checkpoint with a compressed-tensors
    ``quantization_config`` to its compressed-tensors quantizer, which raises ImportError
    without the library and, with it, marks the model quantized and drops the block on the next
    ``save_pretrained``. A dense save is an ordinary checkpoint that a plain ``from_pretrained``
    (or any loader) must read as is, so its block stays where nothing reacts to it.
    """
    if library is None:
        cfg[SPARSITY_CONFIG_KEY] = block
        return
    cfg[QUANTIZATION_CONFIG_KEY] = {"quant_method": QUANT_METHOD, "version": library.__version__,
                                    SPARSITY_CONFIG_KEY: block, "transform_config": {}}
    cfg.pop(SPARSITY_CONFIG_KEY, None)  # a model loaded from a dense save carries its block at the top level


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file is a CheckpointError that names it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {file}: {err}") from None


def find_sparsity_config(cfg: dict) -> tuple[object, bool]:
    """Inverse of :func:`place_sparsity_config`: ``(block or None, nested in quantization_config)``."""
    qc = cfg.get(QUANTIZATION_CONFIG_KEY)
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD and qc.get(SPARSITY_CONFIG_KEY):
        return qc[SPARSITY_CONFIG_KEY], True
    return cfg.get(SPARSITY_CONFIG_KEY), False


# --------------------------------------------------------------------------------------------
# sparse-bitmask codec


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, ceil(cols/8)) uint8, little bit order: numpy's
    ``packbits(..., axis=-1, bitorder="little")``, as compressed-tensors' ``pack_bitmasks``
    (and far faster than doing the shifts in torch)."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bitmask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`; returns (rows, padded cols) bool (caller slices)."""
    return torch.from_numpy(np.unpackbits(packed.cpu().numpy(), axis=-1, bitorder="little").view(np.bool_))


def _row_offsets(packed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Start of each row's values in ``.compressed`` and the total count, from bit counts of
    the packed mask (8x less data than counting the bool mask). numpy, like the rest of the
    CPU bookkeeping here: single-threaded, so it does not stall on a busy machine the way
    small OpenMP-parallel torch ops do."""
    counts = _POPCOUNT[packed.cpu().numpy()].sum(1, dtype=np.int64)
    offsets = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=offsets[1:])
    return torch.from_numpy(offsets), int(counts.sum())


def compress_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One 2-D weight -> the four sparse-bitmask tensors (keyed by part name)."""
    if weight.dim() != 2:
        raise ExportError(f"sparse-bitmask needs 2-D weights, got shape {tuple(weight.shape)}")
    weight = weight.detach().cpu().contiguous()
    bits = weight.view(_INT_VIEW[weight.element_size()]).numpy().ravel()
    # Stored = bit pattern not all zero. A -0.0 compares equal to 0 but differs bitwise, so it
    # is kept as a value and decompression is exact bit for bit (the library's decoder places
    # stored values wherever the mask says, so it reads these too); the pruners here zero with
    # masked_fill, which writes +0.0, so this costs nothing in practice.
    mask = bits != 0
    packed = pack_bitmask(torch.from_numpy(mask.reshape(weight.shape)))
    # numpy selection on the integer view: ~10x faster than torch.masked_select on CPU,
    # and works for bfloat16, which numpy has no type for
    values = torch.from_numpy(np.compress(mask, bits)).view(weight.dtype)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": values,
        "bitmask": packed,
        "row_offsets": _row_offsets(packed)[0],
    }


def decompress_bitmask(parts: dict[str, torch.Tensor], key: str = "weight") -> torch.Tensor:
    """Rebuild the dense weight, checking every piece against the others."""
    missing = [s for s in COMPRESSED_SUFFIXES if s not in parts]
    if missing:
        raise CheckpointError(f"{key}: compressed weight lacks {', '.join('.' + s for s in missing)}")
    shape, values, packed, offsets = (parts[s].cpu() for s in COMPRESSED_SUFFIXES)
    if shape.dim() != 1 or shape.numel() != 2 or shape.is_floating_point() or bool((shape <= 0).any()):
        raise CheckpointError(f"{key}.shape must hold two positive integers, got {shape.tolist()}")
    rows, cols = (int(v) for v in shape.tolist())
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, math.ceil(cols / 8)):
        raise CheckpointError(f"{key}.bitmask is {packed.dtype} {tuple(packed.shape)}; a {rows}x{cols} "
                              f"weight needs uint8 ({rows}, {math.ceil(cols / 8)})")
    if cols % 8 and bool((packed[:, -1].numpy() >> (cols % 8)).any()):
        raise CheckpointError(f"{key}.bitmask sets padding bits beyond column {cols}")
    expected, count = _row_offsets(packed)
    if values.dim() != 1 or values.numel() != count:
        raise CheckpointError(f"{key}.compressed holds {values.numel()} values but the bitmask marks "
                              f"{count} (shape {rows}x{cols})")
    if tuple(offsets.shape) != (rows,) or not torch.equal(offsets.to(torch.int64), expected):
        raise CheckpointError(f"{key}.row_offsets disagree with the bitmask's per-row counts")
    mask = unpack_bitmask(packed, cols)[:, :cols]
    int_dtype = _INT_VIEW[values.element_size()]
    src = values.contiguous().view(int_dtype).numpy()
    dense = np.zeros(rows * cols, dtype=src.dtype)
    dense[np.flatnonzero(mask.numpy())] = src  # flat indices beat a boolean put ~4x
    return torch.from_numpy(dense).view(values.dtype).reshape(rows, cols)


# --------------------------------------------------------------------------------------------
# compressed weight files


def _weight_files(folder: Path, index_name: str, single_name: str | None) -> list[str]:
    index = folder / index_name
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid index: {err}") from None
    if single_name is not None and (folder / single_name).is_file():
        return [single_name]
    return []


def _compressed_key(weight_key: str, part: str) -> str:
    return f"{weight_key[: -len('.weight')]}.{part}"


def compress_checkpoint(folder: Path, target_keys: set[str]) -> None:
    """Rewrite the safetensors files ``save_pretrained`` wrote in ``folder``: each key in
    ``target_keys`` (``<module>.weight``) becomes its four sparse-bitmask tensors; file names,
    the other tensors and the shard index (keys, total size) follow."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = _weight_files(folder, HF_INDEX, HF_WEIGHTS)
    if not shards:
        raise ExportError(f"save_pretrained wrote no safetensors weights in {folder}")
    keys: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), shard))
    missing = sorted(target_keys - keys.keys())
    if missing:
        raise ExportError(f"targeted weights missing from the saved checkpoint (does this model rename weights "
                          f"on save?): {missing[:5]}")
    clashes = sorted({_compressed_key(t, p) for t in target_keys for p in COMPRESSED_SUFFIXES} & keys.keys())
    if clashes:
        raise ExportError(f"cannot store compressed weights: the checkpoint already has tensors named {clashes[:5]}")
    weight_map, total = {}, 0
    for shard in shards:
        out = {}
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if key in target_keys:
                    out.update({_compressed_key(key, p): t for p, t in compress_bitmask(tensor).items()})
                else:
                    out[key] = tensor
        tmp = folder / f".{shard}.tmp"
        save_file(out, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / shard)
        weight_map.update(dict.fromkeys(out, shard))
        total += sum(t.numel() * t.element_size() for t in out.values())
    index = folder / HF_INDEX
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")


def read_compressed(path: Path, legacy: bool = False) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Dense state dict (checkpoint keys) of a compressed checkpoint, and the weight keys that
    were stored compressed. ``legacy``: the version-1 file and key names."""
    files = _weight_files(path, LEGACY_INDEX, None) if legacy else _weight_files(path, HF_INDEX, HF_WEIGHTS)
    if not files:
        wanted = LEGACY_INDEX if legacy else f"{HF_WEIGHTS} or {HF_INDEX}"
        raise CheckpointError(f"{path} claims format {FORMAT_BITMASK!r} but has no {wanted}")
    raw = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path} lacks {name}, listed in its index")
        raw.update(read_tensors(path / name))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    state = {}
    for key, tensor in raw.items():
        base, _, part = key.rpartition(".")
        if part in COMPRESSED_SUFFIXES and (base.endswith(".weight") or not legacy):
            groups.setdefault(base if legacy else f"{base}.weight", {})[part] = tensor
        else:
            state[key] = tensor
    for weight_key, parts in groups.items():
        if weight_key in state:
            raise CheckpointError(f"{weight_key} is stored both dense and compressed")
        state[weight_key] = decompress_bitmask(parts, weight_key)
    return state, set(groups)
