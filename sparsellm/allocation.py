"""Layer-wise allocation: how much of each decoder layer is pruned (``--allocation``).

- ``uniform``: every layer gets the target.
- ``owl`` (Yin et al. 2023, "Outlier Weighed Layerwise sparsity"): per layer, the share D_l of
  Wanda scores |W_ij| ||X_j|| above M times the layer's mean score (outliers); the layer's
  density is made linear in D_l over a range of 2 lambda and centred on 1 - target, so layers
  with more outliers are pruned less (lambda 0.08, M 5: the paper's defaults); then shifted and
  clipped to the per-layer bounds, the mean kept at the target. Unstructured only.
- ``energy`` (StructPrune, Song, Bai, Zhao 2025): a softmax over per-layer energies,
  s_l proportional to exp(-E_l / T), rescaled so the mean is the target and clipped to the per-layer bounds.

The energy of a layer, as used here (inferred: the paper names a softmax over layer energies
with a temperature, the public code does not match it, and we could not read the paper's exact
energy), from the dense model:

- structured (FFN channels): the log of the relative perturbation that pruning the layer
  uniformly at the target would inject into the residual stream,
  E_l = log sum_{j in S_l} ||W_down[:, j]||^2 sum_t x_tj^2 / ||r_t||^2,
  with S_l the target share of channels of lowest Wanda-style score ||X_j|| sum_i |W_down,ij|,
  x_t the down projection's input and r_t the layer's input (the residual stream) at token t.
  Each token's share is relative to its own residual, so the few tokens with massive residual
  activations (SmolLM2 writes ~1e5-norm values into a handful of positions) do not set the
  scale; the log makes the layers comparable over the orders of magnitude they span. A layer
  whose removed channels would move the stream more is pruned less.
- unstructured: the share of the layer's Wanda importance mass (|W_ij| ||X_j|| over every linear)
  that pruning it uniformly at the target would remove; evenly spread importance, high energy.

Energies are standardised over the layers before the softmax, so the temperature is in units of
their spread (T = 1: a layer one standard deviation above the mean gets e^-1 times the weight of
an average one).

The budget is kept exactly: the mean of the per-layer shares is the target (to float rounding;
the mean weighted by the layers' sizes, which differ in a model compacted before: their FFN
widths for structured runs, their prunable weights for unstructured ones) and, for structured
runs, the channel counts sum to round(target x channels) through largest-remainder rounding
within the bounds. The statistics for ``owl`` and ``energy``
come from one pass of the dense layers over the calibration windows before pruning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import PruneConfig
from .models import AttentionHeads, ModelAdapter
from .placement import on_device
from .plan import ColumnSquares
from .sparsity import SparsityPattern, pruned_count
from .structure import LayerStructure


@dataclass(frozen=True)
class LayerTarget:
    """What the driver asks of one layer: its pattern (unstructured share) or its units."""

    pattern: SparsityPattern
    structure: LayerStructure | None = None

    def to_dict(self) -> dict:
        out = {"sparsity": self.pattern.fraction if not self.pattern.is_nm else str(self.pattern)}
        if self.structure is not None:
            out = {"channels_removed": self.structure.channels, "heads_removed_per_group": self.structure.heads_per_group,
                   "key_value_heads_removed": self.structure.kv_groups}
        return out


# --------------------------------------------------------------------------------------------
# the rules (pure functions of per-layer numbers: what the tests check)


def owl_shares(outlier_ratios: list[float], target: float, lam: float, low: float, high: float,
               weights: list[int] | None = None) -> list[float]:
    """OWL: density linear in the outlier ratio over a range of 2 lambda, mean 1 - target; the
    shares then clipped to [low, high] and shifted by one offset so that the mean, weighted by
    ``weights`` where given (each layer's prunable weights), stays the target (the published rule
    has no bounds, and its shares can leave [0, 1] near the ends)."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = float(d.max() - d.min())
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    raw = 1 - (scaled - scaled.mean() + (1 - target))
    # raw lies within target -/+ 2 lambda, inside (-2, 3): offsets -/+ 3 take every share past the bounds
    return _clipped_with_mean(lambda b: raw + b, target, low, high, -3.0, 3.0, weights)


