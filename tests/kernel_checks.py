"""Input makers and comparisons shared by the kernel tests (Triton and CUDA)."""
from __future__ import annotations

import torch

from sparsellm import reference

# N:M patterns exercised everywhere; 48 columns are a multiple of every m here
NM_PATTERNS = [(2, 4), (3, 4), (4, 8), (1, 16), (2, 3), (5, 6), (8, 16)]


def gram_matrix(n: int, batch=(), dtype=torch.float64, device="cpu", samples_per_dim=3, seed=0):
    """A random, reasonably conditioned SPD Gram matrix X^T X (never an identity or zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, samples_per_dim * n, n, generator=g, dtype=torch.float64)
    x = x * torch.linspace(0.5, 2.0, n, dtype=torch.float64)  # uneven column scales
    return (x.transpose(-1, -2) @ x).to(dtype=dtype, device=device)


def hinv_factor(n: int, device="cpu", seed=0, percdamp=0.01):
    """Upper Cholesky factor of the damped inverse, in float32 (as the OBS sweep gets it)."""
    upper, _ = reference.cholesky_inverse_upper(gram_matrix(n, seed=seed), percdamp)
    return upper.float().to(device)


def check_selection(mask: torch.Tensor, ref_mask: torch.Tensor, score: torch.Tensor, k: int | torch.Tensor):
    """``mask`` prunes exactly the ``k`` lowest scores of each row of ``score`` (rows = groups).

    Every pruned score must be <= every kept score of its row, and wherever the row has no tie
    at the threshold (the k-th and (k+1)-th smallest differ) the mask must equal the
    reference's exactly; tied rows may break the tie differently (topk leaves it unspecified).
    Returns the number of rows compared exactly, so callers can assert it is not vacuous.
    """
    assert mask.dtype == torch.bool and mask.shape == score.shape == ref_mask.shape
    mask, ref_mask, score = mask.cpu(), ref_mask.cpu(), score.cpu().double()
    assert not torch.isnan(score).any()
    width = score.shape[-1]
    k = torch.as_tensor(k).expand(score.shape[:-1])
    assert torch.equal(mask.sum(-1), k), "wrong number pruned per row/group"
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    pruned_max = torch.where(mask, score, -inf).amax(-1)
    kept_min = torch.where(mask, inf, score).amin(-1)
    assert (pruned_max <= kept_min).all(), "a kept entry scores lower than a pruned one"
    ordered = score.sort(-1).values
    kk = k.clamp(1, width - 1)
    kth = ordered.gather(-1, (kk - 1).unsqueeze(-1)).squeeze(-1)
    nxt = ordered.gather(-1, kk.unsqueeze(-1)).squeeze(-1)
    untied = (kth != nxt) | (k == 0) | (k == width)
    assert torch.equal(mask[untied], ref_mask[untied]), "mask differs from the reference on an untied row"
    return int(untied.sum())


def check_nm(mask, ref_mask, score, n, m):
    rows, cols = score.shape
    g = lambda t: t.reshape(rows * cols // m, m)  # noqa: E731
    return check_selection(g(mask), g(ref_mask), g(score), n)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - Q) X||^2 = tr((W-Q) G (W-Q)^T), the quantity the OBS sweep minimises."""
    d = (weight.double() - pruned.double()).cpu()
    return float(torch.einsum("ij,jk,ik->", d, gram.double().cpu(), d))


def rand(seed: int, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)
