"""Layer-wise allocation: the rules keep the budget and the bounds; the driver applies them."""
import math

import pytest
import torch

from sparsellm.allocation import (RelativeChannelSquares, energy_shares, integer_counts, lowest_mass_share, owl_shares,
                                  residual_perturbation_energy, uniform_counts)
from sparsellm.config import AllocationSettings, PruneConfig
from sparsellm.driver import LayerDriver, capture_layer_inputs
from sparsellm.methods import get_method
from sparsellm.models import get_adapter
from sparsellm.sparsity import zero_fraction

from helpers import VOCAB, tiny_llama


def rand(n, seed):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_energy_shares_keep_the_budget_and_bounds(seed, temperature):
    energies = rand(30, seed)
    target, low, high = 0.5, 0.35, 0.65
    shares = energy_shares(energies, target, temperature, low, high)
    assert math.fsum(shares) / 30 == pytest.approx(target, abs=1e-12)
    assert all(low - 1e-12 <= s <= high + 1e-12 for s in shares)
    # higher energy, never more sparsity
    order = sorted(range(30), key=lambda i: energies[i])
    assert all(shares[a] >= shares[b] - 1e-12 for a, b in zip(order, order[1:]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [1e-4, 0.01, 0.05, 1e-20, 1e-100, 1e-300])
@pytest.mark.parametrize("target, low, high", [(0.3, 0.15, 0.45), (0.5, 0.0, 0.95)])
def test_energy_shares_keep_the_budget_and_bounds_when_cold(seed, temperature, target, low, high):
    """At a small temperature the colder layers' softmax weights underflow (exp(-dz / T) below
    1e-300): the mean is still the target, and no share leaves the bounds (the old rule gave
    means of 0.17 for 0.3, and one layer 4.35). Below T ~ 1e-16 one float step of the scale's
    log is wider than the window in which a share lies inside the bounds: the layer between the
    bounds takes the residue (the mean missed the target there, a ValueError)."""
    energies = torch.randn(30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    shares = energy_shares(energies, target, temperature, low, high)
    assert math.fsum(shares) / 30 == pytest.approx(target, abs=1e-12)
    assert all(low <= s <= high for s in shares)
    order = sorted(range(30), key=lambda i: energies[i])
    assert all(shares[a] >= shares[b] - 1e-12 for a, b in zip(order, order[1:]))


def test_energy_shares_at_the_coldest_temperatures():
    """T = 1e-300 gives the limit of the rule (the lowest energies at the upper bound, the highest
    at the lower, the one between them taking the rest); at T = 5e-324 -z / T overflows to inf
    and the softmax is NaN: a ValueError, not NaN shares that passed the mean's check."""
    energies = [0.3, 0.1, 0.9, 0.5, 0.2]
    assert energy_shares(energies, 0.3, 1e-300, 0.15, 0.45) == pytest.approx([0.3, 0.45, 0.15, 0.15, 0.45], abs=1e-12)
    with pytest.raises(ValueError, match="raise the temperature"):
        energy_shares(energies, 0.3, 5e-324, 0.15, 0.45)


def test_energy_temperature_controls_the_spread():
    energies = rand(12, 7)
    spread = {t: max(s) - min(s) for t in (0.5, 2.0, 500.0)
              for s in [energy_shares(energies, 0.4, t, 0.0, 0.95)]}
    assert spread[0.5] > spread[2.0] > spread[500.0] and spread[500.0] < 0.01


@pytest.mark.parametrize("seed", range(3))
def test_energy_shares_weighted_by_width_keep_the_channel_budget(seed):
    """Layers of different FFN widths (a model compacted before): the channel-weighted mean is
    the target, so the counts remove round(target x all channels), not the plain mean's total."""
    energies, widths = rand(6, seed), [192, 64, 96, 48, 128, 16]
    target, low, high = 0.3, 0.1, 0.6
    shares = energy_shares(energies, target, 1.0, low, high, widths)
    assert math.fsum(s * w for s, w in zip(shares, widths)) / sum(widths) == pytest.approx(target, abs=1e-12)
    assert all(low - 1e-12 <= s <= high + 1e-12 for s in shares)
    assert sum(integer_counts(shares, widths, low, high)) == round(target * sum(widths))
    order = sorted(range(6), key=lambda i: energies[i])
    assert all(shares[a] >= shares[b] - 1e-12 for a, b in zip(order, order[1:]))


def test_equal_energies_give_the_uniform_allocation():
    assert energy_shares([0.3] * 5, 0.6, 1.0, 0.4, 0.8) == pytest.approx([0.6] * 5, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_owl_shares_follow_the_published_rule(seed):
    ratios = rand(16, seed)
    shares = owl_shares(ratios, 0.7, 0.08, 0.0, 0.95)  # bounds wider than 0.7 -/+ 2 lambda: the rule unclipped
    assert math.fsum(shares) / 16 == pytest.approx(0.7, abs=1e-12)
    assert max(shares) - min(shares) == pytest.approx(0.16, abs=1e-12)  # 2 lambda
    order = sorted(range(16), key=lambda i: ratios[i])  # more outliers, less sparsity
    assert all(shares[a] > shares[b] for a, b in zip(order, order[1:]))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("target, low, high", [(0.9, 0.75, 0.95), (0.05, 0.0, 0.2), (0.5, 0.48, 0.52)])
def test_owl_shares_keep_the_budget_and_bounds(seed, target, low, high):
    """Where the published rule would leave the bounds (or [0, 1]), the shares are clipped and
    the mean stays the target; the order (more outliers, less sparsity) is kept."""
    ratios = rand(16, seed)
    shares = owl_shares(ratios, target, 0.2, low, high)
    assert math.fsum(shares) / 16 == pytest.approx(target, abs=1e-12)
    assert all(low - 1e-12 <= s <= high + 1e-12 for s in shares)
    assert min(shares) == pytest.approx(low, abs=1e-12) or max(shares) == pytest.approx(high, abs=1e-12)
    order = sorted(range(16), key=lambda i: ratios[i])
    assert all(shares[a] >= shares[b] - 1e-12 for a, b in zip(order, order[1:]))


@pytest.mark.parametrize("seed", range(5))
def test_integer_counts_sum_exactly_within_bounds(seed):
    shares = energy_shares(rand(30, seed), 0.3, 1.0, 0.15, 0.45)
    counts = integer_counts(shares, [1536] * 30, 0.15, 0.45)
    assert sum(counts) == round(0.3 * 1536 * 30)
    assert all(math.ceil(0.15 * 1536) <= c <= math.floor(0.45 * 1536) for c in counts)
    assert all(abs(c - s * 1536) < 1 + 1e-9 for c, s in zip(counts, shares))


@pytest.mark.parametrize("width, layers, share, count", [(128, 2, 0.3, 38), (1536, 30, 0.3, 460), (11008, 32, 0.33, 3632),
                                                         (1000, 2, 0.3, 300), (128, 3, 0.008, 1), (128, 4, 0.999, 127)])
def test_uniform_counts_floor_each_layer(width, layers, share, count):
    """uniform: floor(share x width) in every layer, the same count (one size after compaction),
    at most width - 1; a product a rounding error below an integer (0.3 x 1000) is that integer."""
    assert uniform_counts(share, [width] * layers) == [count] * layers


def test_lowest_mass_share():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert lowest_mass_share(scores, 0.5) == pytest.approx(0.3)


def test_residual_perturbation_energy_sums_the_lowest_scored_channels():
    g = torch.Generator().manual_seed(3)
    scores, squares = torch.rand(40, generator=g), torch.rand(40, generator=g, dtype=torch.float64)
    lowest = sorted(range(40), key=lambda j: float(scores[j]))[:12]  # 30% of 40 channels
    expected = math.log(math.fsum(float(squares[j]) for j in lowest))
    assert residual_perturbation_energy(scores, squares, 0.3) == pytest.approx(expected, rel=1e-12)


def test_residual_perturbation_energy_counts_the_channels_uniform_pruning_removes():
    """0.29 x 100 is 28.999999999999996 in floats: uniform pruning removes 29 channels, and the
    energy sums the same 29 (int() of the product took 28)."""
    g = torch.Generator().manual_seed(6)
    scores, squares = torch.rand(100, generator=g), torch.rand(100, generator=g, dtype=torch.float64) + 0.5
    assert uniform_counts(0.29, [100]) == [29]
    lowest = sorted(range(100), key=lambda j: float(scores[j]))[:29]
    expected = math.log(math.fsum(float(squares[j]) for j in lowest))
    assert residual_perturbation_energy(scores, squares, 0.29) == pytest.approx(expected, rel=1e-12)


def test_relative_channel_squares_normalise_each_token_by_its_own_residual():
    g = torch.Generator().manual_seed(4)
    stat = RelativeChannelSquares(6, torch.device("cpu"))
    expected = torch.zeros(6, dtype=torch.float64)
    for batch in range(3):
        residual, x = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g)
        residual[0, 0] *= 1e4  # a massive-activation token: its share shrinks, it does not set the scale
        stat.see_residual(residual)
        stat.add(x)
        for r, row in zip(residual.reshape(-1, 8).double(), x.reshape(-1, 6).double()):
            expected += row.square() / r.square().sum()
    torch.testing.assert_close(stat.sums, expected, rtol=1e-12, atol=0)


def test_structured_energy_comes_from_each_layers_residual_and_down_input(monkeypatch):
    """The driver's allocation equals the rule applied to statistics gathered here by hand
    from the dense layers (the layer's input and its down projection's input, same tokens):
    the energies themselves, not only the integer counts (which Wanda channel scores without
    the input norms still rounded to)."""
    model = tiny_llama(layers=3)
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = []
    for index, layer in enumerate(adapter.layers(model)):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=index: seen.setdefault(i, {}).update(residual=(args or [kwargs["hidden_states"]])[0]),
            with_kwargs=True))
        hooks.append(adapter.ffn(layer).down.register_forward_pre_hook(
            lambda m, args, i=index: seen[i].update(down_input=args[0])))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    energies = []
    for index, layer in enumerate(adapter.layers(model)):
        r = seen[index]["residual"].double().reshape(-1, 64)
        x = seen[index]["down_input"].double().reshape(-1, 128)
        down = adapter.ffn(layer).down.weight.detach().double()
        wanda = x.norm(dim=0) * down.abs().sum(0)
        relative = (x.square() / r.square().sum(1, keepdim=True)).sum(0) * down.square().sum(0)
        energies.append(residual_perturbation_energy(wanda.float(), relative, 0.3))
    expected = integer_counts(energy_shares(energies, 0.3, 1.0, 0.15, 0.45), [128] * 3, 0.15, 0.45)
    from sparsellm import allocation

    seen_energies, rule_fn = [], allocation.residual_perturbation_energy
    monkeypatch.setattr(allocation, "residual_perturbation_energy",
                        lambda *args: seen_energies.append(rule_fn(*args)) or seen_energies[-1])
    records = prune(model, method="wanda", sparsity=0.3, structure="channels", allocation="energy")
    assert seen_energies == pytest.approx(energies, rel=1e-6)
    assert [r.target["channels_removed"] for r in records] == expected
    assert len(set(expected)) > 1