def energy_shares(energies: list[float], target: float, temperature: float, low: float, high: float,
                  weights: list[int] | None = None) -> list[float]:
    """s_l = clip(c * softmax(-z_l / T), low, high), z the standardised energies, with c chosen
    so that mean(s) = target (:func:`_clipped_with_mean`), the mean weighted by ``weights``
    where given (each layer's FFN channels: the channel budget of layers of different widths).
    Searched as t = log c over the log weights from log_softmax: at a small temperature the
    colder layers' softmax weights underflow
    (or the scale c needed exceeds any fixed cap), while their logs stay exact, so the mean and
    the bounds hold for any positive temperature."""
    e = torch.tensor(energies, dtype=torch.float64)
    layers = len(e)
    std = float(e.std()) if layers > 1 else 0.0
    z = (e - e.mean()) / std if std > 0 else torch.zeros_like(e)
    log_weights = torch.log_softmax(-z / temperature, dim=0)
    # At t = log(target) - max(log w) - 1 every unclipped share is below target / e, so every
    # clipped one is at most the target; at t = log(target) - min(log w) + 1 every one is at least it
    # (a target of 0 has bounds [0, 0]: every share is 0 without a search, the bracket unused)
    log_target = math.log(target) if target > 0 else 0.0
    top, bottom = float(log_weights.max()), float(log_weights.min())
    return _clipped_with_mean(lambda t: (log_weights + t).exp(), target, low, high,
                              log_target - top - 1, log_target - bottom + 1, weights)


def _clipped_with_mean(unclipped: Callable[[float], torch.Tensor], target: float, low: float, high: float,
                       lo_p: float, hi_p: float, weights: list[int] | None = None) -> list[float]:
    """clip(unclipped(p), low, high) with the parameter p found by bisection in [lo_p, hi_p]
    (the caller's bracket: the clipped mean is at most the target at lo_p and at least it at
    hi_p, and monotone in p) so that the mean, weighted by ``weights`` where given, is
    ``target``; the last rounding residue goes to the layers strictly inside the bounds,
    clipped again (none inside and the mean off: to those that jump from one bound to the other
    between the bracket's two ends, then neighbouring floats: a softmax at T = 1e-100 spreads the
    log weights over ~1e100, where one float step of p is far wider than the window
    log(high / low) in which a share lies inside the bounds). A mean that still misses the
    target, or is not a number, is a ValueError, so a layer's share never leaves the bounds and
    the budget is never silently missed."""
    count = unclipped(lo_p).numel()
    if target <= low or target >= high:  # bounds closed on the target: every layer gets it
        return [target] * count
    # equal weights are the plain mean, computed as such (the same shares, bit for bit)
    uniform = weights is None or len(set(weights)) == 1
    w = torch.ones(count, dtype=torch.float64) if uniform else torch.tensor(weights, dtype=torch.float64)

    def shares(p):
        return unclipped(p).clamp(low, high)

    budget = float(w.sum()) * target
    for _ in range(200):
        mid = (lo_p + hi_p) / 2
        lo_p, hi_p = (mid, hi_p) if float((shares(mid) * w).sum()) < budget else (lo_p, mid)
    s = shares(hi_p)
    free = (s > low) & (s < high)
    if not free.any() and abs(float((s * w).sum()) - budget) > 1e-9 * float(w.sum()):
        free = s != shares(lo_p)
    if free.any():
        s[free] += (budget - float((s * w).sum())) / float(w[free].sum())
        s = s.clamp(low, high)
    mean = math.fsum((s * w).tolist()) / float(w.sum())
    if not abs(mean - target) <= 1e-9:  # NaN too (a temperature so small that -z / T overflows)
        raise ValueError(f"the per-layer shares within [{low}, {high}] miss the target {target} (mean {mean:.6g}); "
                         "widen the per-layer bounds or raise the temperature")
    return s.tolist()


