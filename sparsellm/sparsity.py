"""Sparsity patterns: an unstructured fraction (``0.7``) or semi-structured ``N:M``.

Convention (as in the SparseGPT, Wanda and SparseLLM papers): ``N:M`` means N weights are
*pruned* in every M consecutive input weights of a row, so ``3:4`` is 75% sparse and ``2:4``
is 50% sparse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernel_constants import MAX_M

# How many of ``size`` entries a fraction prunes: floor(size x fraction), with the product's
# rounding error absorbed first. A plain int() is one short where the float product lands just
# below the integer it stands for (0.29 x 100 = 28.999999999999996); 1e-6 is far above that error
# for any tensor size (relative 1e-16 of at most ~1e9 entries) and below the step of any fraction
# given with five decimals or fewer (steps of 1e-5). The CUDA extension's OBS block (csrc/obs_block.cu) counts the
# same way.
PRUNED_COUNT_SLACK = 1e-6


def pruned_count(size: int, fraction: float) -> int:
    """Entries a ``fraction`` prunes of ``size``: floor(size x fraction) (see PRUNED_COUNT_SLACK)."""
    return math.floor(size * fraction + PRUNED_COUNT_SLACK)


class SparsityError(ValueError):
    """A sparsity pattern that cannot be parsed or applied."""


@dataclass(frozen=True)
class SparsityPattern:
    """What to prune. ``fraction`` is the pruned share; ``n``/``m`` are set for N:M patterns."""

    fraction: float
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        if self.is_nm:
            if not (isinstance(self.n, int) and isinstance(self.m, int)):
                raise SparsityError("N:M needs integer N and M")
            if not (0 < self.n < self.m):
                raise SparsityError(f"N:M needs 0 < N < M (N pruned of every M), got {self.n}:{self.m}")
            if self.m > MAX_M:
                raise SparsityError(f"N:M supports M up to {MAX_M}, got M={self.m}")
        elif not (0.0 <= self.fraction < 1.0):
            raise SparsityError(f"sparsity must lie in [0, 1), got {self.fraction}")

    @property
    def is_nm(self) -> bool:
        return self.n is not None or self.m is not None

    @classmethod
    def parse(cls, spec: "str | float | SparsityPattern") -> "SparsityPattern":
        """Parse ``"0.7"``, ``0.7``, ``"70%"`` or ``"3:4"``."""
        if isinstance(spec, SparsityPattern):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(float(spec))
        text = str(spec).strip()
        if ":" in text:
            parts = text.split(":")
            try:
                n, m = (int(p) for p in parts)
            except ValueError:
                raise SparsityError(f"cannot parse N:M pattern {spec!r}; expected e.g. 2:4") from None
            if not (0 < n < m):
                raise SparsityError(f"N:M needs 0 < N < M (N pruned of every M), got {text}")
            return cls(n / m, n, m)
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise SparsityError(f"cannot parse sparsity {spec!r}; expected a fraction like 0.7 or N:M like 2:4") from None
        return cls(value)

    def check_shape(self, in_features: int) -> None:
        """N:M groups run along the input dimension, which must divide into groups of M."""
        if self.is_nm and in_features % self.m:
            raise SparsityError(f"{self} needs the input size ({in_features}) to be a multiple of {self.m}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"


def zero_fraction(*weights: torch.Tensor) -> float:
    """Share of exactly-zero entries (-0.0 counts as zero), over all the given tensors together
    (zeros over entries, not a mean of per-tensor shares); 0.0 when they hold no entries."""
    zeros = sum(int((w == 0).sum().item()) for w in weights)
    total = sum(w.numel() for w in weights)
    return zeros / total if total else 0.0


def reaches_sparsity(share: float, min_sparsity: float, in_features: int) -> bool:
    """Whether a weight whose zero share is ``share`` counts as pruned to ``min_sparsity``. The
    pruners round a zero count down (per row, or over the whole weight), which loses less than
    one entry per row: a weight pruned at exactly ``min_sparsity`` holds at least
    ``min_sparsity - 1 / in_features`` (e.g. 0.89990 at 90% of a 4096-wide row)."""
    return share >= min_sparsity - 1.0 / max(int(in_features), 1)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of M consecutive input weights (per row) holding fewer than N zeros;
    -1 if the input size is not a multiple of M (no such groups exist)."""
    rows, cols = weight.shape
    if cols % m:
        return -1
    zeros = (weight.detach().reshape(rows, cols // m, m) == 0).sum(-1)
    return int((zeros < n).sum().item())


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of M consecutive input weights holds at least N zeros."""
    return nm_violations(weight, n, m) == 0