@pytest.mark.parametrize("rule", ["owl", "energy"])
def test_unstructured_shares_come_from_each_layers_wanda_scores(rule):
    """The driver's owl / unstructured energy shares equal the rule applied to statistics
    gathered here by hand from the dense model: per layer, the Wanda scores |W_ij| ||X_j|| of
    every linear (X: that linear's input, in float64), then owl's share of scores above M times
    their mean, or energy's share of the score mass held by the lowest half. The rules' own
    tests cannot see the statistic: an outlier test turned round (scores below M x mean) or
    scores without the input norms (plain magnitudes) kept the budget and the bounds."""
    model = tiny_llama(layers=3)
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    squares, hooks = {}, []
    for layer in adapter.layers(model):
        for lin in adapter.linears(layer).values():
            hooks.append(lin.register_forward_pre_hook(
                lambda m, args: squares.__setitem__(id(m), args[0].double().reshape(-1, m.in_features).square().sum(0))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    settings = AllocationSettings(rule=rule, temperature=5.0)  # energy: every share inside the bounds
    low, high = settings.bounds(0.5)
    values = []
    for layer in adapter.layers(model):
        scores = torch.cat([(lin.weight.detach().double().abs() * squares[id(lin)].sqrt()).reshape(-1)
                            for lin in adapter.linears(layer).values()])
        if rule == "owl":
            values.append(float((scores > settings.owl_m * scores.mean()).double().mean()))
        else:
            ordered = scores.sort().values
            values.append(float(ordered[:scores.numel() // 2].sum() / ordered.sum()))
    expected = (owl_shares(values, 0.5, settings.owl_lambda, low, high) if rule == "owl"
                else energy_shares(values, 0.5, settings.temperature, low, high))
    shares = [r.target["sparsity"] for r in prune(model, method="wanda", sparsity=0.5, allocation=settings)]
    assert len(set(values)) == 3 and max(expected) - min(expected) > 0.01
    assert all(low < e < high for e in expected)  # none clipped: each share is its layer's statistic's
    assert shares == pytest.approx(expected, abs=1e-6)


def test_bad_allocation_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="temperature"):
        AllocationSettings(rule="energy", temperature=0)
    with pytest.raises(ValueError, match="do not contain the target"):
        PruneConfig(allocation=AllocationSettings(rule="energy", min_sparsity=0.6), sparsity=0.5)
    with pytest.raises(ValueError, match="N:M"):
        PruneConfig(allocation="owl", sparsity="2:4")
    # above 0.95 the default upper bound excludes the target: the message says which option lifts it
    with pytest.raises(ValueError, match=r"stops at 0\.95.*--layer-sparsity-max"):
        PruneConfig(allocation="energy", sparsity=0.97)
    assert PruneConfig(allocation=AllocationSettings(rule="energy", max_sparsity=0.99), sparsity=0.97)


def prune(model, **settings):
    config = PruneConfig(nsamples=4, seqlen=32, quiet=True, device="cpu", **settings)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    return LayerDriver(model, get_adapter(model), get_method(config), config).run(ids)


@pytest.mark.parametrize("rule", ["owl", "energy"])
def test_driver_applies_the_per_layer_sparsity(rule):
    """Each layer is pruned to its own share, recorded per layer; the mean is the target."""
    model = tiny_llama(layers=4)
    records = prune(model, method="wanda", sparsity=0.5,
                    allocation=AllocationSettings(rule=rule, temperature=0.5))
    shares = [r.target["sparsity"] for r in records]
    assert math.fsum(shares) / 4 == pytest.approx(0.5, abs=1e-9)
    assert max(shares) - min(shares) > 0.01  # the layers differ
    for layer, share in zip(get_adapter(model).layers(model), shares):
        assert zero_fraction(layer.mlp.up_proj.weight) == pytest.approx(share, abs=1 / 64)


@pytest.mark.parametrize("sparsity, bounds", [(0.5, dict(min_sparsity=0.48, max_sparsity=0.52)), (0.95, {})])
def test_driver_keeps_owl_within_the_per_layer_bounds(sparsity, bounds):
    """OWL's per-layer shares obey the bounds (0.95: the default's [0.8, 0.95], where the unclipped
    rule asked a layer for more than all of it)."""
    allocation = AllocationSettings(rule="owl", **bounds)
    low, high = allocation.bounds(sparsity)
    shares = [r.target["sparsity"] for r in prune(tiny_llama(layers=2), method="wanda", sparsity=sparsity,
                                                   allocation=allocation)]
    assert math.fsum(shares) / 2 == pytest.approx(sparsity, abs=1e-9)
    assert all(low - 1e-12 <= s <= high + 1e-12 for s in shares)


def test_structured_energy_allocation_keeps_the_channel_budget():
    model = tiny_llama(layers=4)
    records = prune(model, method="wanda", sparsity=0.3, structure="channels", allocation="energy")
    removed = [r.target["channels_removed"] for r in records]
    assert sum(removed) == round(0.3 * 128 * 4) and len(set(removed)) > 1


@pytest.mark.parametrize("allocation, total, removed", [("uniform", 88, [44, 44]), ("energy", 90, None)])
def test_driver_removes_the_channel_share_of_its_rule(allocation, total, removed):
    """Through the driver, 0.35 of 2 x 128 channels: uniform floor(44.8) = 44 in each layer;
    energy round(0.35 x 256) = 90 in all."""
    records = prune(tiny_llama(layers=2), method="wanda", sparsity=0.35, structure="channels", allocation=allocation)
    counts = [r.target["channels_removed"] for r in records]
    assert sum(counts) == total and (removed is None or counts == removed)


def test_a_channel_share_that_removes_nothing_is_refused():
    """0.003 of 2 x 128 channels rounds to none in each layer (uniform; 0.384): refused before
    anything is pruned (as for heads), naming the smallest share that removes one; sparsity 0
    with channels already by the settings."""
    model = tiny_llama(layers=2)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="removes no channel.*1/128"):
        prune(model, method="sparsegpt", sparsity=0.003, structure="channels")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())
    with pytest.raises(ValueError, match="sparsity 0 removes no FFN channel"):
        PruneConfig(method="structprune", sparsity=0)
    PruneConfig(method="sparsegpt", sparsity=0, structure="heads", head_sparsity=0.5)  # --sparsity unused: allowed


def test_energy_allocation_at_a_small_temperature_keeps_the_budget_through_the_driver():
    """The driver's energy allocation at T = 0.01 on 8 layers: the mean of the per-layer shares is
    the target and each within the bounds (the old rule: 0.225 for 0.3)."""
    allocation = AllocationSettings(rule="energy", temperature=0.01)
    model = tiny_llama(layers=8)
    config = PruneConfig(method="wanda", sparsity=0.3, nsamples=4, seqlen=32, quiet=True, device="cpu",
                         allocation=allocation)
    driver = LayerDriver(model, get_adapter(model), get_method(config), config)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_layer_inputs(model, driver.adapter, ids, torch.device("cpu"))
    shares = [t.pattern.fraction for t in driver.allocate(inputs, kwargs).values()]
    assert math.fsum(shares) / 8 == pytest.approx(0.3, abs=1e-9)
    assert all(0.15 - 1e-12 <= s <= 0.45 + 1e-12 for s in shares)


def test_integer_counts_come_down_to_the_total_when_lower_bounds_overshoot():
    """Small widths whose lower bound (ceil(low x size) = 1 each) lifts every count above its
    share: the counts come off the layers most over their share until the sum is the total
    (one pass took one count off each, and stopped at 30 of 29)."""
    shares, sizes = [0.046, 0.0191, 0.1424, 0.2188], [7, 5, 2, 128]
    counts = integer_counts(shares, sizes, 0.0026, 0.7877)
    assert sum(counts) == round(sum(s * n for s, n in zip(shares, sizes))) == 29
    assert all(1 <= c <= math.floor(0.7877 * n) for c, n in zip(counts, sizes))
    assert counts == [1, 1, 1, 26]


def test_channel_counts_sum_to_the_rounded_product_at_a_half(monkeypatch):
    """0.5 of 3 x 33 channels: round(49.5) = 50, as the docs and check_channel_removal say; the
    shares' weighted sum is 49.499999999999986 in floats (their mean is the target to rounding),
    whose round gave 49."""
    from sparsellm import allocation
    from sparsellm.structure import compact_model, zero_channels

    shares = energy_shares([0.1, 0.5, 0.9], 0.5, 1.0, 0.35, 0.65, [33] * 3)
    assert math.fsum(s * 33 for s in shares) < 49.5 and round(0.5 * 99) == 50
    assert sum(integer_counts(shares, [33] * 3, 0.35, 0.65, total=50)) == 50
    model = tiny_llama(layers=3)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        zero_channels(adapter.ffn(layer), torch.arange(95))
    compact_model(model, adapter)
    monkeypatch.setattr(allocation, "energy_shares", lambda *args, **kwargs: list(shares))
    records = prune(model, method="wanda", sparsity=0.5, structure="channels", allocation="energy")
    assert sum(r.target["channels_removed"] for r in records) == 50


def compacted_llama(removed_channels):
    """A 3-layer tiny LLaMA (FFN width 128) with the first ``removed_channels[l]`` channels of
    layer l cut out: layers of different sizes, as a model compacted before."""
    from sparsellm.structure import compact_model, zero_channels

    model = tiny_llama(layers=3)
    adapter = get_adapter(model)
    for layer, removed in zip(adapter.layers(model), removed_channels):
        if removed:
            zero_channels(adapter.ffn(layer), torch.arange(removed))
    compact_model(model, adapter)
    return model, adapter


def test_structured_energy_on_layers_of_different_widths_removes_the_asked_share():
    model, adapter = compacted_llama([0, 48, 96])
    widths = [adapter.ffn(layer).down.in_features for layer in adapter.layers(model)]
    assert widths == [128, 80, 32]
    records = prune(model, method="wanda", sparsity=0.25, structure="channels", allocation="energy")
    assert sum(r.target["channels_removed"] for r in records) == round(0.25 * sum(widths))


@pytest.mark.parametrize("rule", ["owl", "energy"])
def test_unstructured_allocation_on_layers_of_different_sizes_keeps_the_weight_budget(rule):
    """An unstructured owl/energy run on a model compacted before (FFN widths 128, 80, 16): the
    mean of the shares weighted by each layer's prunable weights is the target, so the zeros
    over all pruned weights are the target's share (the plain mean gave 0.468 (owl) and 0.535
    (energy) for 0.5)."""
    model, _ = compacted_llama([0, 48, 112])
    records = prune(model, method="wanda", sparsity=0.5, allocation=AllocationSettings(rule=rule, temperature=0.3))
    sizes = [sum(m["numel"] for m in r.matrices.values()) for r in records]
    shares = [r.target["sparsity"] for r in records]
    assert len(set(sizes)) == 3 and max(shares) - min(shares) > 0.05
    assert math.fsum(s * n for s, n in zip(shares, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-9)
    zeros = sum(round(m["sparsity"] * m["numel"]) for r in records for m in r.matrices.values())
    assert zeros / sum(sizes) == pytest.approx(0.5, abs=0.01)


def _wanda_allocation(layers: int, rule: str):
    """A Wanda run's driver on a tiny LLaMA under allocation ``rule``, and its first layer's
    captured inputs: what driver.allocate takes."""
    model = tiny_llama(layers=layers)
    config = PruneConfig(method="wanda", sparsity=0.5, nsamples=4, seqlen=32, quiet=True, device="cpu",
                         allocation=AllocationSettings(rule=rule))
    driver = LayerDriver(model, get_adapter(model), get_method(config), config)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    inputs, kwargs = capture_layer_inputs(model, driver.adapter, ids, torch.device("cpu"))
    return driver, inputs, kwargs


def test_unstructured_allocation_holds_one_layers_scores_at_a_time(monkeypatch):
    """The unstructured scores are a float32 copy of a layer's weights: the dense pass reduces
    each layer's to its number (here the energy's, owl's the same way) before the next layer's
    are made (kept for every layer they were the whole model again in host memory, 26 GB at
    7B). The shares are the same."""
    import weakref

    from sparsellm import allocation

    seen, alive = [], []
    rule_fn = allocation.lowest_mass_share

    def watched(scores, share):
        alive.append(sum(ref() is not None for ref in seen))  # earlier layers' scores still held
        seen.append(weakref.ref(scores))
        return rule_fn(scores, share)

    driver, inputs, kwargs = _wanda_allocation(4, "energy")
    expected = driver.allocate(inputs, kwargs)
    monkeypatch.setattr(allocation, "lowest_mass_share", watched)
    assert driver.allocate(inputs, kwargs) == expected
    assert alive == [0, 0, 0, 0]


def test_owl_counts_a_layers_outliers_without_a_float64_copy_of_its_scores(monkeypatch):
    """OWL's outlier share is a count over the layer's scores (a float32 value per weight of the
    layer): counted as an integer, not as the mean of a float64 copy of the comparison, which
    took 8 bytes per weight of host memory on top of the scores' 4 (7 GB for a 70B layer). The
    shares are the same, bit for bit."""
    driver, inputs, kwargs = _wanda_allocation(3, "owl")
    expected = driver.allocate(inputs, kwargs)
    weights = sum(lin.weight.numel() for lin in driver.adapter.linears(driver.adapter.layers(driver.model)[0]).values())
    largest = []
    double = torch.Tensor.double

    def watched(self, *args, **kwargs):
        largest.append(self.numel())
        return double(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "double", watched)
    assert driver.allocate(inputs, kwargs) == expected
    assert max(largest, default=0) < weights


def test_a_non_uniform_allocation_with_heads_alone_is_refused():
    """Heads are allocated uniformly and --structure heads removes no channel: energy there would
    run uniform while the report says energy. Refused by the settings; with channels it is used."""
    with pytest.raises(ValueError, match="allocation energy spreads the FFN channel share.*--structure heads"):
        PruneConfig(method="sparsegpt", sparsity=0, structure="heads", head_sparsity=0.5, allocation="energy")
    PruneConfig(method="sparsegpt", sparsity=0.25, structure="channels+heads", head_sparsity=0.5, allocation="energy")