def integer_counts(shares: list[float], sizes: list[int], low: float, high: float,
                   total: int | None = None) -> list[int]:
    """Counts c_l of units removed, c_l / size_l close to share_l, sum = ``total`` (default
    round(sum share_l size_l)) exactly, each within [ceil(low size_l), floor(high size_l)]: floors
    first, then the largest remainders. The driver gives total = round(target x channels): the
    shares' sum is that product only to float rounding, which at a half (0.5 x 99 = 49.5, the
    shares' 49.499999999999986) rounds the other way. Where the bounds force more than the total
    (each layer's ceil(low size_l) above its share), counts come off the layers most over their
    share, one at a time, until the sum is the total or every count is at its bound. A width so
    small that no integer lies in [low size_l, high size_l] gets floor(high size_l)."""
    wanted = [s * n for s, n in zip(shares, sizes)]
    total = round(sum(wanted)) if total is None else total
    lo = [math.ceil(low * n - 1e-9) for n in sizes]
    hi = [math.floor(high * n + 1e-9) for n in sizes]
    counts = [min(max(math.floor(w), a), b) for w, a, b in zip(wanted, lo, hi)]
    order = sorted(range(len(sizes)), key=lambda i: counts[i] - wanted[i])  # most under first
    while sum(counts) < total:
        i = next((i for i in order if counts[i] < hi[i]), None)
        if i is None:
            break
        counts[i] += 1
        order.remove(i)
        order.append(i)
    while sum(counts) > total:
        i = next((i for i in reversed(order) if counts[i] > lo[i]), None)  # most over first
        if i is None:
            break
        counts[i] -= 1
        order.remove(i)
        order.insert(0, i)
    return counts


def uniform_counts(share: float, sizes: list[int]) -> list[int]:
    """The uniform rule's counts: floor(share x size) in every layer (at most size - 1), so layers
    of one width lose the same count and the compacted model keeps one size in every layer (a
    plain transformers checkpoint; spreading round(share x all channels) by largest remainders
    would give some layers one more). The floor, not the nearest count: it is the rule every
    published structured measurement used (0.3 of 1536 channels: 460 per layer)."""
    return [min(pruned_count(n, share), n - 1) for n in sizes]


def lowest_mass_share(scores: torch.Tensor, share: float) -> float:
    """Share of sum(scores) held by the lowest ``share`` of the entries."""
    flat = scores.reshape(-1).double()
    k = pruned_count(flat.numel(), share)
    total = float(flat.sum())
    return float(torch.sort(flat).values[:k].sum()) / total if total > 0 else 0.0


def residual_perturbation_energy(channel_scores: torch.Tensor, relative_squares: torch.Tensor, share: float) -> float:
    """Structured energy: log of the sum of ``relative_squares`` (per channel, the squared
    relative perturbation of the residual stream its removal causes) over the ``share`` of
    channels with the lowest ``channel_scores`` (those uniform pruning would remove: as many as
    :func:`uniform_counts` gives, not int(share x width), which is one short where the product
    rounds below an integer, e.g. 0.29 x 100)."""
    lowest = torch.argsort(channel_scores)[:uniform_counts(share, [channel_scores.numel()])[0]]
    total = float(relative_squares.double()[lowest].sum())
    return math.log(max(total, 1e-300))  # removed channels that never fire: the lowest energy, not -inf


# --------------------------------------------------------------------------------------------
# statistics of the dense layers


