"""The baselines on synthetic layers: exact sparsity, N:M validity, reconstruction ordering."""
import pytest
import torch

from sparsellm import reference
from sparsellm.config import PruneConfig
from sparsellm.methods import get_method
from sparsellm.methods.sparsegpt import obs_prune_with_gram
from sparsellm.plan import ColumnSquares, Gram
from sparsellm.sparsity import SparsityPattern, satisfies_nm, zero_fraction

from helpers import correlated_inputs


def layer(rows=96, cols=128, tokens=2048, seed=0):
    x = correlated_inputs(tokens, cols, seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    return w, x, x


def observe(method, x):
    """What the method's statistic makes of inputs ``x`` (fed in two batches, as passes do)."""
    if method.statistic is None:
        return None
    stat = method.statistic(x.shape[1], x.device)
    for part in x.chunk(2):
        stat.add(part)
    return stat.result()


def rel_error(w, pruned, x):
    return float(((w - pruned) @ x.T).norm() / (w @ x.T).norm())


def prune(method, w, x, sparsity, **kw):
    config = PruneConfig(method=method, sparsity=sparsity, **kw)
    method = get_method(config)
    return method.prune(w.clone(), observe(method, x), config.sparsity)


@pytest.mark.parametrize("sparsity", ["0.5", "0.7"])
def test_error_ordering(sparsity):
    w, x, _ = layer()
    errors = {m: rel_error(w, prune(m, w, x, sparsity), x) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert all(e == e and e < 1.5 for e in errors.values())  # finite, no NaN


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "0.9"])
def test_exact_unstructured_sparsity(method, sparsity):
    w, x, _ = layer()
    pruned = prune(method, w, x, sparsity)
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
    w, x, _ = layer()
    pattern = SparsityPattern.parse(nm)
    pruned = prune(method, w, x, nm)
    assert satisfies_nm(pruned, pattern.n, pattern.m)
    assert zero_fraction(pruned) == pytest.approx(pattern.fraction)


def test_nm_ordering():
    w, x, _ = layer()
    errors = {m: rel_error(w, prune(m, w, x, "2:4"), x) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_lazy_blocks_match_unblocked_sweep():
    """For N:M the mask is chosen per group as the sweep reaches it, so the blocked sweep with
    lazy updates must equal the single-block sweep up to rounding (float64)."""
    w, x, _ = layer(rows=16, cols=64)
    gram = (x.T @ x / x.shape[0]).double()
    pattern = SparsityPattern.parse("2:4")
    small, _ = obs_prune_with_gram(w.double(), gram, pattern, blocksize=8, percdamp=0.01)
    whole, _ = obs_prune_with_gram(w.double(), gram, pattern, blocksize=64, percdamp=0.01)
    assert torch.equal(small == 0, whole == 0)
    torch.testing.assert_close(small, whole, rtol=1e-9, atol=1e-9)


def test_sparsegpt_dense_at_zero_sparsity():
    """The OBS sweep with nothing to prune and no dead input returns the weight (a run refuses
    sparsity 0, as it is no no-op where inputs never fire: the solver is checked directly)."""
    w, x, _ = layer()
    method = get_method(PruneConfig(method="sparsegpt", sparsity="0.5"))
    torch.testing.assert_close(method.prune(w.clone(), observe(method, x), SparsityPattern(0.0)), w)


def test_sparsegpt_dead_inputs():
    w, x, _ = layer()
    x[:, 5] = 0  # an input that never fires
    gram = x.T @ x / x.shape[0]
    method = get_method(PruneConfig(method="sparsegpt", sparsity="0.5"))
    pruned = method.prune(w.clone(), gram, method.config.sparsity)
    assert torch.isfinite(pruned).all()
    assert (pruned[:, 5] == 0).all()
    assert gram[5, 5] == 0  # the shared statistics are not modified


def test_sparsegpt_shared_factor_per_group(monkeypatch):
    """Linears that share one input (q/k/v) reuse one factorisation of its Hessian inside the
    group's step, and each gets what pruning it alone gives."""
    from sparsellm import ops
    w, x, _ = layer()
    gram = x.T @ x / x.shape[0]
    group = {name: torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for name in ("q", "k")}
    for i, linear in enumerate(group.values()):
        linear.weight.data.copy_(w * (i + 1))
    method = get_method(PruneConfig(method="sparsegpt", sparsity="0.5"))
    alone = [method.prune(lin.weight.detach().clone(), gram, method.config.sparsity) for lin in group.values()]
    factorisations = []
    real = ops.cholesky_inverse_upper
    monkeypatch.setattr(ops, "cholesky_inverse_upper", lambda *a: factorisations.append(1) or real(*a))
    method.prune_group(group, gram, method.config.sparsity)
    assert len(factorisations) == 1
    for linear, expected in zip(group.values(), alone):
        torch.testing.assert_close(linear.weight.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_width_the_pattern_cannot_take_leaves_the_group_unpruned(method):
    """An N:M pattern whose M does not divide a linear's input width is the pattern's clear error
    (not a reshape's deep in a kernel), raised before any linear of the group is changed."""
    w, x, _ = layer(cols=126)
    group = {name: torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for name in ("q", "k")}
    for linear in group.values():
        linear.weight.data.copy_(w)
    pruner = get_method(PruneConfig(method=method, sparsity="2:4"))
    with pytest.raises(ValueError, match="needs the input size \\(126\\) to be a multiple of 4"):
        pruner.prune_group(group, observe(pruner, x), pruner.config.sparsity)
    assert all(torch.equal(linear.weight.detach(), w) for linear in group.values())


def test_wanda_observes_column_norms_only():
    """Wanda's statistic is d floats: the input column norms, equal to the float64 norms."""
    w, x, _ = layer()
    method = get_method(PruneConfig(method="wanda", sparsity="0.5"))
    norms = observe(method, x)
    assert method.statistic is ColumnSquares and norms.shape == (x.shape[1],)
    torch.testing.assert_close(norms.double(), x.double().norm(dim=0), rtol=1e-5, atol=0)


def test_gram_statistic_is_the_mean_outer_product():
    x = torch.randn(300, 16, dtype=torch.float64)
    stat = Gram(16, x.device)
    for part in x.split(70):
        stat.add(part)
    assert stat.tokens == 300
    torch.testing.assert_close(stat.result().double(), x.T @ x / 300, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 0), (0, 4, 4), (2, 3, 4, 4)])
