"""Pruned-model checkpoints: :func:`save_pruned` / :func:`load_pruned`.

A pruned (dense-masked) model is saved with ``save_pretrained`` (safetensors) plus its
tokenizer, and ``config.json`` gains a compressed-tensors ``sparsity_config`` block (where it
goes and the compressed weight format: :mod:`sparsellm.export.compressed`) and this package's
``sparsellm_export`` block beside it. The output is written into a temporary sibling folder
and renamed into place only when complete.

N:M follows this project's convention (see :mod:`sparsellm.sparsity`): ``"2:4"`` means 2 of
every 4 consecutive input weights are zero, ``"3:4"`` means 3 of 4 (75% sparse).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..sparsity import SparsityError, SparsityPattern, nm_violations, zero_fraction
from .compressed import (FORMAT_BITMASK, FORMAT_DENSE, QUANTIZATION_CONFIG_KEY, SAVE_FORMATS, SPARSITY_CONFIG_KEY,
                         check_save_format, compress_checkpoint, find_sparsity_config, place_sparsity_config,
                         read_compressed, read_tensors, sparsity_config_block)
from .csr import CSRLinear
from .errors import CheckpointError, ExportError
from .semi_structured import is_semi_structured
from .sparse_gpu import SparseGPULinear
from .targets import recorded_selection, resolve_targets
from ..structure import LAYER_SIZES_FIELD, config_holds_sizes

# Project-specific metadata lives beside (not inside) sparsity_config so that block stays in the
# compressed-tensors schema. Version 2: compressed saves in the compressed-tensors layout
# (version 1: see sparsellm.export.compressed).
EXPORT_META_KEY = "sparsellm_export"
EXPORT_META_VERSION = 2
NM_CONVENTION = "N:M = at least N zeros in every M consecutive input weights of a row"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


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


# --------------------------------------------------------------------------------------------
# output folder: checks, staging, atomic publish


def check_writable(path, target=None) -> None:
    """Refuse a path whose nearest existing folder cannot be written (the path itself, or the
    parent its folders would be made in), or where a file stands in for one of its folders:
    found now, not after the prune. ``target``: the output the message names (callers pass the
    folder it goes in as ``path``, which read "x is not a folder (for x)")."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    target = path if target is None else target
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder (for {target})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write under {folder} (for {target})")


def ordinary_mode(is_dir: bool) -> int:
    """The mode of a folder or file made the ordinary way: 0777 / 0666 less the process's umask
    (0755 / 0644 under the usual 022). mkdtemp, mkstemp and safetensors make theirs private; a
    fixed 0755 / 0644 made them readable by all where the user's umask (077, 027) says not."""
    mask = os.umask(0o022)  # reading it means setting it: put back at once
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def make_folders(folder) -> list[Path]:
    """Make ``folder`` and its missing parents; return the folders made, innermost first, for
    :func:`remove_made_folders` to take back when the run that needed them fails."""
    folder = Path(folder).expanduser().absolute()
    missing, probe = [], folder
    while not probe.exists() and not probe.is_symlink():
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_made_folders(made: list[Path]) -> None:
    """Remove the folders :func:`make_folders` made, innermost first, as long as they are empty
    (something else written there meanwhile keeps its folder, and those above it)."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def check_output_dir(out_dir, overwrite: bool) -> None:
    """Refuse a file, a folder that holds the working folder (even empty: it is replaced by
    a rename), a non-empty directory without overwrite, or a place that cannot be written
    (before any long work). With overwrite, the folder is replaced whole, so only a model
    folder (it has a config.json) is, and never one that holds the home folder."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and folder_holds(out_dir, Path.cwd()):
        # even empty: the staging folder is renamed onto it, which left this process (and the
        # shell that ran it) in a deleted folder, the saved files not there to be seen
        raise FileExistsError(f"{out_dir} holds the working folder ({Path.cwd().resolve()}); the save replaces "
                              f"the folder whole, so give a folder of its own")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        _check_replaceable(out_dir)
    check_writable(out_dir.absolute().parent, out_dir)  # the staging folder is made beside it