class RelativeChannelSquares:
    """sum_t x_tj^2 / ||r_t||^2 per channel j of an FFN's down projection input x, with r_t the
    residual stream at the layer's input for the same token (float64: d numbers). The layer's
    pre-hook records the residual norms of the batch that the down projection then sees."""

    def __init__(self, width: int, device: torch.device):
        self.sums = torch.zeros(width, dtype=torch.float64, device=device)
        self.inverse_residual_squares: torch.Tensor | None = None

    def see_residual(self, residual: torch.Tensor) -> None:
        self.inverse_residual_squares = residual.double().square().sum(-1).reshape(-1).reciprocal()

    def add(self, x: torch.Tensor) -> None:
        x = x.double().reshape(-1, self.sums.numel())
        self.sums += self.inverse_residual_squares @ x.square()


def _dense_statistics(config: PruneConfig, adapter: ModelAdapter, layers: nn.ModuleList, indices: range,
                      run_layer: Callable, device: torch.device,
                      statistic: Callable[[torch.Tensor, torch.Tensor | None], float]) -> dict[int, float]:
    """Per layer in ``indices``: ``statistic(scores, relative)`` of its Wanda scores (structured:
    per FFN channel; else per weight of every linear, concatenated) and, structured, its
    channels' :class:`RelativeChannelSquares` (else None), from one pass of the dense layers;
    ``run_layer(layer, hooks)`` runs a layer over the current hidden states and replaces them by
    its outputs. Reduced as each layer is done: the unstructured scores are a float32 copy of
    the layer's weights, which kept for every layer would be the whole model again in host memory."""
    values: dict[int, float] = {}
    for index in tqdm(range(indices.stop), desc=f"allocation {config.allocation.rule}: dense statistics",
                      unit="layer", disable=config.quiet):
        layer = layers[index]
        with on_device(layer, device, changed=False):  # a dense pass: the host weights stay as they are
            stats: dict[int, ColumnSquares] = {}
            if index in indices:
                ffn = adapter.ffn(layer)
                linears = [ffn.down] if config.structure else list(adapter.linears(layer).values())

                def observer(linear):
                    def hook(module, args):
                        x = args[0].detach()
                        stat = stats.setdefault(id(module), ColumnSquares(x.shape[-1], x.device))
                        stat.add(x)
                    return linear.register_forward_pre_hook(hook)

                hooks = [observer(lin) for lin in linears]
                if config.structure:
                    squares = RelativeChannelSquares(ffn.down.in_features, device)
                    hooks += [layer.register_forward_pre_hook(lambda module, args: squares.see_residual(args[0].detach())),
                              ffn.down.register_forward_pre_hook(lambda module, args: squares.add(args[0].detach()))]
                run_layer(layer, hooks)
                norms = {id(lin): stats[id(lin)].result() for lin in linears}
                relative = None
                if config.structure:
                    scores = (ffn.down.weight.detach().float().abs().sum(0) * norms[id(ffn.down)]).cpu()
                    relative = (squares.sums * ffn.down.weight.detach().double().square().sum(0)).cpu()
                else:
                    scores = torch.cat([(lin.weight.detach().float().abs() * norms[id(lin)]).reshape(-1).cpu()
                                        for lin in linears])
                values[index] = statistic(scores, relative)
                del scores, relative  # before the next layer's are made
            else:
                run_layer(layer, [])
    return values


