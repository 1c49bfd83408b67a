"""SparseGPT (Frantar & Alistarh, 2023): blocked OBS with lazy updates.

The upper Cholesky factor of the dampened inverse Hessian H^-1 = U^T U is computed once per
input statistic; the sweep walks the columns in blocks, choosing the mask per block from
w^2 / U_jj^2 (N:M: per group, when the sweep reaches it), zeroing pruned weights and spreading
their error over the columns not yet visited.
"""
from __future__ import annotations

import torch
from torch.profiler import record_function as stage

from .. import ops
from ..plan import Gram
from ..sparsity import SparsityPattern
from .base import LocalMethod, set_weight, solve_weight


@stage("obs_prune")
def obs_prune_with_gram(weight: torch.Tensor, gram: torch.Tensor, pattern: SparsityPattern,
                        blocksize: int, percdamp: float, hinv_upper: torch.Tensor | None = None):
    """Prune ``weight`` (out x in, float32) against inputs with Gram matrix ``gram``.

    Inputs that never fire (zero diagonal) carry no information: their weights are zeroed and
    their Hessian diagonal set to 1 so the factorisation stays defined. ``gram`` is never
    modified (dampening goes into a copy), so a shared Hessian can be reused. Pass a
    precomputed ``hinv_upper`` to share one factorisation among linears with the same input.
    Returns ``(pruned, hinv_upper)``.
    """
    pattern.check_shape(weight.shape[1])
    if pattern.is_nm and blocksize % pattern.m:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    gram_fixed, dead = Gram.without_dead_inputs(gram)
    weight = weight.clone()
    if hinv_upper is None:
        hinv_upper, _ = ops.cholesky_inverse_upper(gram_fixed, percdamp)
    weight[:, dead] = 0
    pruned, _ = ops.obs_prune(weight, hinv_upper, pattern.fraction, pattern.n, pattern.m, blocksize)
    return pruned, hinv_upper


class SparseGPT(LocalMethod):
    name = "sparsegpt"
    statistic = Gram
    structured = "obs"
    structured_solver_settings = ("percdamp", "sequential")  # the structured OBS removes whole units

    def prune_group(self, group, gram, pattern):
        hinv_upper = None  # the linears of a group share their input: one factorisation
        for linear in group.values():
            pruned, hinv_upper = obs_prune_with_gram(solve_weight(linear), gram, pattern,
                                                     self.config.blocksize, self.config.percdamp, hinv_upper)
            set_weight(linear, pruned)

    def prune(self, weight, gram, pattern):
        return obs_prune_with_gram(weight, gram, pattern, self.config.blocksize, self.config.percdamp)[0]