def folder_holds(folder, path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved): what replacing
    ``folder`` whole would delete."""
    folder, path = Path(folder).expanduser().resolve(), Path(path).expanduser().resolve()
    return path == folder or folder in path.parents


def _check_replaceable(out_dir: Path) -> None:
    """What overwrite may delete: a saved model's folder, nothing the user is working in."""
    for what, inside in (("working folder", Path.cwd()), ("home folder", Path.home())):
        if folder_holds(out_dir, inside):
            raise FileExistsError(f"{out_dir} holds the {what} ({inside.resolve()}); overwrite replaces the whole "
                                  f"folder, so give a folder of its own")
    if not (out_dir.resolve() / "config.json").is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no config.json (not a saved model); overwrite "
                              f"replaces a model folder whole, so give a new or empty folder")


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
        if isinstance(mod, (CSRLinear, SparseGPULinear)) or (weight is not None and is_semi_structured(weight)):
            raise ExportError(f"{name} already runs on sparse kernels; call save_pruned on the dense-masked "
                              "model, before apply_export()")


class StagedCheckpoint:
    """A complete checkpoint written beside its destination, not yet in place: :meth:`publish`
    renames it into ``out_dir`` (atomic), :meth:`discard` deletes it. A run that has more to do
    after saving (export, evaluation, report) stages first and publishes last, so a failure or an
    interrupt in between leaves ``out_dir`` as it was."""

    def __init__(self, staging: Path, out_dir: Path, overwrite: bool, made_folders: list[Path] | None = None):
        self.staging, self.out_dir, self.overwrite = staging, out_dir, overwrite
        self.made_folders = made_folders or []  # out_dir's parents the staging made: discarded with it

    def publish(self) -> Path:
        try:
            _publish(self.staging, self.out_dir, self.overwrite)
        except BaseException:
            self.discard()
            raise
        return self.out_dir

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        remove_made_folders(self.made_folders)


def save_pruned(model, tokenizer, out_dir, **kwargs) -> Path:
    """Save a pruned (dense-masked) model and its tokenizer; returns the output directory.

    Everything is checked before anything is written, then written into a temporary sibling
    directory that is renamed into place only when complete: a failure leaves ``out_dir`` as
    it was. Keywords: those of :func:`stage_pruned`.
    """
    return stage_pruned(model, tokenizer, out_dir, **kwargs).publish()