def layer_targets(config: PruneConfig, model: nn.Module, adapter: ModelAdapter, indices: range,
                  run_layer: Callable | None = None, device: torch.device | None = None) -> dict[int, LayerTarget]:
    """The target of each layer in ``indices`` (see the module docs). ``run_layer`` and
    ``device`` are needed for ``owl`` and ``energy`` only."""
    layers = adapter.layers(model)
    target = config.sparsity.fraction
    rule = config.allocation.rule
    low, high = config.allocation.bounds(target) if rule != "uniform" else (target, target)
    if rule == "uniform" or (config.structure is not None and "channels" not in config.structure):
        shares = [target] * len(indices)
    else:
        def statistic(scores, relative):
            if rule == "owl":  # the share of outlier scores
                # counted as an integer: the mean of a float64 copy of the comparison gave the same
                # number (an exact sum over n) but took 8 bytes per weight of the layer on the host
                outliers = int((scores > config.allocation.owl_m * scores.mean()).sum())
                return outliers / scores.numel()
            if config.structure:
                return residual_perturbation_energy(scores, relative, target)
            return lowest_mass_share(scores, target)

        values = _dense_statistics(config, adapter, layers, indices, run_layer, device, statistic)
        # the budget is channels (structured) or weights: a larger layer's share counts for more
        # of it (layers of different sizes: a model compacted before; equal sizes, the plain mean)
        weights = [adapter.ffn(layers[i]).down.in_features if config.structure
                   else sum(lin.weight.numel() for lin in adapter.linears(layers[i]).values()) for i in indices]
        if rule == "owl":
            shares = owl_shares([values[i] for i in indices], target, config.allocation.owl_lambda, low, high,
                                weights)
        else:
            shares = energy_shares([values[i] for i in indices], target, config.allocation.temperature, low, high,
                                   weights)
    if config.structure is None:
        return {i: LayerTarget(SparsityPattern(s) if rule != "uniform" else config.sparsity)
                for i, s in zip(indices, shares)}

    widths = [adapter.ffn(layers[i]).down.in_features for i in indices]
    channels = [0] * len(indices)
    if "channels" in config.structure:
        check_channel_removal(target, widths, rule)
        channels = (uniform_counts(target, widths) if rule == "uniform"
                    else integer_counts(shares, widths, low, high, round(target * sum(widths))))
    heads = [(0, 0)] * len(indices)
    if "heads" in config.structure:
        heads = [head_removal(config.head_sparsity, adapter.attention(layers[i])) for i in indices]
    return {i: LayerTarget(SparsityPattern(target), LayerStructure(c, *h))
            for i, c, h in zip(indices, channels, heads)}


def check_channel_removal(share: float, widths: list[int], rule: str) -> None:
    """A ValueError where ``share`` of the FFN channels of layers this ``widths`` removes no
    channel at all under allocation ``rule`` (uniform: :func:`uniform_counts`; the others
    round(share x channels) in total): as for heads (:func:`head_removal`), a run asked to
    remove channels never silently keeps them all."""
    removed = sum(uniform_counts(share, widths)) if rule == "uniform" else round(share * sum(widths))
    if removed == 0:
        width = max(widths)
        raise ValueError(f"sparsity (--sparsity, the share of FFN channels removed) {share} removes no channel from "
                         f"layers of {sorted(set(widths))} channels (allocation {rule}); the smallest share that "
                         f"removes one channel from every layer is 1/{width} = {1 / width:.3g}")


def head_removal(share: float, attention: AttentionHeads) -> tuple[int, int]:
    """The heads a layer loses for ``--head-sparsity share``, allocated uniformly (every layer
    alike): ``(query heads per key/value group, whole key/value groups)`` (see
    :mod:`sparsellm.structure`). Grouped-query attention loses the same number of query heads
    from every group, the nearest to the share that keeps one per group; multi-head attention
    (one query head per group) loses whole groups, the nearest number that keeps one. A share
    that rounds to nothing is a ValueError: a run asked to remove heads never silently keeps
    them all."""
    per_group, groups = attention.heads_per_group, attention.num_kv_heads
    units, what = (groups, "heads") if per_group == 1 else (per_group, "query heads per key/value group")
    if units == 1:
        raise ValueError(f"head_sparsity (--head-sparsity) {share}: a layer with a single attention head has none to remove")
    removed = min(round(share * units), units - 1)
    if removed == 0:
        raise ValueError(f"head_sparsity (--head-sparsity) {share} removes no attention heads: this model has {units} {what} and keeps "
                         f"at least one (round({share} x {units}) = 0); a share above 1/{2 * units} = "
                         f"{1 / (2 * units):.3g} removes one (1/{units} = {1 / units:.3g}: one for certain)")
    return (0, removed) if per_group == 1 else (removed, 0)
