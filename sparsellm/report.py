"""The JSON report of a run and its printed summary."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile

import torch

from .driver import LayerRecord


def _finite(x):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def structured_summary(config, records: list[LayerRecord], structure: dict | None) -> dict | None:
    """What a structured run asked and did, over the pruned layers: the share of FFN channels
    (--sparsity, None without channels) and of query heads (--head-sparsity) asked, and the shares
    removed, from ``structure`` (what :func:`sparsellm.structure.compact_model` removed; None where
    the run compacted nothing, or the family has no heads). None for an unstructured run."""
    if config.structure is None:
        return None
    removed, sizes = (structure or {}).get("removed", {}), (structure or {}).get("layer_sizes", {})
    indices = [r.index for r in records]

    def share(unit, size_field):
        if unit not in removed or size_field not in sizes:
            return None
        gone = sum(removed[unit][i] for i in indices)
        return gone / max(1, gone + sum(sizes[size_field][i] for i in indices))

    return {"structure": config.structure,
            "target_channel_share": config.sparsity.fraction if "channels" in config.structure else None,
            "target_head_share": config.head_sparsity,
            "channel_share_removed": share("channels", "intermediate_size"),
            "head_share_removed": share("heads", "num_attention_heads")}


def build_report(config, model, records: list[LayerRecord], *, dense_ppl, pruned_ppl, prune_seconds,
                 peak_memory, backend_usage, export_info, version, backend_fallbacks=None,
                 method_details=None, cost=None, structure=None) -> dict:
    """``cost``: :func:`~sparsellm.structure.model_cost` before and after the prune, taken before
    any export (whose sparse modules it would not count); the peak per parameter divides by its
    ``before`` parameters (the model the prune held: a structured run's units are cut out after
    it), else by the model's. ``structure``: what
    :func:`sparsellm.structure.compact_model` removed (structured runs)."""
    structured = structured_summary(config, records, structure)
    zeros = total = 0
    per_matrix = {}
    for record in records:
        for name, info in record.matrices.items():
            zeros += round(info["sparsity"] * info["numel"])
            total += info["numel"]
            per_matrix[f"layers.{record.index}.{name}"] = info["sparsity"]
    parameters = cost["before"]["parameters"] if cost else sum(p.numel() for p in model.parameters())
    report = {
        "sparsellm_version": version,
        "method": config.method,
        "model": config.model,
        "model_type": model.config.model_type,
        # the per-weight target and pattern; a structured run has no weight pattern, and its
        # --sparsity is the channel share (None where it removes no channels): see "structured"
        "target_sparsity": config.sparsity.fraction if structured is None else structured["target_channel_share"],
        "sparsity_pattern": str(config.sparsity) if structured is None else None,
        "pattern_convention": "N:M = N weights pruned in every M consecutive input weights",
        # zeros over all pruned weights (structured: of the zeroed units' weights, before compaction)
        "achieved_sparsity": zeros / total if total else 0.0,
        "structured": structured,
        "pruned_weights": total,
        "layers_pruned": [r.index for r in records],
        "per_layer_sparsity": {
            str(r.index): sum(round(i["sparsity"] * i["numel"]) for i in r.matrices.values())
            / max(1, sum(i["numel"] for i in r.matrices.values())) for r in records},
        # what the allocation asked of each layer (--allocation; structured: units removed)
        "per_layer_target": {str(r.index): r.target for r in records if r.target},
        "per_matrix_sparsity": per_matrix,
        "layer_errors": [{"layer": r.index, "ffn_rel_error": r.ffn_rel_error,
                          "output_rel_error": r.output_rel_error,
                          "matrix_rel_error": {k: v["rel_error"] for k, v in r.matrices.items()},
                          "seconds": r.seconds, "placement_seconds": r.placement_seconds,
                          "diagnostics": r.diagnostics} for r in records],
        "ppl": {"dense": dense_ppl, "pruned": pruned_ppl},
        "prune_seconds": prune_seconds,
        # the compute device's peak where it is a GPU, else the host's; both are in peak_memory
        "peak_memory_bytes": peak_memory.get("cuda_max_allocated", peak_memory["host_max_rss"]),
        "peak_memory": peak_memory,
        "peak_memory_bytes_per_param": peak_memory.get("cuda_max_allocated", peak_memory["host_max_rss"])
        / max(1, parameters),
        # SparseLLM's z/p/s/Y buffers of the largest layer (included in the peaks above)
        "aux_buffer_bytes": max((r.diagnostics.get("aux_bytes", 0) for r in records), default=0),
        "backend": config.backend,
        "backend_usage": backend_usage,
        # {op: {"declining->next: reason": calls}}: calls a backend handed on (see ops.fallbacks)
        "backend_fallbacks": backend_fallbacks or {},
        "export": export_info,
        "method_details": method_details or {},  # run-level, e.g. Elsa's loss curve and ADMM residuals
        **({"structure": structure} if structure is not None else {}),
        "settings": config.to_dict(),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": _device_name(config.device),
                        "threads": torch.get_num_threads()},
    }
    if cost is not None:
        report["cost"] = cost
    return _finite(report)


def _device_name(device: str | None) -> str:
    """The run's compute device: its GPU's name (that of --device cuda:1, not of the current
    GPU; no --device picks the current one where CUDA is available), else the host's processor."""
    if torch.cuda.is_available() and (device or "cuda").startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device or "cuda"))
    return platform.processor() or "cpu"