def stage_pruned(model, tokenizer, out_dir, *, sparsity_structure: str, save_format: str = "dense",
                 overwrite: bool = False, targets: list[str] | None = None, ignore: list[str] | None = None,
                 extra: dict | None = None) -> StagedCheckpoint:
    """Check and write the checkpoint of :func:`save_pruned` into a temporary sibling of
    ``out_dir``, and return it staged (:class:`StagedCheckpoint`). ``save_format`` is
    ``"dense"`` or ``"compressed"`` (sparse-bitmask, which needs the ``compressed`` extra:
    compressed-tensors)."""
    library = check_save_format(save_format)
    pattern = parse_structure(sparsity_structure)
    structure = "unstructured" if pattern is None else str(pattern)
    # resolved: a symlinked folder is replaced where it points, and the link kept
    out_dir = Path(out_dir).expanduser().resolve()
    check_output_dir(out_dir, overwrite)
    config = getattr(model, "config", None)
    sizes = getattr(config, LAYER_SIZES_FIELD, None)
    if library is not None and sizes and not config_holds_sizes(config, sizes):
        raise ExportError("a structured model whose sizes config.json cannot state (layers that differ in size, "
                          "or a head count transformers refuses) is saved dense (save_format='dense'): the "
                          "compressed layout is loaded against the config's sizes")
    meta = {"version": EXPORT_META_VERSION, "nm_convention": NM_CONVENTION, "extra": extra or {}}
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
    if library is not None:
        _refuse_tied_targets(model, selected)
    block = sparsity_config_block(SAVE_FORMATS[save_format], zero_fraction(*weights.values()), structure,
                                  rec_targets, rec_ignore, library)

    made = make_folders(out_dir.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    except BaseException:
        remove_made_folders(made)
        raise
    try:
        os.chmod(staging, ordinary_mode(True))  # mkdtemp makes it private; a checkpoint is an ordinary folder
        with _plain_for_saving(model):
            model.save_pretrained(staging)
        if library is not None:
            compress_checkpoint(staging, {f"{n}.weight" for n in selected})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        cfg_path = staging / "config.json"
        cfg = json.loads(cfg_path.read_text())
        place_sparsity_config(cfg, block, library)
        cfg[EXPORT_META_KEY] = meta
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        modes = {True: ordinary_mode(True), False: ordinary_mode(False)}  # (reading the umask sets it)
        for path in staging.rglob("*"):  # safetensors writes its files private (0600); an ordinary folder's are not
            os.chmod(path, modes[path.is_dir()])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_made_folders(made)
        raise
    return StagedCheckpoint(staging, out_dir, overwrite, made)


def _refuse_tied_targets(model, selected: dict) -> None:
    """save_pretrained stores a tied weight once, under one of its names, so the compressed
    layout cannot hold it under the targeted one (e.g. lm_head tied to the embeddings)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name, lin in selected.items():
        shared = [other for other in names.get(id(lin.weight), []) if other != f"{name}.weight"]
        if shared:
            raise ExportError(f"{name}.weight is tied to {shared[0]} (stored once), which the compressed format "
                              f"cannot hold; leave {name} out of targets or save dense (save_format='dense')")


def _saved_generation_config(path: Path, model) -> None:
    """Give ``model`` the folder's generation_config.json (stop tokens, sampling defaults):
    from_pretrained reads it only when it loads from the folder, not from a state dict or when
    the model is built from its config."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'generation_config.json'}: {err}") from None


# --------------------------------------------------------------------------------------------
# load


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


def _load_with_layer_sizes(path: Path, config, sizes: dict, dtype):
    """A structured checkpoint whose sizes the standard config fields do not state (layers that
    differ in size, or a head count transformers refuses): build the model at the config's
    sizes, shrink each layer to the sizes recorded in config.json (sparsellm.structure), then
    load the tensors as saved."""
    from ..models import get_adapter
    from ..structure import shrink_to_sizes

    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(read_tensors(file))
    if dtype is None or dtype == "auto":
        dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unknown dtype {dtype!r}")
    model = _causal_lm_class(config)(config)
    shrink_to_sizes(model, get_adapter(model), sizes)
    # Parameters only, as from_pretrained(dtype=...) does: buffers such as RoPE's inv_freq are
    # computed in float32 at construction and stay so (a bfloat16 inv_freq moves the rotary
    # angles, more at longer positions).
    for param in model.parameters():
        param.data = param.data.to(dtype)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: tensors disagree with the recorded layer sizes: {err}") from None
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied = {name for group in names.values() if len(group) > 1 for name in group}
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{path}: tensors disagree with config.json: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    return model


