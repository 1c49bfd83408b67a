"""Adapters and the layer-by-layer driver on tiny random OPT and LLaMA models (offline)."""
import gc
import weakref

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sparsellm.config import PruneConfig
from sparsellm.driver import LayerDriver, capture_layer_inputs
from sparsellm.methods import get_method
from sparsellm.models import FFN, UnsupportedModel, get_adapter
from sparsellm.sparsity import satisfies_nm, zero_fraction

from helpers import VOCAB, tiny_llama, tiny_opt

BUILDERS = {"llama": tiny_llama, "opt": tiny_opt}


def windows(n=4, seqlen=32, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def run(model, **settings):
    config = PruneConfig(nsamples=4, seqlen=32, quiet=True, device="cpu", **settings)
    return LayerDriver(model, get_adapter(model), get_method(config), config).run(windows())


def test_unknown_model_type_names_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(UnsupportedModel, match="llama.*opt|opt.*llama"):
        get_adapter(model)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_captured_inputs_reproduce_the_model(family):
    """Layer inputs captured once, then the layers called by the adapter, give the same hidden
    states as the model's own forward: positions, masks and rotary embeddings are passed."""
    model = BUILDERS[family]()
    adapter = get_adapter(model)
    ids = windows(2)
    hidden, kwargs = capture_layer_inputs(model, adapter, ids, torch.device("cpu"))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        for index, layer in enumerate(adapter.layers(model)):
            torch.testing.assert_close(hidden, expected[index], rtol=1e-5, atol=1e-5)
            hidden = torch.cat([adapter.call_layer(layer, hidden[i:i + 1], kwargs) for i in range(2)])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_ffn_description_matches_module(family):
    model = BUILDERS[family]()
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    ffn = adapter.ffn(layer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        if family == "llama":
            expected = layer.mlp(x)
        else:
            expected = layer.fc2(layer.activation_fn(layer.fc1(x)))
        torch.testing.assert_close(ffn.forward(x), expected)
        torch.testing.assert_close(ffn.forward(x, ffn.dense_copy()), expected)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_zero_sparsity_is_refused_before_anything_changes(family):
    """Sparsity 0 would be no no-op (OBS zeroes the weights of inputs that never fire, as the
    reference SparseGPT does, e.g. OPT's fc2 columns of channels ReLU never opens): refused."""
    model = BUILDERS[family]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sparsity 0 prunes nothing"):
        run(model, method="sparsegpt", sparsity="0.0")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_prunes_every_linear(family, method, sparsity):
    model = BUILDERS[family]()
    records = run(model, method=method, sparsity=sparsity)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        for part in ("attention", "ffn"):
            for group in adapter.groups(layer, part):
                for linear in group.values():
                    assert zero_fraction(linear.weight) == pytest.approx(0.5)
                    if sparsity == "2:4":
                        assert satisfies_nm(linear.weight, 2, 4)
    for record in records:
        assert len(record.matrices) == (7 if family == "llama" else 6)
        assert 0 < record.output_rel_error < 1 and 0 < record.ffn_rel_error < 1.5


def test_layer_range_prunes_only_those_layers():
    model = tiny_llama(layers=3)
    records = run(model, method="wanda", sparsity="0.5", layers=(1, 2))
    assert [r.index for r in records] == [1]
    layers = get_adapter(model).layers(model)
    assert zero_fraction(layers[0].mlp.up_proj.weight) == 0
    assert zero_fraction(layers[1].mlp.up_proj.weight) == pytest.approx(0.5)
    assert zero_fraction(layers[2].mlp.up_proj.weight) == 0


def test_layer_range_to_the_last_layer():
    """``layers=(start, None)`` (the settings' "to the last layer") prunes layers start.. on."""
    model = tiny_llama(layers=3)
    records = run(model, method="magnitude", sparsity="0.5", layers=(1, None))
    assert [r.index for r in records] == [1, 2]
    layers = get_adapter(model).layers(model)
    assert [zero_fraction(layer.mlp.up_proj.weight) for layer in layers] == [0, 0.5, 0.5]


def test_a_prune_stopped_midway_says_how_far_it_got(caplog):
    """The model is pruned in place: a prune that stops (an error, an interrupt) says which layers
    it left pruned, and leaves no hook behind."""
    model = tiny_llama(layers=3)
    config = PruneConfig(method="wanda", sparsity=0.5, layers=(0, 3), nsamples=4, seqlen=32, quiet=True, device="cpu")
    method = get_method(config)
    down = get_adapter(model).layers(model)[1].mlp.down_proj
    prune_group = method.prune_group

    def failing(group, observed, pattern):
        if down in group.values():
            raise KeyboardInterrupt
        prune_group(group, observed, pattern)

    method.prune_group = failing
    with caplog.at_level("WARNING", logger="sparsellm.driver"), pytest.raises(KeyboardInterrupt):
        LayerDriver(model, get_adapter(model), method, config).run(windows())
    assert "stopped in layer 1: the model is left partly pruned (layer 0 pruned, layer 1 possibly in part" \
        in caplog.text
    layers = get_adapter(model).layers(model)
    assert [zero_fraction(layer.mlp.up_proj.weight) for layer in layers] == [0.5, 0.5, 0]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_sequential_mode_sees_pruned_attention():
    """In sequential mode the FFN statistics come from the pruned attention's output, so the
    FFN is pruned differently than from the dense layer's statistics."""
    results = {}
    for sequential in (True, False):
        model = tiny_llama()
        run(model, method="sparsegpt", sparsity="0.7", sequential=sequential)
        results[sequential] = get_adapter(model).layers(model)[0].mlp.up_proj.weight.clone()
    assert not torch.equal(results[True], results[False])


def test_ffn_object_linears():
    model = tiny_llama()
    ffn = get_adapter(model).ffn(get_adapter(model).layers(model)[0])
    assert isinstance(ffn, FFN) and set(ffn.linears()) == {"up", "down", "gate"}


@pytest.mark.parametrize("method, passes", [("magnitude", 2), ("wanda", 5)])
def test_passes_per_layer(method, passes):
    """Magnitude does not read its inputs: one statistics pass and the final pass serve a layer
    (sequential passes could not change its result); Wanda runs one pass per group of linears
    sharing an input (q/k/v, o, gate/up, down) plus the final pass."""
    model = tiny_llama(layers=2)
    calls = []
    layer = get_adapter(model).layers(model)[1]
    layer.register_forward_pre_hook(lambda mod, args: calls.append(1))
    run(model, method=method, sparsity="0.5")
    assert len(calls) == passes  # 4 windows of 32 tokens go through in one call per pass


@pytest.mark.parametrize("method, runs", [
    # passes: 1 dense (q/k/v observed, the reference outputs), 2 observes o, 3 gate/up, 4 down, 5 final
    ("sparsegpt", {"q_proj": 5, "k_proj": 5, "v_proj": 5, "o_proj": 4, "gate_proj": 3, "up_proj": 3, "down_proj": 2}),
    # 1 dense, 2 observes o, 3 the FFN's input (at up, which runs after gate), 4 final
    ("sparsellm", {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 3, "gate_proj": 3, "up_proj": 2, "down_proj": 2}),
])
def test_observing_passes_stop_at_the_last_observed_module(method, runs):
    """A pass that only gathers statistics ends where its last observed module receives its input:
    what runs after it in the layer is not needed (the weights it gives are the full passes')."""
    model = tiny_llama(layers=1)
    layer = get_adapter(model).layers(model)[0]
    counts = dict.fromkeys(runs, 0)
    for name, module in layer.named_modules():
        role = name.rpartition(".")[2]
        if role in counts:
            module.register_forward_hook(lambda mod, args, out, role=role: counts.__setitem__(role, counts[role] + 1))
    run(model, method=method, sparsity="0.5")
    assert counts == runs


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("sequential", [True, False])
def test_reported_errors_are_the_pruned_models(family, sequential):
    """Each linear's reported error is ||(W - W_p) x|| / ||W x|| on the inputs it sees in the
    pruned model, and the layer's error is that of its output against the dense layer on the
    same inputs: both recomputed here from the pruned model's own forward and the dense weights.
    Two layers, so that the second is measured on the first's pruned outputs (a driver that did
    not pass them on pruned and measured it on the first layer's inputs), and OPT with non-zero
    biases (the bias is no part of W x)."""
    build = (lambda: tiny_llama(layers=2)) if family == "llama" else (lambda: tiny_opt(layers=2, bias_std=0.5))
    model, dense_model = build(), build()  # the same seed: the same dense weights
    layers = get_adapter(model).layers(model)
    dense_layers = get_adapter(dense_model).layers(dense_model)
    records = run(model, method="wanda", sparsity="0.6", sequential=sequential)
    assert len(records) == 2
    inputs, outputs, hooks = {}, {}, []
    for index, (layer, dense_layer) in enumerate(zip(layers, dense_layers)):
        for name in records[index].matrices:
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(
                lambda mod, args, key=(index, name): inputs.setdefault(key, []).append(args[0])))

        def both(module, args, kwargs, out, index=index, dense_layer=dense_layer):
            dense_out = dense_layer(*args, **kwargs)  # the dense layer on the pruned model's inputs
            outputs[index] = tuple(o[0] if isinstance(o, tuple) else o for o in (out, dense_out))
        hooks.append(layer.register_forward_hook(both, with_kwargs=True))
    with torch.no_grad():
        model(windows(), use_cache=False)  # no cache: the dense layer's call must not extend the pruned one's
    for h in hooks:
        h.remove()
    for index, record in enumerate(records):
        for name in record.matrices:
            x = torch.cat(inputs[index, name]).double()
            w_dense = dense_layers[index].get_submodule(name).weight.detach().double()
            w_pruned = layers[index].get_submodule(name).weight.detach().double()
            expected = float((x @ (w_dense - w_pruned).T).norm() / (x @ w_dense.T).norm())
            assert record.matrices[name]["rel_error"] == pytest.approx(expected, rel=1e-4), (index, name)
        pruned_out, dense_out = (o.double() for o in outputs[index])
        expected = float((pruned_out - dense_out).norm() / dense_out.norm())
        assert record.output_rel_error == pytest.approx(expected, rel=1e-4), index


def test_reported_ffn_error_uses_the_dense_biases():
    """Structured channel pruning zeroes fc1's bias entries of the removed channels: the reported
    FFN error is still against the dense FFN (dense weights and biases), recomputed here from
    the pruned model's FFN inputs."""
    model, dense_model = tiny_opt(layers=1), tiny_opt(layers=1)
    for m in (model, dense_model):  # the same random biases in both (a fresh model's are zero)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias") and "layer_norm" not in name:
                    p.normal_(0, 0.05)
    records = run(model, method="sparsegpt", sparsity=0.25, structure="channels")
    layer, dense_layer = model.model.decoder.layers[0], dense_model.model.decoder.layers[0]
    assert (layer.fc1.bias == 0).sum() > (dense_layer.fc1.bias == 0).sum()  # biases of removed channels zeroed
    inputs = []
    hook = layer.fc1.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        model(windows())
        hook.remove()
        x = torch.cat(inputs)
        dense, pruned = (l.fc2(torch.relu(l.fc1(x))).double() for l in (dense_layer, layer))
    assert records[0].ffn_rel_error == pytest.approx(float((dense - pruned).norm() / dense.norm()), rel=1e-4)


def test_magnitude_same_weights_either_mode():
    weights = {}
    for sequential in (True, False):
        model = tiny_llama()
        run(model, method="magnitude", sparsity="0.6", sequential=sequential)
        weights[sequential] = [p.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))


