"""What a pruning method sees and returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import PruneConfig
from ..sparsity import SparsityPattern


@dataclass
class InputStats:
    """Statistics of the inputs a linear (or a group of linears sharing an input) sees.

    ``gram`` is the mean outer product X^T X / N over the N calibration tokens (float32);
    its diagonal gives the squared input-column norms Wanda needs (up to the factor N).
    """

    gram: torch.Tensor
    tokens: int
    # Derived quantities shared by the linears of a group (e.g. SparseGPT's factor of H^-1).
    cache: dict = field(default_factory=dict)

    @property
    def column_norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens, per input column j."""
        return (torch.diagonal(self.gram).clamp_min(0) * self.tokens).sqrt()


class PruningMethod:
    """A small object with one job: given a linear's weight and input statistics, return the
    pruned weight. Methods that prune the whole FFN jointly set ``joint_ffn`` and implement
    :meth:`prune_ffn` (see sparsellm.methods.sparsellm)."""

    name: str = ""
    joint_ffn: bool = False
    # False where the pruned weights do not depend on the calibration inputs (magnitude): the
    # driver then gathers every group's statistics (used only for the reported errors) in one
    # pass, as sequential passes could not change the result.
    uses_inputs: bool = True

    def __init__(self, config: PruneConfig):
        self.config = config

    def prune(self, weight: torch.Tensor, stats: InputStats, pattern: SparsityPattern) -> torch.Tensor:
        """``weight`` is float32 (out x in) on the compute device; return the pruned weight."""
        raise NotImplementedError
