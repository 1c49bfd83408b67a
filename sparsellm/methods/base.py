"""What a pruning method is, and the two ways one plugs into the package.

- A **whole-model** method (one that trains the whole model, as Elsa) subclasses
  :class:`PruningMethod` and implements :meth:`PruningMethod.prune_model`: it receives the model,
  its adapter and the calibration data (:class:`~sparsellm.data.Calibration`: the sampled
  windows, and fresh ones on demand), prunes in place and returns one
  :class:`~sparsellm.driver.LayerRecord` per pruned layer, so settings, data, evaluation, save,
  export and report are shared with every other method.
- A **layer-wise** method subclasses :class:`LayerwiseMethod` and implements :meth:`plan`: per
  decoder layer, the steps it needs (see :mod:`sparsellm.plan`). The layer-by-layer driver
  executes the plans. Most such methods prune each linear on its own from one statistic of its
  input: they subclass :class:`LocalMethod`, set ``statistic`` and write :meth:`LocalMethod.prune`.
  The smallest example is :class:`~sparsellm.methods.magnitude.Magnitude` (no statistic), then
  :class:`~sparsellm.methods.wanda.Wanda` (per-column norms, d floats).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import PruneConfig
from ..plan import Gram, LayerView, Statistic, Step
from ..precision import solve_dtype
from ..sparsity import SparsityPattern

# PruneConfig's solver settings shared by the layer-wise methods (SparseGPT's OBS column block and
# dampening, statistics after the earlier linears): a method states which its runs read
SOLVER_SETTINGS = ("blocksize", "percdamp", "sequential")


def solve_weight(linear: nn.Linear) -> torch.Tensor:
    """The linear's weight in the local methods' solve dtype (:func:`solve_dtype`: float32,
    float64 for a float64 model); the weight itself where it has that dtype already, so the
    solves must not change it in place."""
    weight = linear.weight.detach()
    return weight.to(solve_dtype(weight.dtype))


def set_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    """Write a (float32, or float64) solve result into the linear, in the model's dtype."""
    linear.weight.data.copy_(weight.to(linear.weight.dtype))


class PruningMethod:
    """Base of every method; ``name`` is what ``--method`` takes."""

    name: str = ""
    # the PruneConfig settings groups (fields) this method reads besides the common ones
    settings_groups: tuple[str, ...] = ()
    # trains the whole model at once: under torchrun its processes share the work (and --fsdp
    # shards it); a layer-wise method runs in one process
    whole_model: bool = False
    # True for a method that only removes whole units (StructPrune): its runs get a --structure
    # (channels unless told otherwise), and it cannot be the per-weight --init of Elsa/masked-adam
    structured_only: bool = False
    # which of the common solver settings (PruneConfig's blocksize, percdamp, sequential) its
    # runs read, without and with --structure: a run warns of one given that it does not read
    solver_settings: tuple[str, ...] = SOLVER_SETTINGS
    structured_solver_settings: tuple[str, ...] = SOLVER_SETTINGS

    def __init__(self, config: PruneConfig):
        self.config = config

    @classmethod
    def groups_read(cls, config: PruneConfig) -> tuple[str, ...]:
        """The settings groups a run of ``config`` reads (a run warns of one given that it does
        not): ``settings_groups``, unless the run skips what reads them."""
        return cls.settings_groups

    @classmethod
    def check_config(cls, config: PruneConfig) -> None:
        """Refuse settings this method cannot run with (a ValueError); runs when the settings
        are built, so it reads no file."""

    @classmethod
    def preflight(cls, config: PruneConfig) -> None:
        """Checks that read files (e.g. a checkpoint folder), run before the model is loaded."""

    @classmethod
    def check_model(cls, config: PruneConfig, model: nn.Module, adapter) -> None:
        """Checks of what the loaded model must hold (e.g. the mask a method keeps), run right
        after loading, before the dense evaluation."""

    def prune_model(self, model: nn.Module, adapter, calibration) -> list:
        """Prune ``model`` in place on the ``calibration`` data; return one LayerRecord per
        pruned layer."""
        raise NotImplementedError

    def details(self) -> dict:
        """Run-level diagnostics for the report (e.g. a training curve); JSON-able."""
        return {}


class LayerwiseMethod(PruningMethod):
    """A method that prunes one decoder layer at a time through the driver."""

    def prune_model(self, model, adapter, calibration):
        from ..driver import LayerDriver  # the driver imports plans, not methods

        return LayerDriver(model, adapter, self, self.config).run(calibration.windows)

    def plan(self, layer: LayerView) -> list[Step]:
        """The steps that prune ``layer``, in data-flow order."""
        raise NotImplementedError


class LocalMethod(LayerwiseMethod):
    """Prunes each linear on its own: one step per group of linears sharing an input, observing
    ``statistic`` of that input (``None``: the method reads no data)."""

    statistic: type[Statistic] | None = Gram
    # Its structured version (--structure): a key of sparsellm.methods.structured.CRITERIA.
    structured: str | None = None

    def plan(self, layer):
        if layer.structure is not None:
            from .structured import CRITERIA, structured_steps

            return structured_steps(CRITERIA[self.structured](self.config.percdamp), layer)
        return self.group_steps(layer.groups, layer.pattern)

    def group_steps(self, groups: list[dict[str, nn.Linear]], pattern: SparsityPattern) -> list[Step]:
        return [Step(group, lambda observed, g=group: self.prune_group(g, observed, pattern), observe=self.statistic)
                for group in groups]

    def prune_group(self, group: dict[str, nn.Linear], observed, pattern: SparsityPattern) -> None:
        for linear in group.values():  # every width first: a refused one leaves the whole group as it was
            pattern.check_shape(linear.in_features)
        for linear in group.values():
            set_weight(linear, self.prune(solve_weight(linear), observed, pattern))

    def prune(self, weight: torch.Tensor, observed, pattern: SparsityPattern) -> torch.Tensor:
        """``weight`` (out x in) is float32, float64 for a float64 model (:func:`solve_weight`), on
        the compute device, ``observed`` the result of ``statistic`` for its input; return the
        pruned weight."""
        raise NotImplementedError
