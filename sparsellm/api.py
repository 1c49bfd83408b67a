"""The Python API: the CLI is a thin layer over :func:`run`.

    from sparsellm import PruneConfig, run
    report = run(PruneConfig(method="sparsegpt", sparsity="2:4", nsamples=32, seqlen=512))

or step by step: :func:`load_model`, :func:`prune`, :func:`evaluate`,
:func:`sparsellm.export.save_pruned` (what ``--save`` writes) and :func:`sparsellm.load_pruned`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
import warnings

import torch

from . import __version__, data, ops
from .allocation import check_channel_removal, head_removal
from .distributed import check_method_fits_job, is_main_process, use_local_gpu
from .config import DTYPES, PruneConfig
from .default_model import ALIASES as DEFAULT_ALIASES
from .default_model import resolve as resolve_default
from .driver import LayerRecord, resolve_device
from .perplexity import perplexity
from .progress import library_bars
from .methods import METHODS, get_method
from .methods.base import SOLVER_SETTINGS
from .models import get_adapter
from .report import StagedReport, build_report, check_report_path
from .structure import compact_model, model_cost

log = logging.getLogger(__name__)

_DTYPES = {name: getattr(torch, name) for name in DTYPES}


class ModelLoadError(RuntimeError):
    pass


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32"):
    """A causal LM and its tokenizer from a local folder, a hub id, or the embedded default. A
    folder saved in a layout only :func:`sparsellm.load_pruned` reads (compressed, or layers of
    different sizes) loads through it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a pathlib.Path and a torch dtype too, as PruneConfig's model and load_pruned take them; a
    # home-relative path as the shell would (--model=~/m reaches here unexpanded)
    name_or_path = os.path.expanduser(os.fspath(name_or_path))
    dtype = next((name for name, value in _DTYPES.items() if dtype is value), dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    path = resolve_default(name_or_path)
    # a hub id is NAME or OWNER/NAME (one slash at most): only what cannot be one is refused as a
    # missing local path, so --model HuggingFaceTB/SmolLM2-135M reaches the hub (any '/' was refused)
    looks_local = (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
                   or name_or_path.count("/") > 1 or (os.sep != "/" and os.sep in name_or_path))
    if name_or_path not in DEFAULT_ALIASES and looks_local and not os.path.exists(name_or_path):
        raise ModelLoadError(f"model path {name_or_path!r} does not exist")
    if _needs_load_pruned(path):
        # a --save folder that a plain from_pretrained misreads: it initialised a compressed save's
        # pruned weights at random (and pruned those), and refused layers of different sizes
        from .export import load_pruned

        model, tokenizer = load_pruned(path, dtype=_DTYPES[dtype])
        if tokenizer is None:
            raise ModelLoadError(f"cannot load model {name_or_path!r}: the saved folder has no tokenizer")
        model.eval()
        return model, tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        # NAME or OWNER/NAME that is no local folder was tried as a hub id: say both
        what = "" if os.path.exists(path) else " (no local folder of that name; as a hub id)"
        raise ModelLoadError(f"cannot load model {name_or_path!r}{what}: {exc}") from exc
    model.eval()
    return model, tokenizer


def _needs_load_pruned(path: str) -> bool:
    """A folder this package saved in a layout that only :func:`sparsellm.load_pruned` reads:
    compressed (the sparse-bitmask tensors), or of per-layer sizes its config cannot state."""
    from .export.checkpoint import EXPORT_META_KEY
    from .export.compressed import FORMAT_DENSE, find_sparsity_config
    from .structure import LAYER_SIZES_FIELD

    try:
        with open(os.path.join(path, "config.json")) as handle:
            cfg = json.load(handle)
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or EXPORT_META_KEY not in cfg:
        return False
    block, _ = find_sparsity_config(cfg)
    return LAYER_SIZES_FIELD in cfg or (isinstance(block, dict) and block.get("format") != FORMAT_DENSE)


# which --allocation rules read each allocation setting (sparsellm.allocation)
_ALLOCATION_READERS = {"temperature": ("energy",), "owl_lambda": ("owl",), "owl_m": ("owl",),
                       "min_sparsity": ("owl", "energy"), "max_sparsity": ("owl", "energy"),
                       "spread": ("owl", "energy")}


def _warn_unused_settings(config: PruneConfig, stacklevel: int = 4) -> None:
    """Say so when a settings group differs from its defaults but the method never reads it (e.g.
    --steps with sparsegpt): the report records every setting, and should not look as if it ran.
    Called by _run, called by run: the warnings name the line that called run (stacklevel 4; prune,
    which calls it directly, passes 3)."""
    used = set(METHODS[config.method].groups_read(config))
    # Elsa and masked-adam (the readers of the elsa settings) start from --init's layer-wise prune;
    # given to another method it is ignored (named below), and so are the settings only it reads
    init = config.elsa.init if "elsa" in used else None
    if init:
        used |= set(METHODS[init].groups_read(config))
    for group in ("sparsellm", "elsa"):
        settings = getattr(config, group)
        changed = [f.name for f in dataclasses.fields(settings)
                   if getattr(settings, f.name) != getattr(type(settings)(), f.name)]
        if group not in used and changed:
            if group in METHODS[config.method].settings_groups:  # a reader, but not with this structure
                warnings.warn(f"{', '.join(changed)} ({group} settings) are not read by method {config.method} "
                              f"with structure {config.structure}: ignored", UserWarning, stacklevel=stacklevel)
                continue
            readers = sorted(name for name, cls in METHODS.items() if group in cls.settings_groups)
            warnings.warn(f"{', '.join(changed)} ({group} settings) apply to {', '.join(readers)}, not to "
                          f"{config.method}: ignored", UserWarning, stacklevel=stacklevel)
    if "elsa" in used:
        _warn_unread_elsa_fields(config, stacklevel + 1)
    method = METHODS[config.method]
    read = set(method.structured_solver_settings if config.structure else method.solver_settings)
    if init:  # its --init prune is unstructured
        read |= set(METHODS[init].solver_settings)
    ignored = [name for name in SOLVER_SETTINGS
               if name not in read and getattr(config, name) != getattr(PruneConfig, name)]
    if ignored:
        run = f"method {config.method}" + (f" with structure {config.structure}" if config.structure else "") + (
            f" with init {init}" if init else "")
        warnings.warn(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not read by {run}: ignored",
                      UserWarning, stacklevel=stacklevel)
    if method.whole_model and not init and config.allocation.rule == "uniform" \
            and config.nsamples != PruneConfig.nsamples:  # its steps draw fresh windows of the text
        warnings.warn(f"nsamples (--nsamples) is not read by method {config.method} without --init or a non-uniform "
                      "--allocation (each step trains on fresh windows, --batch-size x --grad-accum): ignored",
                      UserWarning, stacklevel=stacklevel)
    allocation, default = config.allocation, type(config.allocation)()
    ignored = [name for name, rules in _ALLOCATION_READERS.items()
               if allocation.rule not in rules and getattr(allocation, name) != getattr(default, name)]
    if ignored:
        readers = " and ".join(sorted({rule for name in ignored for rule in _ALLOCATION_READERS[name]}))
        # the two whose flag is not the field's name: '--layer-sparsity-min' was named 'min_sparsity' only
        flags = {"min_sparsity": "min_sparsity (--layer-sparsity-min)",
                 "max_sparsity": "max_sparsity (--layer-sparsity-max)"}
        named = ", ".join(flags.get(name, name) for name in ignored)
        warnings.warn(f"{named} (allocation settings) apply to allocation {readers}, not to "
                      f"{allocation.rule}: ignored", UserWarning, stacklevel=stacklevel)
    if all(e == "none" for e in config.eval) and config.eval_windows is not None:  # (eval_seqlen is still read)
        warnings.warn("eval_windows (--eval-windows) caps the evaluation, and eval is none: ignored", UserWarning,
                      stacklevel=stacklevel)



# the elsa settings only Elsa's ADMM reads: masked-adam keeps a fixed mask (no z and u, so no
# penalty, ramp, z/u update interval, projection score or state storage)
_ADMM_SETTINGS = ("admm_lambda", "admm_lambda_start", "admm_schedule", "admm_interval", "score", "state_dtype")


def _warn_unread_elsa_fields(config: PruneConfig, stacklevel: int = 5) -> None:
    """The elsa settings a run of Elsa or masked-adam leaves unread, given: the group is read as a
    whole, so :func:`_warn_unused_settings` alone said nothing of them (stacklevel as there)."""
    settings, default = config.elsa, type(config.elsa)()

    def given(name):
        return getattr(settings, name) != getattr(default, name)

    admm = [name for name in _ADMM_SETTINGS if given(name)] if config.method == "masked-adam" else []
    if admm:
        warnings.warn(f"{', '.join(admm)} (elsa settings) {'is' if len(admm) == 1 else 'are'} not read by method "
                      f"masked-adam, which keeps a fixed mask (no ADMM): ignored", UserWarning, stacklevel=stacklevel)
    if "admm_lambda_start" not in admm and given("admm_lambda_start") and settings.admm_schedule == "constant":
        warnings.warn("admm_lambda_start (--admm-lambda-start) starts a linear or cosine --admm-schedule, and the "
                      "schedule is constant: ignored", UserWarning, stacklevel=stacklevel)
    if given("checkpoint_every") and settings.checkpoint_dir is None:
        warnings.warn("checkpoint_every (--checkpoint-every) spaces the checkpoints in --checkpoint-dir, and none "
                      "is given: ignored", UserWarning, stacklevel=stacklevel)


def _check_model_settings(config: PruneConfig, model, adapter) -> None:
    """What the settings ask of this model, checked before any work (by run and by prune): the
    layer range, the method's own checks, and that a structured share removes a unit."""
    _check_layers(config, len(adapter.layers(model)))
    METHODS[config.method].check_model(config, model, adapter)
    if config.structure is not None and "heads" in config.structure:
        # a family without head removal, or a share that removes no head, fails now
        head_removal(config.head_sparsity, adapter.attention(adapter.layers(model)[0]))
    if config.structure is not None and "channels" in config.structure:  # a share that removes no channel, too
        start, stop = config.layer_range(len(adapter.layers(model)))
        check_channel_removal(config.sparsity.fraction,
                              [adapter.ffn(layer).down.in_features for layer in list(adapter.layers(model))[start:stop]],
                              config.allocation.rule)


def _check_layers(config: PruneConfig, num_layers: int) -> None:
    if config.layers is None:
        return
    config.layers = config.layer_range(num_layers)
    start, stop = config.layers
    if not (0 <= start < stop <= num_layers):
        raise ValueError(f"layer range {start}:{stop} is out of bounds for a model with {num_layers} "
                         f"decoder layers (valid: 0 <= start < stop <= {num_layers})")


def _check_model_fits(config: PruneConfig, model, adapter) -> None:
    """What the settings ask of this model, checked before the dense evaluation and the prune:
    an N:M pattern's group size divides every pruned linear's input width, and the calibration
    and evaluation windows fit the model's positions (OPT's learned position table fails on an
    index past it, RoPE models run on positions they were not trained on)."""
    _check_pattern_fits(config, model, adapter)
    positions = getattr(model.config, "max_position_embeddings", None)
    lengths = {"--seqlen": config.seqlen}  # also the evaluation's window unless --eval-seqlen is given
    if config.eval_seqlen and any(e != "none" for e in config.eval):
        lengths["--eval-seqlen"] = config.eval_seqlen
    for flag, length in lengths.items():
        if positions is not None and length > positions:
            raise ValueError(f"{flag} {length} exceeds the model's {positions} positions (max_position_embeddings)")


def _check_pattern_fits(config: PruneConfig, model, adapter) -> None:
    layers = adapter.layers(model)
    start, stop = config.layer_range(len(layers))
    for index in range(start, stop):
        for name, linear in adapter.linears(layers[index]).items():
            try:
                config.sparsity.check_shape(linear.in_features)
            except ValueError as err:
                raise ValueError(f"layer {index} {name}: {err}") from None


def prune(model, tokenizer, config: PruneConfig) -> list[LayerRecord]:
    """Prune ``model`` in place with the settings of ``config`` (not changed: the run resolves its
    layer range in a copy); returns per-layer records. A structured run only zeroes the units:
    :func:`sparsellm.structure.compact_model` cuts them out (:func:`run` does both)."""
    config = dataclasses.replace(config)
    METHODS[config.method].preflight(config)
    _warn_unused_settings(config, stacklevel=3)  # (the caller of prune)
    adapter = get_adapter(model)
    _check_pattern_fits(config, model, adapter)  # an N:M group size that does not divide a width: one clear error
    _check_model_settings(config, model, adapter)
    return _prune(model, tokenizer, config)[0]


def _calibration(tokenizer, config: PruneConfig) -> data.Calibration:
    return data.Calibration.sample(config.calib, tokenizer, config.nsamples, config.seqlen, config.seed)


def _prune(model, tokenizer, config: PruneConfig, calibration: data.Calibration | None = None):
    """:func:`prune`, also returning the method's run-level details for the report."""
    adapter = get_adapter(model)
    _check_layers(config, len(adapter.layers(model)))
    method = get_method(config)
    if calibration is None:
        calibration = _calibration(tokenizer, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        records = method.prune_model(model, adapter, calibration)
    return records, method.details()


def evaluate(model, tokenizer, config: PruneConfig, label: str = "") -> dict[str, float]:
    """Perplexity on each of ``config.eval`` (skipped for ``none``), where the model's weights
    are: a layer-wise prune on a GPU returns each layer to host memory, so ``config.device`` need
    not be where the model is."""
    results = {}
    for source in config.eval:
        if source == "none":
            continue
        tokens = data.eval_tokens(source, tokenizer, config.resolved_eval_seqlen)
        results[source] = perplexity(model, tokens, config.resolved_eval_seqlen, config.eval_windows,
                                     quiet=config.quiet, desc=f"{label} ppl {source}".strip())
    return results


def _reset_host_peak() -> bool:
    """Restart the process's peak resident memory from its current size, as the CUDA peak is
    reset before the prune: Linux resets the high-water mark that ru_maxrss reads when "5" is
    written to /proc/self/clear_refs. False where that is not possible (another OS): the host
    peak then counts from the process's start (loading, the dense evaluation)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_memory(device: torch.device, host_reset: bool) -> dict:
    """Peak memory of the prune: the compute device's, and the host's (where SparseLLM's
    auxiliary buffers go when they do not fit on the device), with what the host's counts from."""
    peak = {"host_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "host_peak_since": "prune" if host_reset else "process start"}
    if device.type == "cuda":
        peak["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return peak


def run(config: PruneConfig) -> dict:
    """The whole job: load, evaluate dense, prune (a structured run: then cut the zeroed units
    out), export (before the pruned evaluation, which runs the exported model), evaluate pruned,
    report and save; returns the report.

    Bad settings fail before any long work starts; outputs are written only when complete.
    A forced ``config.backend`` holds for this run only (``auto`` keeps the process's setting).
    """
    with ops.backend_scope(None if config.backend == "auto" else config.backend), library_bars(not config.quiet):
        return _run(dataclasses.replace(config))  # a copy: the run resolves its layer range in it


def _run(config: PruneConfig) -> dict:
    from . import export

    if config.save:
        export.check_output_dir(config.save, config.overwrite)  # fail now, not after the prune
        export.check_save_format(config.save_format)  # e.g. 'compressed' without its extra: fail now too
    if config.report:
        check_report_path(config.report, config.save)
    if config.save and config.overwrite and os.path.exists(config.model) \
            and export.folder_holds(config.save, config.model):  # replaced whole: never the model's folder
        raise ValueError(f"--save {config.save} with --overwrite would replace the folder of the model being "
                         f"pruned ({config.model}); save elsewhere")
    device = resolve_device(config.device)
    use_local_gpu(device)  # each torchrun process on its own GPU from here, not GPU 0 until the prune
    forced = ops.get_backend()
    if forced not in ("auto", "reference") and not ops.available(forced, device):  # now, not at its first call
        raise ops.BackendUnavailable(f"backend {forced!r} cannot run on {device.type} (the run's device); "
                                     f"use --backend auto or another --device")
    for source in {config.calib, *config.eval} - {"none"}:  # a missing file fails now, not after the dense eval
        data.check_source(source)
    check_method_fits_job(config.method)  # a layer-wise method under a torchrun of several processes
    METHODS[config.method].preflight(config)
    _warn_unused_settings(config)
    model, tokenizer = load_model(config.model, config.dtype)
    adapter = get_adapter(model)
    _check_layers(config, len(adapter.layers(model)))  # (the memory check reads the range)
    _check_model_fits(config, model, adapter)
    _check_model_settings(config, model, adapter)
    for source in set(config.eval) - {"none"}:
        # an evaluation text shorter than one window fails now, not after the prune (with
        # --no-dense-eval the pruned evaluation is the first to read it); the stream stays cached
        data.eval_tokens(source, tokenizer, config.resolved_eval_seqlen)
    # sampled now: a calibration text too short for the windows fails before the dense evaluation
    calibration = _calibration(tokenizer, config)
    cost_before = model_cost(model, adapter, config.resolved_eval_seqlen)
    on_device = device.type == "cpu" or _fits(model, device)

    dense_ppl = {}
    if config.eval_dense and any(e != "none" for e in config.eval):
        model.to(device if on_device else "cpu")
        dense_ppl = evaluate(model, tokenizer, config, "dense")
        model.to("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    host_reset = _reset_host_peak()  # the peaks are the prune's: loading and the dense evaluation are done
    ops.reset_usage()
    start = time.perf_counter()
    records, method_details = _prune(model, tokenizer, config, calibration)
    prune_seconds = time.perf_counter() - start
    peak = _peak_memory(device, host_reset)
    backend_usage, backend_fallbacks = ops.usage(), ops.fallbacks()
    # Structured runs zeroed whole channels/heads in place (so the driver could measure errors
    # with the dense shapes); here they are cut out, before saving and evaluating: the saved
    # and evaluated model is the smaller one (same outputs).
    structure_info = compact_model(model, adapter) if config.structure is not None else None
    # the pruned model's sizes, before an export swaps its linears for sparse modules that
    # nn.Linear and model.parameters() no longer count (CSR holds its weight as a buffer)
    cost = {"before": cost_before, "after": model_cost(model, adapter, config.resolved_eval_seqlen)}

    main = is_main_process()  # under torchrun (Elsa, masked-adam) every process prunes; one writes
    staged = staged_report = None
    if config.save and main:  # the dense-masked weights, before any export changes their layout;
        # published only when the rest has run, so a failure or an interrupt leaves no output
        staged = export.stage_pruned(model, tokenizer, config.save, sparsity_structure=_structure(config),
                                     save_format=config.save_format, overwrite=config.overwrite,
                                     targets=_pruned_linears(model, adapter, config),
                                     extra={"sparsellm": {"method": config.method, "version": __version__}})
    try:
        model.to(device if on_device else "cpu")
        export_info = export.apply_export(model, config.export) if config.export else None
        pruned_ppl = evaluate(model, tokenizer, config, "pruned")
        report = build_report(config, model, records, dense_ppl=dense_ppl, pruned_ppl=pruned_ppl,
                              prune_seconds=prune_seconds, peak_memory=peak, backend_usage=backend_usage,
                              backend_fallbacks=backend_fallbacks, export_info=export_info, version=__version__,
                              method_details=method_details, cost=cost, structure=structure_info)
        if staged is not None:
            report["saved_to"] = str(staged.out_dir)
        # the report is written complete before the model is published, and put in place after
        # it: a report that cannot be written leaves no model published (an --overwrite target
        # as it was)
        staged_report = StagedReport(report, config.report) if config.report and main else None
        if staged is not None:
            staged.publish()
        if staged_report is not None:
            staged_report.publish()
    except BaseException:
        # the report first: the two may share a folder that the checkpoint's staging made
        if staged_report is not None:
            staged_report.discard()
        if staged is not None:
            staged.discard()
        raise
    return report


def _structure(config: PruneConfig) -> str:
    return str(config.sparsity) if config.sparsity.is_nm else "unstructured"


def _pruned_linears(model, adapter, config: PruneConfig) -> list[str] | None:
    """The qualified names of the linears this run pruned, where ``--layers`` left some decoder
    layers dense; None (the export's default: every decoder layer's linears) where it pruned
    them all. A checkpoint targets exactly what was pruned: the claimed N:M structure is
    checked on those linears only (the dense layers would fail it), and the compressed format
    stores the dense layers dense."""
    layers = adapter.layers(model)
    start, stop = config.layer_range(len(layers))
    if (start, stop) == (0, len(layers)):
        return None
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(linear)] for layer in list(layers)[start:stop] for linear in adapter.linears(layer).values()]


def _fits(model, device) -> bool:
    """Whether the whole model fits on ``device`` for evaluation (with room for activations)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return size * 1.3 < free