def test_two_drivers_advanced_in_turn_equal_separate_runs():
    """prune_layers yields one record per pruned layer, as soon as it is done; two drivers of two
    model copies advanced in turn (benchmarks/interleaved_ratio.py) end with the weights and
    records of separate runs: nothing is shared between them."""
    def setup(method):
        model = tiny_llama(layers=3)
        config = PruneConfig(method=method, sparsity=0.5, layers=(1, 3), nsamples=4, seqlen=32, quiet=True,
                             device="cpu")
        return model, LayerDriver(model, get_adapter(model), get_method(config), config)

    separate = {}
    for method in ("sparsellm", "sparsegpt"):
        model, driver = setup(method)
        separate[method] = (driver.run(windows()), model.state_dict())
    (model_a, driver_a), (model_b, driver_b) = setup("sparsellm"), setup("sparsegpt")
    layers_a, layers_b = driver_a.prune_layers(windows()), driver_b.prune_layers(windows())
    first = next(layers_a)
    assert first.index == 1 and zero_fraction(get_adapter(model_a).layers(model_a)[1].mlp.up_proj.weight) > 0.4
    assert zero_fraction(get_adapter(model_a).layers(model_a)[2].mlp.up_proj.weight) == 0  # not yet pruned
    records_b = [next(layers_b), next(layers_b)]
    records_a = [first, next(layers_a)]
    assert next(layers_a, None) is None and next(layers_b, None) is None
    for (expected, state), records, model in ((separate["sparsellm"], records_a, model_a),
                                              (separate["sparsegpt"], records_b, model_b)):
        assert [r.index for r in records] == [r.index for r in expected] == [1, 2]
        assert [r.ffn_rel_error for r in records] == [r.ffn_rel_error for r in expected]
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_float64_model_is_pruned_in_float64(method):
    """A float64 model's statistics and solves are float64 (sparsellm.precision.solve_dtype): layer
    0's q_proj, pruned from the dense layer's statistics, equals the reference solve in float64 on
    its captured inputs to float64 rounding. In float32 it differs by about 1e-7 relative, and
    at these sizes some near-tied scores flip."""
    from sparsellm import reference

    model = tiny_llama(layers=1).double()
    adapter = get_adapter(model)
    hidden, kwargs = capture_layer_inputs(model, adapter, windows(), torch.device("cpu"))
    q_proj = adapter.layers(model)[0].self_attn.q_proj
    dense = q_proj.weight.detach().clone()
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        adapter.call_layer(adapter.layers(model)[0], hidden, kwargs)
    handle.remove()
    x = torch.cat(seen)
    assert x.dtype == torch.float64 and x.abs().max() > 0

    run(model, method=method, sparsity="0.7", sequential=False)
    pruned = q_proj.weight.detach()
    if method == "sparsegpt":
        hinv, _ = reference.cholesky_inverse_upper(x.T @ x / x.shape[0], 0.01)
        expected, _ = reference.obs_prune(dense, hinv, 0.7, None, None, 128)
    else:
        expected = dense.masked_fill(reference.wanda_prune_mask(dense, x.norm(dim=0), 0.7), 0)
    assert pruned.dtype == torch.float64 and torch.isfinite(pruned).all()
    assert torch.equal(pruned == 0, expected == 0)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sequential", [True, False])
