"""Method plans: the seam between the layer-by-layer driver and the methods.

For each decoder layer a layer-wise method returns a *plan*: a list of :class:`Step`, in the
order data flows through the layer. A step names

- the linears it prunes (``linears``, qualified name -> module),
- what it observes of the calibration data (``observe``: a :class:`Statistic` type, fed the
  input of the module ``source`` on every calibration token; ``None`` when the step needs no
  data, as magnitude pruning),
- and ``solve(observed)``, which prunes those linears in place from what was observed and may
  return JSON-able diagnostics.

The driver (:mod:`sparsellm.driver`) executes plans: it runs the calibration passes, attaches
the statistics, calls the solves, measures errors and propagates outputs. It knows no method
by name or flag. The statistics are exactly the size a step needs: per-column squared norms
(d floats) for Wanda, the d x d Gram matrix for OBS solvers, every input token for a solver
that fits a whole FFN. A new statistic is a new subclass of :class:`Statistic`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .models import FFN, AttentionHeads
from .sparsity import SparsityPattern
from .structure import LayerStructure


class Statistic:
    """Accumulates something about a module's input over the calibration pass.

    ``add`` sees each batch of inputs ([..., width], any float dtype); ``result`` is what the
    step's solve receives. Accumulation is on the input's device, in float32, or float64 for a
    float64 model (:func:`sparsellm.precision.solve_dtype`).
    """

    def __init__(self, width: int, device: torch.device):
        self.width = width
        self.device = device
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class ColumnSquares(Statistic):
    """sum_t x_tj^2 per input column j: d floats. Its result is the column norms ||X_j||_2."""

    def __init__(self, width, device):
        super().__init__(width, device)
        self.squares = torch.zeros(width, dtype=torch.float32, device=device)

    def add(self, x):
        x = x.reshape(-1, self.width)
        self.squares = self.squares.to(torch.promote_types(self.squares.dtype, x.dtype))  # float64 inputs: float64
        self.squares += x.to(self.squares.dtype).square().sum(0)
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.squares.sqrt()


class Gram(Statistic):
    """The mean outer product X^T X / N over the N calibration tokens: d x d floats."""

    def __init__(self, width, device):
        super().__init__(width, device)
        self.gram = torch.zeros(width, width, dtype=torch.float32, device=device)

    def add(self, x):
        x = x.reshape(-1, self.width)
        self.gram = self.gram.to(torch.promote_types(self.gram.dtype, x.dtype))  # float64 inputs: float64
        x = x.to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.gram / max(self.tokens, 1)

    @staticmethod
    def without_dead_inputs(gram: torch.Tensor, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gram with a unit diagonal where an input never fired, that mask)``: such inputs
        (zero diagonal) carry no information and would leave the Gram singular; the solvers zero
        their weights. Unless ``in_place``, ``gram`` itself comes back (no copy) where every
        input fired and a copy otherwise, so a shared Gram is never modified."""
        dead = torch.diagonal(gram) == 0
        if dead.any():
            gram = gram if in_place else gram.clone()
            gram[dead, dead] = 1
        return gram, dead


class Tokens(Statistic):
    """Every input token, [N, d] float32 (also for a float64 model: its solvers, SparseLLM's and
    StructPrune's, compute in float32): for solvers that fit against the data itself."""

    def __init__(self, width, device):
        super().__init__(width, device)
        self.parts: list[torch.Tensor] = []

    def add(self, x):
        self.parts.append(x.detach().reshape(-1, self.width).float())
        self.tokens += self.parts[-1].shape[0]

    def result(self) -> torch.Tensor:
        out = torch.cat(self.parts) if self.parts else torch.empty(0, self.width, device=self.device)
        self.parts = []
        return out


@dataclass
class Step:
    """One unit of a layer's plan (see the module docs)."""

    linears: dict[str, nn.Linear]
    solve: Callable[[object], dict | None]
    observe: type[Statistic] | None = None
    source: nn.Module | None = None  # whose input is observed; default: the first linear

    @property
    def observed_module(self) -> nn.Module:
        return self.source if self.source is not None else next(iter(self.linears.values()))


@dataclass
class LayerView:
    """What a method sees of one decoder layer when it plans: the groups of linears that share
    an input, in data-flow order (attention, then FFN), the FFN's description, and the
    sparsity pattern (or, structured, the units) this layer is to lose."""

    index: int
    pattern: SparsityPattern
    attention_groups: list[dict[str, nn.Linear]]
    ffn_groups: list[dict[str, nn.Linear]]
    ffn: FFN
    # Structured runs (--structure): what whole units this layer loses, and its heads' view
    # (set only when heads are removed). None/None for unstructured and N:M runs.
    structure: LayerStructure | None = None
    attention: AttentionHeads | None = None

    @property
    def groups(self) -> list[dict[str, nn.Linear]]:
        return self.attention_groups + self.ffn_groups

