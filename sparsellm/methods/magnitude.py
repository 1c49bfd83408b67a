"""Magnitude pruning: drop the smallest |W| of the whole matrix (or of each N:M group).

The smallest method, and the example of how one plugs in: it reads no data, so its steps
observe nothing and the driver runs no statistics pass for it.
"""
from __future__ import annotations

from .. import ops
from ..sparsity import pruned_count
from .base import LocalMethod


class Magnitude(LocalMethod):
    name = "magnitude"
    statistic = None
    structured = "magnitude"
    solver_settings = structured_solver_settings = ()  # no data: nothing to damp, block or sequence

    def prune(self, weight, observed, pattern):
        score = weight.abs()
        if pattern.is_nm:
            mask = ops.nm_prune_mask(score, pattern.n, pattern.m)
        else:
            mask = ops.flat_prune_mask(score, pruned_count(weight.numel(), pattern.fraction))
        return weight.masked_fill(mask, 0)