def test_reference_factor_of_batches_empty_or_not(shape):
    """The spec's batched factor: no matrices or 0 x 0 ones give an empty factor of the input's
    shape (stack and reshape(-1) refused them); a batch of several dims is each matrix's own."""
    a = torch.randn(*shape[:-1], shape[-1] + 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = a @ a.transpose(-1, -2)
    upper, damp = reference.cholesky_inverse_upper(gram, 0.01)
    assert upper.shape == gram.shape and damp.shape == gram.shape[:-2]
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape[:-2]]) if gram.numel() else []:
        alone, _ = reference.cholesky_inverse_upper(gram[tuple(index)], 0.01)
        torch.testing.assert_close(upper[tuple(index)], alone, rtol=1e-12, atol=1e-12)
        assert alone.abs().sum() > 0


def test_wanda_scores_a_float64_weight_in_float64():
    """Scores 1e-12 apart are told apart in float64 (a float64 model's prune; in float32 they tie)."""
    weight = torch.tensor([[1.0 + 1e-12, 1.0, 3.0, 4.0], [1.0, 1.0 + 1e-12, 3.0, 4.0]], dtype=torch.float64)
    mask = reference.wanda_prune_mask(weight, torch.ones(4, dtype=torch.float64), 0.25)
    assert mask.tolist() == [[False, True, False, False], [True, False, False, False]]


def _prefix_mask_case(rows=6, width=24, seed=0):
    """A damped Gram H, the upper factor of H^-1 built here (torch.linalg only, not the package),
    a random weight and a mask pruning a different-length prefix of each row (0 to all)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * width, width, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, width,
                                                                                      dtype=torch.float64)
    h = x.T @ x + 0.1 * torch.eye(width, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    w = torch.randn(rows, width, generator=g, dtype=torch.float64)
    lengths = [0, 1, 5, 11, width - 1, width][:rows]
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return h, hinv, w, mask, lengths


def _constrained_least_squares(h, w, lengths):
    """Per row: zero the first k weights and refit the rest to minimise (w - q) H (w - q)^T:
    q_R = w_R + w_P H_PR H_RR^-1 (the normal equations), and that minimum."""
    q, err = torch.zeros_like(w), []
    for i, k in enumerate(lengths):
        if k < w.shape[1]:
            q[i, k:] = w[i, k:] + torch.linalg.solve(h[k:, k:], h[k:, :k] @ w[i, :k])
        d = w[i] - q[i]
        err.append(float(d @ h @ d))
    return q, err


@pytest.mark.parametrize("backend", ["reference-float64", "reference", "cpu", "triton"])
def test_obs_block_with_a_prefix_mask_is_the_least_squares_refit(backend):
    """An oracle for the OBS sweep independent of the package (the backends are otherwise only
    compared with the reference, and the reference only ranked against Wanda): where each row's
    pruned weights are a prefix of its columns, the sweep's compensation of the later columns is
    exact, so the block equals the constrained least-squares refit of the kept weights, and the
    returned loss is half the reconstruction error (w - q) H (w - q)^T summed over rows."""
    from sparsellm import ops

    h, hinv, w, mask, lengths = _prefix_mask_case()
    want, errors = _constrained_least_squares(h, w, lengths)
    assert want.abs().max() > 0 and min(errors[1:]) > 0 and errors[0] == 0
    if backend == "reference-float64":
        q, _, loss = reference.obs_prune_block(w, hinv, 0.5, prune_mask=mask)
        tol = 1e-9
    else:
        if not ops.available(backend, "cpu"):
            pytest.skip(f"the {backend} backend is not available here")
        ops.reset_usage()
        with ops.backend_scope(backend):
            q, _, loss = ops.obs_prune_block(w.float(), hinv.float(), 0.5, prune_mask=mask)
        assert ops.usage()["obs_prune_block"] == {backend: 1}
        tol = 1e-4  # float32 sweeps of a moderately conditioned H
    assert torch.equal(q == 0, mask)
    scale = float(want.abs().max())
    torch.testing.assert_close(q.double(), want, rtol=0, atol=tol * scale)
    assert float(loss) == pytest.approx(sum(errors) / 2, rel=tol)