def check_report_path(path: str, save: str | None = None) -> None:
    """Refuse a report path that cannot be written as a file (a folder, the --save folder or a
    place inside it, a place without write access), before any long work."""
    from .export import check_writable, folder_holds

    if os.path.isdir(path):
        raise IsADirectoryError(f"report path {path} is a folder; give a file name such as {path}/report.json")
    if save is not None and os.path.abspath(path) == os.path.abspath(save):
        raise ValueError(f"report path {path} is the --save folder")
    # The save is published by renaming its staging folder onto --save, after the report is
    # staged beside its path: a report inside that folder made it non-empty (the publish refused
    # it, after the whole run) or, with --overwrite, was deleted with the folder it replaced.
    if save is not None and folder_holds(save, os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"report path {path} is inside the --save folder {save}, which the saved model replaces "
                         f"whole; write the report beside it")
    check_writable(os.path.dirname(os.path.abspath(path)), path)


class StagedReport:
    """A complete report written into a temporary file beside its destination: :meth:`publish`
    renames it onto the destination (atomic), :meth:`discard` deletes it and the folders its
    staging made. A run stages its report before it publishes its model, so a report that
    cannot be written leaves no model published, and a failure after it leaves nothing behind."""

    def __init__(self, report: dict, path: str):
        from .export.checkpoint import make_folders, ordinary_mode

        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        self.made_folders = make_folders(folder)
        self.staged = None
        try:
            fd, self.staged = tempfile.mkstemp(prefix=".report.", suffix=".json", dir=folder)
            with os.fdopen(fd, "w") as handle:
                json.dump(report, handle, indent=2)
            os.chmod(self.staged, ordinary_mode(False))  # mkstemp makes it private; a report is an ordinary file
        except BaseException:
            self.discard()
            raise

    def publish(self) -> None:
        try:
            os.replace(self.staged, self.path)
        except BaseException:
            self.discard()
            raise
        self.staged = None

    def discard(self) -> None:
        from .export.checkpoint import remove_made_folders

        if self.staged is not None and os.path.exists(self.staged):
            os.unlink(self.staged)
        self.staged = None
        remove_made_folders(self.made_folders)


def write_report(report: dict, path: str) -> None:
    """Write atomically: a temporary file in the same folder, renamed when complete."""
    StagedReport(report, path).publish()


def _ppl_text(value) -> str:
    """A perplexity as printed: n/a where there is none (no dense evaluation) or where it was not
    finite (the report holds NaN and inf as null)."""
    return f"{value:.3f}" if value is not None else "n/a"


def _share_text(unit: str, removed: float | None, asked: float | None) -> str:
    return f"{unit} removed {'n/a' if removed is None else f'{removed:.4f}'} (asked {asked})"


def summary(report: dict) -> str:
    structured = report.get("structured")
    if structured is None:
        what = f"pattern {report['sparsity_pattern']}  achieved sparsity {report['achieved_sparsity']:.4f}"
    else:  # what was removed: channel and head shares, not a weight pattern
        what = "  ".join([f"structure {structured['structure']}"] + [
            _share_text(unit, structured[f"{key}_share_removed"], structured[f"target_{key}_share"])
            for unit, key in (("channels", "channel"), ("heads", "head")) if structured[f"target_{key}_share"] is not None])
    resumed = (report.get("method_details") or {}).get("resumed_from_step")
    # a resumed Elsa run trains only the steps after its checkpoint: its prune time counts those
    layers = (report.get("settings") or {}).get("layers")
    if layers is not None:  # the achieved sparsity / shares are those of these layers, not the model's
        what += f"  layers {layers[0]}:{'' if layers[1] is None else layers[1]}"
    lines = [f"method {report['method']}  {what}  prune {report['prune_seconds']:.1f}s"
             + (f" (resumed from step {resumed} of --checkpoint-dir)" if resumed else "")]
    for dataset, value in report["ppl"]["pruned"].items():
        lines.append(f"perplexity [{dataset}]  dense {_ppl_text(report['ppl']['dense'].get(dataset))}  "
                     f"pruned {_ppl_text(value)}")
    exported = report.get("export") or {}
    if exported.get("kind"):  # say what the export did, also when it converted nothing
        # a run without --report has no report to look in: say how to get one
        why = ("the report's export section says why" if (report.get("settings") or {}).get("report")
               else "--report FILE writes why, in its export section")
        line = (f"export {exported['kind']}: {exported['n_converted']} linears converted, {exported['n_dense']} "
                f"left dense ({why})")
        lines.append(line + (f"; {exported['note']}" if exported.get("note") else ""))
    cost = report.get("cost")
    if cost and cost["after"]["parameters"] != cost["before"]["parameters"]:
        lines.append("parameters {:,} -> {:,}  FLOPs/token {:.4g} -> {:.4g}".format(
            cost["before"]["parameters"], cost["after"]["parameters"], cost["before"]["flops_per_token"],
            cost["after"]["flops_per_token"]))
    return "\n".join(lines)
