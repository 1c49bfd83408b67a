"""sparsellm.placement.on_device: a module worked on on the compute device goes home into the
host tensors it came with. On the CPU a move to another device is simulated: ``Module.to`` is
patched to give every parameter new ``.data`` and every buffer a new tensor, as a real move
does; the gpu-marked test moves to CUDA."""
import time

import pytest
import torch
from torch import nn

from sparsellm.config import PruneConfig
from sparsellm.driver import LayerDriver
from sparsellm.methods import get_method
from sparsellm.models import get_adapter
from sparsellm.placement import on_device
from sparsellm.sparsity import zero_fraction

from helpers import VOCAB, tiny_llama


def fake_move(self, *args, **kwargs):
    """What ``.to(other_device)`` does to a module's tensors, without another device: fresh
    storage for each (a parameter keeps its object, a buffer is replaced)."""
    return self._apply(lambda t: t.clone())


def prune_tiny(model, config):
    """Run the driver over four calibration windows of 32 tokens; its layer records."""
    windows = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    return LayerDriver(model, get_adapter(model), get_method(config), config).run(windows)


def small_module(seed=0):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    module.register_buffer("scale", torch.rand(5) + 0.5)
    return module


def tensors(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def pointers(module):
    return {name: t.data_ptr() for name, t in tensors(module).items()}


def values(module):
    return {name: t.detach().clone() for name, t in tensors(module).items()}


@pytest.fixture
def moving(monkeypatch):
    monkeypatch.setattr(nn.Module, "to", fake_move)


def test_changed_module_is_written_back_into_its_own_tensors(moving):
    module = small_module()
    home, before = pointers(module), values(module)
    weight = module[0].weight
    with on_device(module, torch.device("cpu")):
        assert all(pointers(module)[name] != home[name] for name in home)  # it did move
        module[0].weight.data.mul_(-3.0)  # how set_weight writes a pruned weight
        module.scale.add_(1.0)
    assert pointers(module) == home  # the same storage as before the block
    assert module[0].weight is weight  # and the same Parameter
    after = values(module)
    torch.testing.assert_close(after["0.weight"], -3.0 * before["0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(after["scale"], before["scale"] + 1.0, rtol=0, atol=0)
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name], before[name])


def test_unchanged_module_goes_home_without_a_copy(moving):
    module = small_module()
    home, before = pointers(module), values(module)
    with on_device(module, torch.device("cpu"), changed=False):
        # the contract is that the block writes nothing; a write shows that no copy is made
        module[0].weight.data.fill_(7.0)
    assert pointers(module) == home
    for name, value in values(module).items():
        assert torch.equal(value, before[name])


def test_replaced_or_reshaped_parameter_goes_home_as_its_own_copy(moving):
    """Compacting a structured layer replaces a linear's weight by a smaller Parameter: it is kept."""
    module = small_module()
    home = pointers(module)
    replacement = torch.randn(3, 6)
    with on_device(module, torch.device("cpu")):
        module[0].weight = nn.Parameter(replacement.clone())
    assert module[0].weight.shape == (3, 6) and torch.equal(module[0].weight.detach(), replacement)
    assert pointers(module)["0.bias"] == home["0.bias"]


def test_module_goes_home_when_the_block_raises(moving):
    module = small_module()
    home, before = pointers(module), values(module)
    with pytest.raises(RuntimeError, match="boom"):
        with on_device(module, torch.device("cpu")):
            module[0].weight.data.zero_()
            raise RuntimeError("boom")
    assert pointers(module) == home
    assert torch.count_nonzero(module[0].weight) == 0 and torch.equal(module[0].bias.detach(), before["0.bias"])


def test_module_already_on_the_device_is_left_alone():
    module = small_module()
    home = pointers(module)
    with on_device(module, torch.device("cpu")):
        assert pointers(module) == home
        module[0].weight.data.mul_(2.0)
    assert pointers(module) == home


@pytest.mark.parametrize("settings", [
    dict(method="sparsegpt", sparsity="0.5", layers=(1, 2)),  # layer 0 only propagates
    dict(method="wanda", sparsity="0.5", allocation="owl"),  # the allocation's dense pass
    dict(method="structprune", sparsity="0.25", structure="channels+heads", head_sparsity=0.5),
])
def test_prune_with_moving_layers_equals_the_plain_run(settings):
    """The driver with every move giving fresh storage (as a real device does) prunes to the same
    weights as the plain CPU run, and every tensor whose shape the prune kept ends in the host
    storage it started in."""
    config = PruneConfig(nsamples=4, seqlen=32, quiet=True, device="cpu", **settings)
    results = {}
    for move in (False, True):
        model = tiny_llama(layers=2)
        home, shapes = pointers(model), {name: t.shape for name, t in tensors(model).items()}
        with pytest.MonkeyPatch.context() as patch:
            if move:
                patch.setattr(nn.Module, "to", fake_move)
            prune_tiny(model, config)
        results[move] = values(model)
        if move:
            kept = [name for name, t in tensors(model).items() if t.shape == shapes[name]]
            assert kept and all(pointers(model)[name] == home[name] for name in kept)
    assert results[True].keys() == results[False].keys()
    for name, value in results[True].items():
        assert torch.equal(value, results[False][name]), name


def test_moving_a_layer_is_timed_apart_from_pruning_it(monkeypatch):
    """Each layer record's placement_seconds is the time of moving the layer to the compute device
    and back, and its seconds leave it out: a move made 0.8 s slower shows in the former only."""
    def slow_move(self, *args, **kwargs):
        time.sleep(0.8)
        return fake_move(self, *args, **kwargs)

    config = PruneConfig(method="sparsegpt", sparsity="0.5", nsamples=4, seqlen=32, quiet=True, device="cpu")
    runs = {}
    for move in (fake_move, slow_move):
        monkeypatch.setattr(nn.Module, "to", move)
        runs[move] = [r for r in prune_tiny(tiny_llama(layers=2), config) if r is not None]
    fast, slow = runs[fake_move], runs[slow_move]
    assert [r.index for r in slow] == [0, 1]
    for quick, slowed in zip(fast, slow):
        assert slowed.placement_seconds - quick.placement_seconds >= 0.79
        assert slowed.seconds < quick.seconds + 0.6  # the pruning's own time does not hold the move


@pytest.mark.gpu
@pytest.mark.parametrize("layers", [None, (1, 2)])
def test_prune_on_cuda_leaves_the_weights_in_their_host_tensors(layers):
    """A model in host memory pruned with the GPU as the compute device: every tensor ends in
    the host storage it started in, the pruned layers hold their pruned weights and the others
    their dense ones."""
    model = tiny_llama(layers=2)
    home, dense = pointers(model), values(model)
    config = PruneConfig(method="sparsegpt", sparsity="0.5", nsamples=4, seqlen=32, quiet=True, device="cuda",
                         layers=layers)
    prune_tiny(model, config)
    assert pointers(model) == home
    assert all(t.device.type == "cpu" for t in tensors(model).values())
    pruned = range(*(layers or (0, 2)))
    for index, layer in enumerate(get_adapter(model).layers(model)):
        up = layer.mlp.up_proj.weight
        if index in pruned:
            assert zero_fraction(up) == pytest.approx(0.5)
        else:
            assert torch.equal(up.detach(), dense[f"model.layers.{index}.mlp.up_proj.weight"])