def test_statistics_are_freed_before_the_final_pass(sequential):
    """What a step observed (for SparseLLM every FFN input token, [N, d]) is released once its
    solve has run: none of it is still held while the final pass runs the pruned layer."""
    model = tiny_llama(layers=1)
    config = PruneConfig(method="sparsellm", sparsity=0.5, nsamples=4, seqlen=32, quiet=True, device="cpu",
                         sequential=sequential)
    method = get_method(config)
    observed = []
    prune_ffn, prune_group = method.prune_ffn, method.prune_group
    method.prune_ffn = lambda ffn, x, pattern: (observed.append(weakref.ref(x)), prune_ffn(ffn, x, pattern))[1]
    method.prune_group = lambda group, gram, pattern: (observed.append(weakref.ref(gram)),
                                                       prune_group(group, gram, pattern))[1]
    driver = LayerDriver(model, get_adapter(model), method, config)
    final_pass = driver._final_pass
    alive = []

    def checked_final_pass(*args, **kwargs):
        gc.collect()
        alive.extend(ref() is not None for ref in observed)
        return final_pass(*args, **kwargs)

    driver._final_pass = checked_final_pass
    driver.run(windows())
    assert len(alive) == 3 and not any(alive)  # q/k/v's and o's Grams, the FFN's tokens


