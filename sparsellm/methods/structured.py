"""Local structured pruning: whole FFN channels and attention heads, layer by layer.

The structured versions of magnitude, Wanda and SparseGPT (``--structure``), and the head solve
StructPrune uses. A *unit* is one FFN channel (column j of down, rows j of up/gate) or one query
head (head_dim columns of o, the same rows of q); which units exist and how they are zeroed and
later removed is :mod:`sparsellm.structure`. Each criterion looks at the *consuming* matrix
(down, o), whose input columns the units are:

- ``magnitude``: the squared norm of all the unit's weights (its consumer columns and producer
  rows); reads no data.
- ``wanda``: the Wanda score |W_ic| ||X_c|| summed over the unit's consumer weights (X: the
  consumer's input, observed as column norms), as Wanda's structured variants do.
- ``obs``: optimal brain surgeon on the consumer's least squares ||W X - W' X||^2 (the
  ZipLM/SlimGPT family): units are removed one at a time, each the one whose removal, with
  the remaining columns refitted, raises the error least (tr(W_U (H^-1_UU)^-1 W_U^T) in the
  current inverse Gram H^-1, which is then downdated; above ``OBS_MAX_DOWNDATES`` units the
  cheapest few go per downdate, :func:`obs_select`); the remaining columns of the consumer
  are finally refitted in closed form on the calibration Gram (:func:`refit_consumer`).

Heads are removed in equal numbers from every key/value group (see :mod:`sparsellm.structure`):
each group is a *bucket* that must lose the same count.
"""
from __future__ import annotations

import torch
from torch import nn

from ..plan import ColumnSquares, Gram, LayerView, Statistic, Step
from ..precision import solve_dtype
from ..structure import zero_channels, zero_groups, zero_heads
from .base import set_weight, solve_weight


