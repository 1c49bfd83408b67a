"""The seam between the driver and the methods: plans, statistics, whole-model methods."""
import pytest
import torch

from sparsellm import api
from sparsellm.config import PruneConfig
from sparsellm.data import Calibration
from sparsellm.driver import LayerDriver
from sparsellm.methods import METHODS, LocalMethod, PruningMethod, get_method
from sparsellm.models import get_adapter
from sparsellm.plan import Gram, Statistic, Tokens

from helpers import VOCAB, tiny_llama


def windows(n=4, seqlen=32):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


class ColumnMax(Statistic):
    """A statistic the package does not have: max |x_j| per input column."""

    def __init__(self, width, device):
        super().__init__(width, device)
        self.value = torch.zeros(width, device=device)

    def add(self, x):
        self.value = torch.maximum(self.value, x.reshape(-1, self.width).abs().amax(0))

    def result(self):
        return self.value


class ScaledMagnitude(LocalMethod):
    """A new method in a dozen lines: |W_ij| * max|x_j|, the smallest of each row pruned."""

    name = "scaled-magnitude"
    statistic = ColumnMax
    seen: list = []

    def prune(self, weight, column_max, pattern):
        self.seen.append(column_max.clone())
        score = weight.abs() * column_max
        k = int(weight.shape[1] * pattern.fraction)
        return weight.scatter(1, score.argsort(dim=1)[:, :k], 0.0)


def test_a_new_local_method_with_its_own_statistic():
    model = tiny_llama(layers=1)
    layer = get_adapter(model).layers(model)[0]
    captured = {}
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        layer.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, name=name: captured.setdefault(name, []).append(args[0].detach().clone()))
    config = PruneConfig(method="sparsegpt", sparsity="0.5", nsamples=4, seqlen=32, quiet=True, device="cpu")
    method = ScaledMagnitude(config)
    method.seen = []
    records = method.prune_model(model, get_adapter(model), Calibration("unused", None, 32, 0, windows()))
    assert len(method.seen) == 7  # q, k, v share one statistic; o; gate, up; down
    # pass 1 (dense, q/k/v observed) ... pass 4 (down observed): the statistic is of those inputs
    first_q = captured["self_attn.q_proj"][0]
    torch.testing.assert_close(method.seen[0], first_q.reshape(-1, 64).abs().amax(0))
    # down's input reaches it in pass 1 (dense), in pass 4 (the one observing down, after gate/up
    # were pruned; passes 2 and 3 stop before the FFN) and in the final pass
    assert len(captured["mlp.down_proj"]) == 3
    down_seen = captured["mlp.down_proj"][1]
    torch.testing.assert_close(method.seen[-1], down_seen.reshape(-1, 128).abs().amax(0))
    assert all(abs(m["sparsity"] - 0.5) < 1e-9 for m in records[0].matrices.values())


def test_non_sequential_observes_every_step_in_one_dense_pass():
    model = tiny_llama(layers=2)
    calls = []
    get_adapter(model).layers(model)[1].register_forward_pre_hook(lambda mod, args: calls.append(1))
    config = PruneConfig(method="wanda", sparsity="0.5", nsamples=4, seqlen=32, quiet=True, device="cpu",
                         sequential=False)
    LayerDriver(model, get_adapter(model), get_method(config), config).run(windows())
    assert len(calls) == 2  # the observing (dense) pass and the final pass


def test_tokens_statistic_keeps_every_token():
    stat = Tokens(8, torch.device("cpu"))
    parts = [torch.randn(2, 5, 8), torch.randn(3, 5, 8)]
    for part in parts:
        stat.add(part)
    torch.testing.assert_close(stat.result(), torch.cat([p.reshape(-1, 8) for p in parts]))
    assert stat.tokens == 25


class HalveEverything(PruningMethod):
    """A whole-model method: it gets the model and the windows, not layer plans."""

    name = "halve-everything"

    def prune_model(self, model, adapter, calibration):
        self.calibration = calibration
        for layer in adapter.layers(model):
            for group in adapter.groups(layer, "ffn"):
                for linear in group.values():
                    linear.weight.data[:, ::2] = 0
        return []


def test_a_whole_model_method_plugs_into_the_api(monkeypatch):
    monkeypatch.setitem(METHODS, HalveEverything.name, HalveEverything)
    model = tiny_llama(layers=2)

    class Tok:  # api.prune samples calibration windows from the text through the tokenizer
        pass

    monkeypatch.setattr(api.data.Calibration, "sample", lambda *a: Calibration("unused", None, 32, 0, windows()))
    config = PruneConfig(method="halve-everything", nsamples=4, seqlen=32, quiet=True, device="cpu")
    assert api.prune(model, Tok(), config) == []
    down = get_adapter(model).layers(model)[1].mlp.down_proj.weight
    assert (down[:, ::2] == 0).all() and (down[:, 1::2] != 0).all()


def test_unknown_method_is_refused_when_the_settings_are_built():
    with pytest.raises(ValueError, match="choose one of .*sparsegpt"):
        PruneConfig(method="halve-everything")


def test_the_readme_shows_magnitude_as_the_package_has_it():
    """README's "Adding a method" calls its snippet the whole of magnitude pruning: it must
    stay the class in sparsellm/methods/magnitude.py, line for line (comments aside)."""
    import inspect
    import pathlib
    import re

    from sparsellm.methods.magnitude import Magnitude

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(class Magnitude\(LocalMethod\):.*?)```", readme, re.S)
    assert snippet, "README has no Magnitude snippet"

    def code_lines(text):
        lines = (re.sub(r"\s+#.*$", "", line).rstrip() for line in text.splitlines())
        return [line for line in lines if line.strip()]

    assert code_lines(snippet.group(1)) == code_lines(inspect.getsource(Magnitude))


def test_gram_without_dead_inputs_fixes_a_copy_unless_asked_in_place():
    """An input that never fired (zero row and column of the Gram) gets a unit diagonal; a
    shared Gram is left as it was, and a Gram with no dead input comes back as is."""
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, [1, 4]] = 0
    gram = x.T @ x / 50
    before = gram.clone()
    fixed, dead = Gram.without_dead_inputs(gram)
    assert dead.tolist() == [False, True, False, False, True, False]
    assert torch.equal(gram, before)  # untouched
    assert torch.equal(torch.diagonal(fixed)[dead], torch.ones(2, dtype=torch.float64))
    assert torch.equal(fixed[~dead][:, ~dead], before[~dead][:, ~dead])
    assert bool(torch.linalg.cholesky_ex(fixed).info == 0)  # positive definite once fixed
    live = before[~dead][:, ~dead].contiguous()
    assert Gram.without_dead_inputs(live)[0] is live
    same, _ = Gram.without_dead_inputs(gram, in_place=True)
    assert same is gram and torch.equal(gram, fixed)
