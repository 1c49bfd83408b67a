"""Sparse checkpoints and sparse inference kernels for pruned models.

Two halves:

* **Checkpoints** -- :func:`save_pruned` / :func:`load_pruned`. A pruned model is saved with
  ``save_pretrained`` (safetensors) plus its tokenizer, and ``config.json`` gains a
  ``sparsity_config`` block in the compressed-tensors convention (``format``,
  ``sparsity_structure``, ``global_sparsity``, ``targets``, ``ignore``). With
  ``save_format="compressed"`` the targeted weights are stored in compressed-tensors'
  ``sparse-bitmask`` layout (per weight: ``.shape``, ``.compressed`` values, ``.bitmask`` packed
  one bit per weight, ``.row_offsets``), so the file shrinks with sparsity. Those files are named
  ``sparse-bitmask*.safetensors`` on purpose: a plain ``from_pretrained`` then fails loudly
  ("no model.safetensors") instead of silently initialising the missing dense weights at random.

  N:M follows this project's convention (see :mod:`sparsellm.sparsity`): ``"2:4"`` means 2 of
  every 4 consecutive input weights are zero, ``"3:4"`` means 3 of 4 (75% sparse).

* **Kernels** -- :func:`apply_export` with ``"semi-structured"`` (torch's 2:4 CUTLASS/cuSPARSELt
  kernels; CUDA, compute capability >= 8.0, fp16/bf16) or ``"csr"`` (float32 CSR matmul, which
  beats dense on CPU only at high sparsity; see benchmarks/RESULTS.md for the measurement behind
  :data:`CSR_MIN_SPARSITY`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sparsity import SparsityError, SparsityPattern

SPARSITY_CONFIG_KEY = "sparsity_config"
# Project-specific metadata lives beside (not inside) sparsity_config so that block stays in the
# compressed-tensors schema.
EXPORT_META_KEY = "sparsellm_export"
FORMAT_DENSE = "dense"
FORMAT_BITMASK = "sparse-bitmask"
SAVE_FORMATS = {"dense": FORMAT_DENSE, "compressed": FORMAT_BITMASK}
COMPRESSED_INDEX = "sparse-bitmask.index.json"
COMPRESSED_SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")
NM_CONVENTION = "N:M = at least N zeros in every M consecutive input weights of a row"

# CPU float32 CSR matmul (MKL) measured faster than dense from about this sparsity on for
# 4096x4096 linears at token batches 1..128 (benchmarks/export_table.py; RESULTS.md, "Sparse export").
CSR_MIN_SPARSITY = 0.9

EXPORT_KINDS = (None, "semi-structured", "csr")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class ExportError(ValueError):
    """The model or the request cannot be exported as asked."""


class CheckpointError(ValueError):
    """A saved checkpoint is malformed or disagrees with its own config."""


# --------------------------------------------------------------------------------------------
# which linears are targeted


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    """compressed-tensors matching: ``re:<regex>`` (re.match on the module name), an exact
    module name, or a module class name such as ``Linear``."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def resolve_targets(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
                    ) -> tuple[dict[str, nn.Linear], list[str], list[str]]:
    """The targeted linears and the ``targets``/``ignore`` lists to record for them.

    Default: the linears of decoder layers (names containing ``.layers.``); embeddings and
    ``lm_head`` stay dense. The recorded lists select exactly the same modules under
    compressed-tensors semantics: linears a target matches but that are not selected are
    named in ``ignore``.
    """
    linears = _linears(model)
    ignore = list(ignore or [])
    if targets is None:
        recorded_targets = ["Linear"]
        candidates = {n: m for n, m in linears.items() if ".layers." in f".{n}."}
    else:
        if isinstance(targets, str):
            raise ExportError("targets must be a list of patterns, not a single string")
        recorded_targets = list(targets)
        for pattern in recorded_targets:
            if not any(_matches(pattern, n, m) for n, m in linears.items()):
                raise ExportError(f"target {pattern!r} matches no nn.Linear module of the model")
        candidates = {n: m for n, m in linears.items() if any(_matches(p, n, m) for p in recorded_targets)}
    selected = {n: m for n, m in candidates.items() if not any(_matches(p, n, m) for p in ignore)}
    if not selected:
        raise ExportError("no linear layer is targeted (check targets / ignore)")
    implied = sorted(n for n, m in linears.items() if n not in selected
                     and any(_matches(p, n, m) for p in recorded_targets)
                     and not any(_matches(p, n, m) for p in ignore))
    return selected, recorded_targets, ignore + implied