def damped_gram(gram: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The Gram in float64 with ``percdamp`` x its mean diagonal added, as the SparseGPT solver
    dampens. Inputs that never fired (zero row and column) keep their zero diagonal under the
    dampening, which alone makes the matrix positive definite: removing such a unit then costs
    the dampening's share of its weights, next to nothing, as its true cost (zero). A unit
    diagonal (the unstructured solver's, which zeroes their weights) would price it at its
    weights' squared norm whatever the scale of the inputs, above the units that do fire where
    the Gram's diagonal is below 1. Only where no input fired at all do they get a unit
    diagonal (the mean would be zero)."""
    g = gram.detach().to(torch.float64, copy=True)
    if not bool(torch.diagonal(g).any()):
        g, _ = Gram.without_dead_inputs(g, in_place=True)
    g.diagonal().add_(percdamp * float(torch.diagonal(g).mean()))
    return g


def refit_consumer(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """argmin over W' whose columns outside ``keep`` are zero of tr((W - W') G (W - W')^T), i.e.
    ||W X - W' X||^2 / N for G = X^T X / N: W'_K = W G_{:,K} G_{K,K}^-1 (normal equations,
    solved by Cholesky). ``gram`` should be damped (positive definite). Float64 throughout."""
    w, g = weight.double(), gram.double()
    out = torch.zeros_like(w)
    if len(keep):
        chol = torch.linalg.cholesky(g[keep][:, keep])
        out[:, keep] = torch.cholesky_solve((w @ g[:, keep]).t(), chol).t()
    return out


def _unit_columns(units: int, unit: int) -> torch.Tensor:
    return torch.arange(units * unit).reshape(units, unit)


# Downdates per obs_select call at most: a layer losing 768 channels removes 12 per downdate
# (one rank-12 update instead of 12 rank-1 updates of the 1536 x 1536 inverse: 37 s -> ~1 s on
# 2 CPU cores). Up to this many units the greedy is exact (one unit per downdate).
OBS_MAX_DOWNDATES = 64


def obs_select(weight: torch.Tensor, gram: torch.Tensor, count: int, unit: int, buckets: int = 1,
               max_downdates: int = OBS_MAX_DOWNDATES, _general: bool = False) -> torch.Tensor:
    """Greedy OBS choice of ``count`` units (``unit`` consecutive input columns each) of
    ``weight`` to remove against the damped Gram ``gram``; units form ``buckets`` equal
    contiguous buckets, each losing ``count // buckets``. Returns the removed unit indices.

    Each step removes the set S of the k cheapest units by tr(W_U (H^-1_UU)^-1 W_U^T) (the
    exact rise of the refitted least-squares error for a unit U alone), with
    k = ceil(count / max_downdates), then updates W -= W_S (H^-1_SS)^-1 H^-1_{S,:} and
    H^-1 -= H^-1_{:,S} (H^-1_SS)^-1 H^-1_{S,:} (the inverse Gram of the remaining columns), so
    every later cost is exact again. With count <= max_downdates, k = 1: the exact greedy.
    The reference is :func:`refit_consumer`: the error of each candidate set recomputed from
    scratch (tests/test_structured.py); for single columns the cost has the fast form
    ||w_j||^2 / [H^-1]_jj, checked against the general block form (``_general=True``)."""
    w = weight.double().clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(gram.double()))
    units = w.shape[1] // unit
    cols = _unit_columns(units, unit)
    left = torch.full((buckets,), count // buckets)
    bucket_of = torch.arange(units) // (units // buckets)
    alive = torch.ones(units, dtype=torch.bool)
    per_step = -(-count // max_downdates)
    removed: list[int] = []
    while len(removed) < count:
        if unit == 1 and not _general:  # single columns: ||w_j||^2 / [H^-1]_jj, no batched solves
            cost = w.square().sum(0) / torch.diagonal(hinv)
        else:
            blocks = hinv[cols[:, :, None], cols[:, None, :]]  # [units, unit, unit]
            wu = w[:, cols].permute(1, 0, 2)  # [units, out, unit]
            solved = torch.linalg.solve(blocks, wu.transpose(1, 2))  # (H^-1_UU)^-1 W_U^T
            cost = (wu.transpose(1, 2) * solved).sum((1, 2))
        cost[~alive] = float("inf")
        chosen = []
        for u in torch.argsort(cost).tolist():  # cheapest first, within each bucket's quota
            if len(chosen) == min(per_step, count - len(removed)):
                break
            if alive[u] and left[bucket_of[u]] > 0:
                chosen.append(u)
                left[bucket_of[u]] -= 1
        c = cols[chosen].reshape(-1)
        solve_block = torch.linalg.solve(hinv[c][:, c], hinv[c, :])  # (H^-1_SS)^-1 H^-1_{S,:}
        w -= w[:, c] @ solve_block
        hinv -= hinv[:, c] @ solve_block
        w[:, c] = 0
        hinv[c, :] = 0
        hinv[:, c] = 0
        hinv[c, c] = 1  # keeps removed blocks invertible; their costs are masked anyway
        alive[chosen] = False
        removed += chosen
    return torch.tensor(sorted(removed), dtype=torch.long)


def lowest_units(scores: torch.Tensor, count: int, buckets: int = 1) -> torch.Tensor:
    """The ``count`` lowest-scoring units, ``count // buckets`` from each contiguous bucket."""
    per_bucket = count // buckets
    grouped = scores.reshape(buckets, -1)
    picked = torch.topk(grouped, per_bucket, dim=1, largest=False).indices
    return (picked + torch.arange(buckets)[:, None] * grouped.shape[1]).reshape(-1).sort().values


class UnitCriterion:
    """How a local structured method ranks units; ``statistic`` is what it observes of the
    consumer's input."""

    statistic: type[Statistic] | None = None

    def __init__(self, percdamp: float = 0.01):
        self.percdamp = percdamp

    def choose(self, consumer: torch.Tensor, producers: list[torch.Tensor], observed, count: int, unit: int,
               buckets: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (removed unit indices, the consumer's new weight or None to keep it)."""
        raise NotImplementedError


class MagnitudeUnits(UnitCriterion):
    def choose(self, consumer, producers, observed, count, unit, buckets):
        scores = consumer.square().sum(0)
        for rows in producers:
            scores = scores + rows.square().sum(1)
        return lowest_units(scores.reshape(-1, unit).sum(1), count, buckets), None


class WandaUnits(UnitCriterion):
    statistic = ColumnSquares

    def choose(self, consumer, producers, column_norms, count, unit, buckets):
        scores = consumer.abs().sum(0) * column_norms.to(consumer.device)
        return lowest_units(scores.reshape(-1, unit).sum(1), count, buckets), None


def obs_remove(weight: torch.Tensor, gram: torch.Tensor, count: int, unit: int, buckets: int,
               percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured OBS of a consumer matrix: the units to remove (:func:`obs_select`) and the
    weight with the rest refitted (:func:`refit_consumer`; float32, float64 for a float64
    ``weight``), on the damped ``gram``."""
    g = damped_gram(gram, percdamp)
    # Units whose input never fired on the calibration tokens keep their weights unless chosen
    # (removing one costs almost nothing, only the dampening sees it, so it goes first while the
    # count allows): zeroed, every one would be cut by compact_model on top of the count, and the
    # layers would come out uneven.
    w = weight.double().clone()
    removed = obs_select(w, g, count, unit, buckets)
    keep = torch.ones(w.shape[1], dtype=torch.bool)
    keep[_unit_columns(w.shape[1] // unit, unit)[removed].reshape(-1)] = False
    # in the solve dtype (float32, float64 for a float64 weight): a float64 model's refit is not
    # rounded through float32 on its way into the model
    return removed, refit_consumer(w, g, keep.nonzero().reshape(-1)).to(solve_dtype(weight.dtype))


class OBSUnits(UnitCriterion):
    statistic = Gram

    def choose(self, consumer, producers, gram, count, unit, buckets):
        return obs_remove(consumer, gram, count, unit, buckets, self.percdamp)


CRITERIA: dict[str, type[UnitCriterion]] = {"magnitude": MagnitudeUnits, "wanda": WandaUnits, "obs": OBSUnits}


def _apply(consumer: nn.Linear, new_weight: torch.Tensor | None, zero) -> None:
    if new_weight is not None:
        set_weight(consumer, new_weight)
    zero()  # after the refit: the removed columns are exactly zero whatever the refit's rounding


def head_step(criterion: UnitCriterion, layer: LayerView) -> Step:
    """Remove ``layer.structure.heads_per_group`` query heads from every key/value group
    (grouped-query attention), or ``layer.structure.kv_groups`` whole groups with their key and
    value heads (multi-head attention). Either way the units are column blocks of o: a head's
    ``head_dim`` columns, or a group's (its query heads are consecutive)."""
    attention, structure = layer.attention, layer.structure
    if structure.kv_groups:
        count, unit, buckets = structure.kv_groups, attention.head_dim * attention.heads_per_group, 1
        linears, zero, key = (attention.q, attention.k, attention.v, attention.o), zero_groups, "removed_kv_groups"
    else:
        count, unit, buckets = structure.heads_per_group * attention.num_kv_heads, attention.head_dim, attention.num_kv_heads
        linears, zero, key = (attention.q, attention.o), zero_heads, "removed_heads"
    # the unit's producer rows: a group's are its rows of q, k and v (one query head per group:
    # the same row count in each), a query head's its rows of q
    producers = linears[:-1]

    def solve(observed):
        # solve_weight: float32, float64 for a float64 model (which is pruned in float64 throughout)
        removed, new_o = criterion.choose(solve_weight(attention.o), [solve_weight(lin) for lin in producers],
                                          observed, count, unit, buckets)
        _apply(attention.o, new_o, lambda: zero(attention, removed))
        return {key: removed.tolist()}

    return Step(_names(layer, *linears), solve, observe=criterion.statistic, source=attention.o)


def channel_step(criterion: UnitCriterion, layer: LayerView) -> Step:
    """Remove ``layer.structure.channels`` FFN channels."""
    ffn = layer.ffn

    def solve(observed):
        producers = [solve_weight(lin) for lin in (ffn.up, ffn.gate) if lin is not None]
        removed, new_down = criterion.choose(solve_weight(ffn.down), producers, observed, layer.structure.channels, 1, 1)
        _apply(ffn.down, new_down, lambda: zero_channels(ffn, removed))
        return {"removed_channels": len(removed)}

    return Step(_names(layer, *ffn.linears().values()), solve, observe=criterion.statistic, source=ffn.down)


def _names(layer: LayerView, *linears: nn.Linear) -> dict[str, nn.Linear]:
    """The qualified names the layer's groups give these linears (for the report)."""
    wanted = {id(lin) for lin in linears}
    return {name: lin for group in layer.groups for name, lin in group.items() if id(lin) in wanted}


def structured_steps(criterion: UnitCriterion, layer: LayerView) -> list[Step]:
    """A layer's plan for a local structured method: heads first (data-flow order), then channels."""
    steps = []
    if layer.structure.removes_heads:
        steps.append(head_step(criterion, layer))
    if layer.structure.channels:
        steps.append(channel_step(criterion, layer))
    return steps


__all__ = ["CRITERIA", "UnitCriterion", "refit_consumer", "obs_select", "obs_remove", "lowest_units", "damped_gram",
           "structured_steps", "head_step", "channel_step"]
