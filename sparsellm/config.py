"""One settings object for a pruning run, built once from the CLI or in Python."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .sparsity import SparsityPattern

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (see sparsellm.default_model)


@dataclass
class SparseLLMSettings:
    """Hyperparameters of the SparseLLM FFN solver (see sparsellm.methods.sparsellm)."""

    # Only the ratios of alpha, beta, gamma matter. Chosen by benchmarks/sparsellm_sweep.py on
    # SmolLM2-135M at 70% (layers 2, 6, 11, 20; log in benchmarks/results/sparsellm_sweep_0.7.log):
    # best FFN error over SparseGPT's, mean of the layers, after 6 iterations: equal scale-aware
    # weights 0.883, the raw (paper-like) 5/5/5 0.930, gamma x10 0.876 (better on 2 layers,
    # worse on 2), alpha x10 0.906. The error was still falling at the 6th iteration on three of
    # the four layers; 4 iterations keep most of the gain (0.897) at two thirds of the cost.
    alpha: float = 5.0
    beta: float = 5.0
    gamma: float = 5.0
    iterations: int = 4
    s_step_iterations: int = 2  # warm-started each iteration; 5 cost 40% of the solver's time
    # Normalise alpha/beta/gamma by the scale of the terms they weigh (see the method's docs).
    scale_aware: bool = True


@dataclass
class PruneConfig:
    """Everything a run needs. Later stages read this; nothing re-parses strings."""

    model: str = DEFAULT_MODEL
    method: str = "sparsegpt"
    sparsity: SparsityPattern = field(default_factory=lambda: SparsityPattern(0.5))
    layers: tuple[int, int | None] | None = None  # half-open [start, stop) of decoder layers; None = all
    sequential: bool = True  # collect FFN statistics after attention of the same layer is pruned
    # calibration
    calib: str = "wiki"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    # SparseGPT / OBS
    blocksize: int = 128
    percdamp: float = 0.01
    sparsellm: SparseLLMSettings = field(default_factory=SparseLLMSettings)
    # evaluation
    eval: tuple[str, ...] = ("wiki",)
    eval_seqlen: int | None = None  # defaults to seqlen
    eval_windows: int | None = None  # cap on evaluation windows; None = all
    eval_dense: bool = True
    # execution
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str = "float32"
    backend: str = "auto"
    quiet: bool = False
    # output
    save: str | None = None
    save_format: str = "dense"
    export: str | None = None
    overwrite: bool = False
    report: str | None = None

    def __post_init__(self):
        self.sparsity = SparsityPattern.parse(self.sparsity)
        if isinstance(self.eval, str):
            self.eval = tuple(e for e in self.eval.split(",") if e)
        if isinstance(self.sparsellm, dict):
            self.sparsellm = SparseLLMSettings(**self.sparsellm)
        for name in ("nsamples", "seqlen", "blocksize"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (0 < self.percdamp):
            raise ValueError(f"percdamp must be positive, got {self.percdamp}")

    @property
    def resolved_eval_seqlen(self) -> int:
        return self.eval_seqlen or self.seqlen

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sparsity"] = str(self.sparsity)
        out["layers"] = list(self.layers) if self.layers else None
        out["eval"] = list(self.eval)
        return out