def _recorded_selection(model: nn.Module, sparsity_config: dict) -> dict[str, nn.Linear]:
    targets = sparsity_config.get("targets") or []
    ignore = sparsity_config.get("ignore") or []
    return {n: m for n, m in _linears(model).items()
            if any(_matches(p, n, m) for p in targets) and not any(_matches(p, n, m) for p in ignore)}


# --------------------------------------------------------------------------------------------
# sparsity structure


def parse_structure(structure: str) -> SparsityPattern | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> the N:M pattern; anything else is an error."""
    if not isinstance(structure, str):
        raise ExportError(f"sparsity_structure must be a string like 'unstructured' or '2:4', got {structure!r}")
    if structure.strip().lower() == "unstructured":
        return None
    try:
        pattern = SparsityPattern.parse(structure)
    except SparsityError as err:
        raise ExportError(f"bad sparsity_structure {structure!r}: {err}") from None
    if not pattern.is_nm:
        raise ExportError(f"sparsity_structure must be 'unstructured' or N:M like '2:4', got {structure!r}")
    return pattern


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups (along the input dimension) with fewer than N zeros; -1 if the
    input size is not a multiple of M."""
    rows, cols = weight.shape
    if cols % m:
        return -1
    zeros = (weight.detach().reshape(rows, cols // m, m) == 0).sum(-1)
    return int((zeros < n).sum().item())


def _check_structure(weights: dict[str, torch.Tensor], pattern: SparsityPattern | None, err=ExportError) -> None:
    if pattern is None:
        return
    bad = []
    for name, w in weights.items():
        v = nm_violations(w, pattern.n, pattern.m)
        if v:
            bad.append(f"{name} (input size {w.shape[1]} not a multiple of {pattern.m})" if v < 0
                       else f"{name} ({v} of {w.numel() // pattern.m} groups)")
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... {len(bad) - 5} more" if len(bad) > 5 else "")
        raise err(f"weights do not satisfy the claimed {pattern} structure ({NM_CONVENTION}): {shown}")


def _global_sparsity(weights) -> float:
    zeros = total = 0
    for w in weights:
        zeros += int((w == 0).sum().item())
        total += w.numel()
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------------------------
# sparse-bitmask (compressed-tensors layout)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, ceil(cols/8)) uint8, little bit order: exactly numpy's
    ``packbits(..., axis=-1, bitorder="little")``, which compressed-tensors writes (and which
    is far faster than doing the shifts in torch)."""
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
    """One 2-D weight -> the four sparse-bitmask tensors (suffixes of the weight's key)."""
    if weight.dim() != 2:
        raise ExportError(f"sparse-bitmask needs 2-D weights, got shape {tuple(weight.shape)}")
    weight = weight.detach().cpu().contiguous()
    bits = weight.view(_INT_VIEW[weight.element_size()]).numpy().ravel()
    # Stored = bit pattern not all zero. A -0.0 compares equal to 0 but differs bitwise, so it
    # is kept as a value and decompression is exact bit for bit; the pruners here zero with
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
# save


def _quant_method(config) -> str | None:
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    return str(method).lower() if method is not None else "unknown"


_MISSING = object()


def _check_quantization(model) -> bool:
    """True if the model carries a GGUF quantization marker (to hide while saving); raises for
    any other quantisation, whose packed weights cannot carry a float sparsity mask."""
    qconfig = getattr(model.config, "quantization_config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    methods = {m for m in (_quant_method(qconfig),
                           _quant_method(getattr(quantizer, "quantization_config", None)) if quantizer else None) if m}
    if methods and methods != {"gguf"}:
        raise ExportError(f"the model is quantized ({', '.join(sorted(methods))}); sparse export needs a plain "
                          "float model (load or de-quantise it without quantization first)")
    return bool(methods)


@contextlib.contextmanager
def _plain_for_saving(model):
    """transformers 5.x refuses ``save_pretrained`` on a GGUF-loaded model. Its weights are
    already de-quantised to float at load time, so the honest checkpoint is a plain one: hide
    the GGUF quantization_config / quantizer while saving (restored afterwards)."""
    if not _check_quantization(model):
        yield
        return
    config = model.config
    saved_q = config.__dict__.get("quantization_config", _MISSING)
    saved_h = model.__dict__.get("hf_quantizer", _MISSING)
    try:
        if saved_q is not _MISSING:
            del config.__dict__["quantization_config"]
        if saved_h is not _MISSING:
            model.__dict__["hf_quantizer"] = None
        yield
    finally:
        if saved_q is not _MISSING:
            config.__dict__["quantization_config"] = saved_q
        if saved_h is not _MISSING:
            model.__dict__["hf_quantizer"] = saved_h


def _refuse_exported(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if isinstance(mod, CSRLinear) or (weight is not None and _is_semi_structured(weight)):
            raise ExportError(f"{name} already runs on sparse kernels; call save_pruned on the dense-masked "
                              "model, before apply_export()")


def check_output_dir(out_dir, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory without overwrite (before any long work)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a complete staging directory into place. rename(2) of a directory is atomic and
    also replaces an empty directory; a non-empty one is first renamed aside (atomic), then the
    new one renamed in, restoring the old one if that fails, then the old one deleted."""
    check_output_dir(out_dir, overwrite)  # again: something may have appeared meanwhile
    if out_dir.is_dir() and any(out_dir.iterdir()):
        backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(backup)
        os.rename(out_dir, backup)
        try:
            os.rename(staging, out_dir)
        except BaseException:
            os.rename(backup, out_dir)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(staging, out_dir)


def _compress_checkpoint(folder: Path, target_keys: set[str]) -> dict:
    """Rewrite the dense safetensors that save_pretrained wrote into sparse-bitmask files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    hf_index = folder / "model.safetensors.index.json"
    if hf_index.is_file():
        shards = sorted(set(json.loads(hf_index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ExportError(f"save_pretrained wrote no safetensors weights in {folder}")
    remaining = set(target_keys)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        out = {}
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if key in remaining:
                    remaining.discard(key)
                    out.update({f"{key}.{s}": t for s, t in compress_bitmask(tensor).items()})
                else:
                    out[key] = tensor
        name = "sparse-bitmask.safetensors" if len(shards) == 1 else \
            f"sparse-bitmask-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(out, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in out})
        total += sum(t.numel() * t.element_size() for t in out.values())
        (folder / shard).unlink()
    if remaining:
        raise ExportError("targeted weights missing from the saved checkpoint (does this model rename "
                          f"weights on save?): {sorted(remaining)[:5]}")
    hf_index.unlink(missing_ok=True)
    index = {"metadata": {"format": FORMAT_BITMASK, "total_size": total}, "weight_map": weight_map}
    (folder / COMPRESSED_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def save_pruned(model, tokenizer, out_dir, *, sparsity_structure: str, save_format: str = "dense",
                overwrite: bool = False, targets: list[str] | None = None, ignore: list[str] | None = None,
                extra: dict | None = None) -> Path:
    """Save a pruned (dense-masked) model and its tokenizer; returns the output directory.

    Everything is checked before anything is written, then written into a temporary sibling
    directory that is renamed into place only when complete: a failure leaves ``out_dir`` as
    it was. ``save_format`` is ``"dense"`` or ``"compressed"`` (sparse-bitmask).
    """
    if save_format not in SAVE_FORMATS:
        raise ExportError(f"save_format must be one of {sorted(SAVE_FORMATS)}, got {save_format!r}")
    pattern = parse_structure(sparsity_structure)
    structure = "unstructured" if pattern is None else str(pattern)
    out_dir = Path(out_dir).expanduser().absolute()
    check_output_dir(out_dir, overwrite)
    meta = {"version": 1, "nm_convention": NM_CONVENTION, "extra": extra or {}}
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ExportError(f"extra must be JSON-serialisable: {err}") from None
    _refuse_exported(model)
    _check_quantization(model)
    selected, rec_targets, rec_ignore = resolve_targets(model, targets, ignore)
    weights = {}
    for name, lin in selected.items():
        w = lin.weight
        if w.device.type == "meta":
            raise ExportError(f"{name}.weight is on the meta device (offloaded?); materialise the model first")
        if not w.is_floating_point():
            raise ExportError(f"{name}.weight is {w.dtype}; sparse export needs float weights")
        weights[name] = w.detach()
    _check_structure(weights, pattern)
    sparsity_config = {
        "format": SAVE_FORMATS[save_format],
        "global_sparsity": _global_sparsity(weights.values()),
        "sparsity_structure": structure,
        "targets": rec_targets,
        "ignore": rec_ignore,
        "registry_requires_subclass": False,
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
        with _plain_for_saving(model):
            model.save_pretrained(staging)
        if save_format == "compressed":
            _compress_checkpoint(staging, {f"{n}.weight" for n in selected})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        cfg_path = staging / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg[SPARSITY_CONFIG_KEY] = sparsity_config
        cfg[EXPORT_META_KEY] = meta
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _publish(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------
# load


def _read_compressed(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Dense state dict (checkpoint keys) and the keys that were stored compressed."""
    from safetensors.torch import load_file

    index_path = path / COMPRESSED_INDEX
    if not index_path.is_file():
        raise CheckpointError(f"{path} claims format {FORMAT_BITMASK!r} but has no {COMPRESSED_INDEX}")
    try:
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{index_path} is not a valid index: {err}") from None
    raw = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path} lacks {name}, listed in {COMPRESSED_INDEX}")
        try:
            raw.update(load_file(str(path / name)))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"cannot read {path / name}: {err}") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    state = {}
    for key, tensor in raw.items():
        base, _, suffix = key.rpartition(".")
        if suffix in COMPRESSED_SUFFIXES and base.endswith(".weight"):
            groups.setdefault(base, {})[suffix] = tensor
        else:
            state[key] = tensor
    for base, parts in groups.items():
        if base in state:
            raise CheckpointError(f"{base} is stored both dense and compressed")
        state[base] = decompress_bitmask(parts, base)
    return state, set(groups)


def _causal_lm_class(config):
    """The class save_pretrained recorded (config.architectures), else the causal-LM auto
    mapping; the Auto class itself cannot load from a bare state dict."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise CheckpointError(f"no causal-LM class for model_type {config.model_type!r}") from None


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def load_pruned(path, device=None, dtype=None):
    """Load a :func:`save_pruned` checkpoint (dense or compressed) -> ``(model, tokenizer)``.

    The model is the exact dense-masked model that was saved (in its saved dtype unless
    ``dtype`` is given). The claimed structure, targets and global sparsity are re-checked
    against the tensors; any disagreement raises :class:`CheckpointError`. ``tokenizer`` is
    None when none was saved.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json; not a saved model")
    raw = json.loads(cfg_path.read_text())
    sc = raw.get(SPARSITY_CONFIG_KEY)
    if not isinstance(sc, dict):
        raise CheckpointError(f"{cfg_path} has no {SPARSITY_CONFIG_KEY} block; not written by save_pruned")
    try:
        pattern = parse_structure(sc.get("sparsity_structure"))
    except ExportError as err:
        raise CheckpointError(str(err)) from None
    fmt = sc.get("format")
    if fmt == FORMAT_DENSE:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
        stored = None
    elif fmt == FORMAT_BITMASK:
        config = AutoConfig.from_pretrained(str(path))
        state, stored = _read_compressed(path)
        if dtype is None:  # keep the saved dtype: "auto" would fall back to float32 without config.dtype
            dtype = getattr(config, "dtype", None) or next(t.dtype for t in state.values() if t.is_floating_point())
        try:
            model, info = _causal_lm_class(config).from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                                   output_loading_info=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: tensors disagree with config.json: {err}") from None
        problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise CheckpointError(f"{path}: tensors disagree with config.json: {problems}")
    else:
        raise CheckpointError(f"{cfg_path}: unknown sparsity format {fmt!r} (expected {FORMAT_DENSE!r} or {FORMAT_BITMASK!r})")

    selected = _recorded_selection(model, sc)
    if not selected:
        raise CheckpointError(f"{cfg_path}: targets {sc.get('targets')} / ignore {sc.get('ignore')} select no linear")
    if stored is not None and stored != {f"{n}.weight" for n in selected}:
        extra = sorted(stored - {f"{n}.weight" for n in selected})[:3]
        lacking = sorted({f"{n}.weight" for n in selected} - stored)[:3]
        raise CheckpointError(f"{path}: compressed tensors do not match the recorded targets "
                              f"(not targeted: {extra}; targeted but dense: {lacking})")
    weights = {n: m.weight.detach() for n, m in selected.items()}
    _check_structure(weights, pattern, err=CheckpointError)
    claimed = sc.get("global_sparsity")
    actual = _global_sparsity(weights.values())
    if not isinstance(claimed, (int, float)) or abs(claimed - actual) > 1e-6:
        raise CheckpointError(f"{cfg_path} claims global_sparsity {claimed}, the targeted weights hold {actual:.6f}")

    model.eval()
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if _has_tokenizer(path) else None
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# 2:4 semi-structured kernels (CUDA)


def _is_semi_structured(t) -> bool:
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
    if _is_semi_structured(w):
        return False, "already semi-structured"
    if w.dim() != 2:
        return False, f"weight is {w.dim()}-D"
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
        # small product must match the dense one before the swap is kept.
        with torch.no_grad():
            probe = torch.randn(16, dense.shape[1], dtype=dense.dtype, device=dense.device)
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


# --------------------------------------------------------------------------------------------
# CSR kernels (CPU)


class CSRLinear(nn.Module):
    """A linear whose weight is a float32 sparse CSR matrix: y = x W^T + b computed as
    (W @ x^T)^T with torch's sparse-dense matmul (MKL on x86 CPUs). Inputs of any float dtype
    are computed in float32 and returned in their own dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(torch.float32)
        self.sparsity = float((weight == 0).sum().item()) / weight.numel()
        with warnings.catch_warnings():  # torch flags all CSR use as "beta" on every conversion
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.register_buffer("weight_csr", weight.to_sparse_csr())
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()
        # (out, 1) so addmm broadcasts it over the token columns of W @ x^T
        self.register_buffer("bias_col", None if bias is None else bias.unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        if self.bias_col is None:
            y = torch.sparse.mm(self.weight_csr, x2.t())
        else:
            y = torch.addmm(self.bias_col, self.weight_csr, x2.t())
        return y.t().reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_col is not None}, sparsity={self.sparsity:.3f}")


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_csr(model, *, min_sparsity: float = CSR_MIN_SPARSITY, targets: list[str] | None = None) -> dict:
    """Replace targeted linears of sparsity >= ``min_sparsity`` by :class:`CSRLinear`; below
    it CSR measured slower than dense, so those stay dense. Returns a JSON-able report."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise ExportError(f"min_sparsity must lie in [0, 1], got {min_sparsity}")
    selected, _, _ = resolve_targets(model, targets)
    report = {"kind": "csr", "min_sparsity": min_sparsity, "converted": {}, "dense": {}}
    for name, lin in selected.items():
        w = lin.weight.detach()
        sparsity = float((w == 0).sum().item()) / w.numel()
        if sparsity < min_sparsity:
            report["dense"][name] = f"sparsity {sparsity:.3f} < {min_sparsity:g}, where CSR stops beating dense"
            continue
        _replace_module(model, name, CSRLinear(lin))
        report["converted"][name] = round(sparsity, 6)
    report["n_converted"] = len(report["converted"])
    report["n_dense"] = len(report["dense"])
    return report


def apply_export(model, kind: str | None) -> dict:
    """The CLI's ``--export`` switch: None (keep dense), ``"semi-structured"`` or ``"csr"``."""
    if kind is None or kind == "none":
        return {"kind": None, "note": "model left dense"}
    if kind == "semi-structured":
        return to_semi_structured(model)
    if kind == "csr":
        return to_csr(model)
    raise ExportError(f"unknown export kind {kind!r}; expected one of None, 'semi-structured', 'csr'")


__all__ = [
    "save_pruned", "load_pruned", "semi_structured_eligible", "to_semi_structured", "to_csr", "apply_export",
    "CSRLinear", "ExportError", "CheckpointError", "resolve_targets", "compress_bitmask", "decompress_bitmask",
    "CSR_MIN_SPARSITY", "EXPORT_KINDS",
]
