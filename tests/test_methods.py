"""The baselines on synthetic layers: exact sparsity, N:M validity, reconstruction ordering."""
import pytest
import torch

from sparsellm import reference
from sparsellm.config import PruneConfig
from sparsellm.methods import InputStats, get_method
from sparsellm.methods.sparsegpt import obs_prune_with_gram
from sparsellm.sparsity import SparsityPattern, satisfies_nm, zero_fraction

from helpers import correlated_inputs


def layer(rows=96, cols=128, tokens=2048, seed=0):
    x = correlated_inputs(tokens, cols, seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    return w, x, InputStats(gram=x.T @ x / tokens, tokens=tokens)


def rel_error(w, pruned, x):
    return float(((w - pruned) @ x.T).norm() / (w @ x.T).norm())


def prune(method, w, stats, sparsity, **kw):
    config = PruneConfig(method=method, sparsity=sparsity, **kw)
    return get_method(config).prune(w.clone(), stats, config.sparsity)


@pytest.mark.parametrize("sparsity", ["0.5", "0.7"])
def test_error_ordering(sparsity):
    w, x, stats = layer()
    errors = {m: rel_error(w, prune(m, w, stats, sparsity), x) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert all(e == e and e < 1.5 for e in errors.values())  # finite, no NaN


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "0.9"])
def test_exact_unstructured_sparsity(method, sparsity):
    w, x, stats = layer()
    pruned = prune(method, w, stats, sparsity)
    # k = floor(count * s) per selection unit: the matrix, each row, or each 128-column block
    unit = {"magnitude": w.numel(), "wanda": w.shape[1], "sparsegpt": w.shape[0] * 128}[method]
    expected = int(unit * float(sparsity)) / unit
    assert zero_fraction(pruned) == pytest.approx(expected, abs=1e-9)
    if method == "wanda":
        per_row = (pruned == 0).sum(1)
        assert (per_row == int(w.shape[1] * float(sparsity))).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "3:4", "4:8", "1:16"])
def test_nm_valid(method, nm):
    w, x, stats = layer()
    pattern = SparsityPattern.parse(nm)
    pruned = prune(method, w, stats, nm)
    assert satisfies_nm(pruned, pattern.n, pattern.m)
    assert zero_fraction(pruned) == pytest.approx(pattern.fraction)


def test_nm_ordering():
    w, x, stats = layer()
    errors = {m: rel_error(w, prune(m, w, stats, "2:4"), x) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_lazy_blocks_match_unblocked_sweep():
    """For N:M the mask is chosen per group as the sweep reaches it, so the blocked sweep with
    lazy updates must equal the single-block sweep up to rounding (float64)."""
    w, x, stats = layer(rows=16, cols=64)
    gram = stats.gram.double()
    pattern = SparsityPattern.parse("2:4")
    small, _ = obs_prune_with_gram(w.double(), gram, pattern, blocksize=8, percdamp=0.01)
    whole, _ = obs_prune_with_gram(w.double(), gram, pattern, blocksize=64, percdamp=0.01)
    assert torch.equal(small == 0, whole == 0)
    torch.testing.assert_close(small, whole, rtol=1e-9, atol=1e-9)


def test_sparsegpt_dense_at_zero_sparsity():
    w, x, stats = layer()
    torch.testing.assert_close(prune("sparsegpt", w, stats, "0.0"), w)


def test_sparsegpt_dead_inputs():
    w, x, _ = layer()
    x[:, 5] = 0  # an input that never fires
    stats = InputStats(gram=x.T @ x / x.shape[0], tokens=x.shape[0])
    pruned = prune("sparsegpt", w, stats, "0.5")
    assert torch.isfinite(pruned).all()
    assert (pruned[:, 5] == 0).all()
    assert stats.gram[5, 5] == 0  # the shared statistics are not modified


def test_sparsegpt_shared_factor_per_group():
    """Linears that share one input (q/k/v) reuse one factorisation of its Hessian."""
    w, x, stats = layer()
    method = get_method(PruneConfig(method="sparsegpt", sparsity="0.5"))
    first = method.prune(w.clone(), stats, method.config.sparsity)
    factor = stats.cache["hinv_upper"]
    second = method.prune(w.clone(), stats, method.config.sparsity)
    assert stats.cache["hinv_upper"] is factor
    torch.testing.assert_close(first, second)


def test_indefinite_hessian_raises_dampening():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    eig = torch.ones(32, dtype=torch.float64)
    eig[0] = -0.05  # beyond 1% dampening, within 10%
    gram = q @ torch.diag(eig) @ q.T
    with pytest.warns(RuntimeWarning, match="dampening raised"):
        chol, damp = reference.damped_cholesky(gram, 0.01)
    assert float(damp) == pytest.approx(0.1)
    assert torch.isfinite(chol).all()