@pytest.mark.parametrize("settings, shown", [
    ({}, "0.5"), ({"sparsity": "2:4"}, "2:4"), ({"structure": "heads", "head_sparsity": 0.25}, "heads 0.25"),
    ({"structure": "channels+heads", "sparsity": 0.3, "head_sparsity": 0.5}, "channels 0.3, heads 0.5"),
    ({"method": "structprune", "sparsity": 0.3}, "channels 0.3")])
def test_the_progress_bar_names_what_the_run_asks(settings, shown):
    """A structured run's sparsity is its channel share (none for heads alone): the bar says so."""
    driver = LayerDriver.__new__(LayerDriver)
    driver.config = PruneConfig(**settings)
    assert driver._asked() == shown


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_model_in_training_mode_is_pruned_without_dropout(family):
    """A model built from its config (or being fine-tuned) is in training mode: OPT's dropout (0.1)
    was applied to the captured inputs and in every layer pass, so the masks depended on the
    dropout draws. The prune equals that of the same model in eval mode, and each module's
    mode is as it was."""
    pruned = {}
    for training in (False, True):
        model = BUILDERS[family](layers=2).double()
        with torch.no_grad():  # dropout everywhere it can be, so a pass that keeps it shows
            for name in ("dropout", "attention_dropout", "activation_dropout"):
                if hasattr(model.config, name):
                    setattr(model.config, name, 0.3)
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.3
                if hasattr(module, "attention_dropout"):
                    module.attention_dropout = 0.3
                if hasattr(module, "dropout") and isinstance(module.dropout, float):
                    module.dropout = 0.3
        model.train(training)
        records = run(model, method="sparsegpt", sparsity="0.5")
        assert all(m.training == training for m in model.modules())
        pruned[training] = ([p.detach().clone() for p in model.parameters()], [r.output_rel_error for r in records])
    assert all(torch.equal(a, b) for a, b in zip(pruned[False][0], pruned[True][0]))
    assert pruned[False][1] == pruned[True][1]
