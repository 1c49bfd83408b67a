"""Magnitude pruning: drop the smallest |W| of the whole matrix (or of each N:M group)."""
from __future__ import annotations

from .. import ops
from .base import PruningMethod


class Magnitude(PruningMethod):
    name = "magnitude"
    uses_inputs = False

    def prune(self, weight, stats, pattern):
        score = weight.abs()
        if pattern.is_nm:
            mask = ops.nm_prune_mask(score, pattern.n, pattern.m)
        else:
            mask = ops.flat_prune_mask(score, int(weight.numel() * pattern.fraction))
        return weight.masked_fill(mask, 0)
