"""Which linears a sparse export targets: compressed-tensors' ``targets`` / ``ignore`` matching."""
from __future__ import annotations

import re

from torch import nn

from .errors import ExportError


# why every export leaves a linear whose weight is on the meta device (offloaded) dense
ON_META = "weight is on the meta device (offloaded?): it holds no values to convert"


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    """compressed-tensors matching: ``re:<regex>`` (re.match on the module name), an exact
    module name, or a module class name such as ``Linear``."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def _any(patterns, name: str, module: nn.Module) -> bool:
    return any(matches(p, name, module) for p in patterns)


def resolve_targets(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
                    ) -> tuple[dict[str, nn.Linear], list[str], list[str]]:
    """The targeted linears and the ``targets``/``ignore`` lists to record for them.

    Default: the linears of decoder layers (names containing ``.layers.``); embeddings and
    ``lm_head`` stay dense. The recorded lists select exactly the same modules under
    compressed-tensors semantics (:func:`recorded_selection`): linears a target matches but
    that are not selected are named in ``ignore``.
    """
    found = linears(model)
    if isinstance(ignore, str):  # list() would make each character a pattern, ignoring nothing
        raise ExportError("ignore must be a list of patterns, not a single string")
    ignore = list(ignore or [])
    if targets is None:
        recorded_targets = ["Linear"]
        candidates = {n: m for n, m in found.items() if ".layers." in f".{n}."}
    else:
        if isinstance(targets, str):
            raise ExportError("targets must be a list of patterns, not a single string")
        recorded_targets = list(targets)
        for pattern in recorded_targets:
            if not any(matches(pattern, n, m) for n, m in found.items()):
                raise ExportError(f"target {pattern!r} matches no nn.Linear module of the model")
        candidates = {n: m for n, m in found.items() if _any(recorded_targets, n, m)}
    selected = {n: m for n, m in candidates.items() if not _any(ignore, n, m)}
    if not selected:
        raise ExportError("no linear layer is targeted (check targets / ignore)")
    implied = sorted(n for n, m in found.items()
                     if n not in selected and _any(recorded_targets, n, m) and not _any(ignore, n, m))
    return selected, recorded_targets, ignore + implied


def recorded_selection(model: nn.Module, sparsity_config: dict) -> dict[str, nn.Linear]:
    """The linears a recorded ``sparsity_config`` block selects."""
    targets = sparsity_config.get("targets") or []
    ignore = sparsity_config.get("ignore") or []
    return {n: m for n, m in linears(model).items() if _any(targets, n, m) and not _any(ignore, n, m)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (a dotted path) of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
