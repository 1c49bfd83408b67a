"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, pruned within each output row
(or each N:M group), no weight update. Observes d floats per input: the column norms."""
from __future__ import annotations

from .. import ops
from ..plan import ColumnSquares
from .base import LocalMethod


class Wanda(LocalMethod):
    name = "wanda"
    statistic = ColumnSquares
    structured = "wanda"
    solver_settings = structured_solver_settings = ("sequential",)  # no OBS: no blocks, no dampening

    def prune(self, weight, column_norms, pattern):
        mask = ops.wanda_prune_mask(weight, column_norms, pattern.fraction, pattern.n, pattern.m)
        return weight.masked_fill(mask, 0)
