"""StructPrune (Song, Bai, Zhao 2025, "Structured Global Pruning asymptotics with O(sqrt N) GPU
memory"): SparseLLM's global FFN solve with whole FFN channels removed.

The FFN is solved as in :mod:`sparsellm.methods.sparsellm` (auxiliaries z, p and s coupling
up, gate and down; closed-form W-, p-, z- and s-steps; same safeguards), with the W-steps'
unstructured OBS prune replaced by a structured channel mask chosen in closed form in every
iteration:

- A removed channel j has row j of up/gate and column j of down zero. Its auxiliaries can then
  be zero as well (z_j = s_j = 0 fit the zero rows exactly, p_j = act(0) = 0), so the alpha and
  gamma terms of the objective do not change, and the whole cost of removing a set S of
  channels is the rise of the down term beta ||Y - W_down p||^2 with the columns S zero and the
  remaining columns refitted. That is the consumer's least squares on the Gram of the current
  p, solved for S by OBS (greedy, in closed form per step: ||w_j||^2 / [H^-1]_jj with the
  downdated inverse Gram; :func:`~sparsellm.methods.structured.obs_select`) and for the kept
  columns in closed form (:func:`~sparsellm.methods.structured.refit_consumer`).
- up and gate are fitted to their targets (z, s) by least squares as in SparseLLM, and the rows
  of the removed channels are zeroed.
- Candidate 0 (the safeguard's start) is the local structured OBS of the FFN: the mask and
  refit on the dense hidden's Gram. StructPrune's FFN error is never above it.

Attention heads are removed by the local structured OBS (``--structure heads`` or
``channels+heads``; :mod:`sparsellm.methods.structured`), and the per-layer channel counts come
from the allocation (``--allocation energy``: the paper's softmax over layer energies;
:mod:`sparsellm.allocation`).

Inferred, not read in the paper (its public code, a fork of SparseLLM's, does not match it and
we could not read its exact formulas): the mask rule above (the paper states that the
structured mask has a closed form; ours is the exact minimiser of the objective's down term
per greedy step, the alpha/gamma terms being unchanged by construction), the greedy order,
the energy used by the allocation, and that heads are pruned locally.
"""
from __future__ import annotations

import torch

from ..plan import LayerView, Step, Tokens
from ..structure import zero_channels
from .base import LayerwiseMethod
from .sparsellm import _FFNSolver
from .structured import OBSUnits, head_step, obs_remove


class _StructuredFFNSolver(_FFNSolver):
    """SparseLLM's solver with whole channels removed (see the module docs)."""

    def __init__(self, ffn, x, channels: int, config):
        super().__init__(ffn, x, config.sparsity, config)
        self.channels = channels
        self.removed = torch.empty(0, dtype=torch.long)

    def _choose_down(self, down_ls, gram):
        """The channel mask and the refitted down, on the Gram of the down projection's input."""
        return obs_remove(down_ls, gram, self.channels, 1, 1, self.config.percdamp)

    def _masked(self, weight, removed):
        if weight is None:
            return None
        out = weight.clone()
        out[removed] = 0
        return out

    def _start_inputs(self, gx):
        # The mask needs the hidden's Gram: candidate 0 starts from the dense up/gate (the
        # removed rows are zeroed in _candidate_zero; the kept channels' hidden is unchanged).
        return self.dense["up"], self.dense.get("gate"), None

    def _candidate_zero(self, up0, gate0, hidden_gram):
        removed, down = self._choose_down(self.dense["down"], hidden_gram)
        return self._masked(up0, removed), self._masked(gate0, removed), down

    def _prune_w_steps(self, up_ls, gate_ls, down_ls, gx, hinv_x, gp, up0, gate0):
        removed, down = self._choose_down(down_ls, gp)
        up = self.dense["up"] if up_ls is None else up_ls
        gate = self.dense.get("gate") if gate_ls is None else gate_ls
        return self._masked(up, removed), self._masked(gate, removed), down

    def run(self) -> dict:
        diagnostics = super().run()
        # The kept weights' removed rows/columns are zero by construction; zeroing the channel
        # whole (and the up bias) makes the structure exact for sparsellm.structure.
        down = self.ffn.down.weight
        removed = (down == 0).all(dim=0).nonzero().reshape(-1)
        zero_channels(self.ffn, removed)
        diagnostics["removed_channels"] = int(len(removed))
        return diagnostics


class StructPrune(LayerwiseMethod):
    """Heads by local structured OBS, then the FFN's channels by the structured global solve."""

    name = "structprune"
    structured = "obs"  # it takes --structure (heads: the local structured OBS)

    def plan(self, layer: LayerView) -> list[Step]:
        steps = []
        if layer.structure.heads_per_group:
            steps.append(head_step(OBSUnits(self.config.percdamp), layer))
        if layer.structure.channels:
            ffn_linears = {name: lin for group in layer.ffn_groups for name, lin in group.items()}
            steps.append(Step(ffn_linears, lambda x: self.prune_ffn(layer, x), observe=Tokens, source=layer.ffn.up))
        return steps

    @torch.no_grad()
    def prune_ffn(self, layer: LayerView, x: torch.Tensor) -> dict:
        return _StructuredFFNSolver(layer.ffn, x, layer.structure.channels, self.config).run()
