"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, pruned within each output row
(or each N:M group), no weight update."""
from __future__ import annotations

from .. import ops
from .base import PruningMethod


class Wanda(PruningMethod):
    name = "wanda"

    def prune(self, weight, stats, pattern):
        mask = ops.wanda_prune_mask(weight, stats.column_norms, pattern.fraction, pattern.n, pattern.m)
        return weight.masked_fill(mask, 0)