def _checked_from_pretrained(path: Path, cls, *args, **kwargs):
    """``cls.from_pretrained(*args, **kwargs)``, refusing what from_pretrained only warns about:
    tensors missing (it would initialise them at random), unexpected (a config with fewer layers
    would silently drop them) or of another shape; and damaged files, as CheckpointError."""
    try:
        model, info = cls.from_pretrained(*args, **kwargs, output_loading_info=True)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: tensors disagree with config.json: {err}") from None
    except Exception as err:  # a missing file (OSError); safetensors' own error types for damaged ones
        if not isinstance(err, OSError) and type(err).__module__.split(".")[0] != "safetensors":
            raise
        raise CheckpointError(f"{path}: cannot read the tensors: {err}") from None
    problems = {k: sorted(map(str, v)) for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"{path}: tensors disagree with config.json: {problems}")
    return model


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def load_pruned(path, device=None, dtype=None):
    """Load a :func:`save_pruned` checkpoint (dense or compressed, this version's layout or
    version 1's) -> ``(model, tokenizer)``. Needs no compressed-tensors.

    The model is the exact dense-masked model that was saved (in its saved dtype unless
    ``dtype`` is given); its ``config.sparsity_config`` describes it as it now is in memory
    (format "dense"), so a plain ``save_pretrained`` of it writes a correct dense checkpoint.
    The claimed structure, targets and global sparsity are re-checked against the tensors; any
    disagreement raises :class:`CheckpointError`, except the zeros that a cast to ``dtype`` adds
    (float32 weights too small for float16 round to zero), which the loaded config counts. The
    folder's generation_config.json (stop tokens, sampling defaults) comes back in every
    layout. ``tokenizer`` is None when none was saved.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    cast = dtype not in (None, "auto")  # a dtype asked for, perhaps other than the saved one
    if cast:  # a mistake in the call, not in the checkpoint: a ValueError of its own, before any work
        asked = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(asked, torch.dtype) or not asked.is_floating_point:
            raise ValueError(f"dtype must be None, 'auto' or a float torch.dtype (or its name), got {dtype!r}")
        dtype = asked
    cfg_path = path / "config.json"
    if not path.exists():  # a mistyped folder: "has no config.json" read as if it were there
        raise FileNotFoundError(f"{path} does not exist")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json; not a saved model")
    sc, nested = find_sparsity_config(json.loads(cfg_path.read_text()))
    if not isinstance(sc, dict):
        raise CheckpointError(f"{cfg_path} has no {SPARSITY_CONFIG_KEY} block (neither at the top level nor in "
                              f"{QUANTIZATION_CONFIG_KEY}); not written by save_pruned")
    try:
        pattern = parse_structure(sc.get("sparsity_structure"))
    except ExportError as err:
        raise CheckpointError(str(err)) from None
    fmt = sc.get("format")
    if fmt not in (FORMAT_DENSE, FORMAT_BITMASK):
        raise CheckpointError(f"{cfg_path}: unknown sparsity format {fmt!r} (expected {FORMAT_DENSE!r} or {FORMAT_BITMASK!r})")
    config = AutoConfig.from_pretrained(str(path))
    if nested:  # else from_pretrained would hand the model to transformers' compressed-tensors quantizer
        delattr(config, QUANTIZATION_CONFIG_KEY)
    setattr(config, SPARSITY_CONFIG_KEY, {**sc, "format": FORMAT_DENSE})
    sizes = getattr(config, LAYER_SIZES_FIELD, None)
    if fmt == FORMAT_DENSE and sizes and not config_holds_sizes(config, sizes):  # structured, not plain
        model = _load_with_layer_sizes(path, config, sizes, dtype)
        stored = None
    elif fmt == FORMAT_DENSE:
        model = _checked_from_pretrained(path, AutoModelForCausalLM, str(path), config=config, dtype=dtype or "auto")
        stored = None
    else:
        state, stored = read_compressed(path, legacy=not nested)
        if dtype is None:  # keep the saved dtype: "auto" would fall back to float32 without config.dtype
            dtype = getattr(config, "dtype", None) or next(t.dtype for t in state.values() if t.is_floating_point())
        model = _checked_from_pretrained(path, _causal_lm_class(config), None, config=config, state_dict=state,
                                         dtype=dtype)

    selected = recorded_selection(model, sc)
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
    actual = zero_fraction(*weights.values())
    # a dtype asked for rounds weights too small for it to zero (float32 below 2**-25 to
    # float16): more zeros than saved, never fewer; the config then states the model in memory
    if (not isinstance(claimed, (int, float)) or actual < claimed - 1e-6
            or (actual > claimed + 1e-6 and not cast)):
        raise CheckpointError(f"{cfg_path} claims global_sparsity {claimed}, the targeted weights hold {actual:.6f}")
    if actual != claimed:
        block = getattr(model.config, SPARSITY_CONFIG_KEY)
        setattr(model.config, SPARSITY_CONFIG_KEY, {**block, "global_sparsity": actual})

    _saved_generation_config(path, model)
    model.eval()
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if _has_tokenizer(path) else None
    return model, tokenizer
