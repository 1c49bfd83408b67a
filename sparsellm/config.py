"""One settings object for a pruning run, built once from the CLI or in Python."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .sparsity import SparsityPattern

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (see sparsellm.default_model)
DTYPES = ("float32", "float16", "bfloat16")
SAVE_FORMATS = ("dense", "compressed")
EXPORT_KINDS = ("semi-structured", "csr")


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

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"sparsellm {name} must be a positive number, got {value!r}")
        if not (isinstance(self.iterations, int) and self.iterations >= 0):
            raise ValueError(f"sparsellm iterations must be an integer >= 0, got {self.iterations!r}")
        if not (isinstance(self.s_step_iterations, int) and self.s_step_iterations >= 1):
            raise ValueError(f"sparsellm s_step_iterations must be an integer >= 1, got {self.s_step_iterations!r}")


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
        self.validate()

    def validate(self) -> None:
        """Every check that needs no file, model or device: run when the settings are built,
        so a bad value fails before anything is loaded."""
        from .methods import METHODS  # late: the methods import this module
        from .ops import BACKENDS

        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("nsamples", "seqlen", "blocksize"):
            positive_int(name, getattr(self, name))
        positive_int("eval_seqlen", self.eval_seqlen, allow_none=True)
        positive_int("eval_windows", self.eval_windows, allow_none=True)
        if not (isinstance(self.percdamp, (int, float)) and 0 < self.percdamp < float("inf")):
            raise ValueError(f"percdamp must be positive, got {self.percdamp!r}")
        choices = {"method": sorted(METHODS), "dtype": DTYPES, "save_format": SAVE_FORMATS, "backend": BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.export is not None and self.export not in EXPORT_KINDS:
            raise ValueError(f"unknown export {self.export!r}; choose one of {', '.join(EXPORT_KINDS)}")
        if self.layers is not None:
            start, stop = self.layers
            if start is None or start < 0 or (stop is not None and stop <= start):
                raise ValueError(f"layer range {start}:{stop} is empty or negative; expected 0 <= START < STOP")
        if not self.eval:
            raise ValueError("eval needs at least one text source (or 'none')")

    @property
    def resolved_eval_seqlen(self) -> int:
        return self.eval_seqlen or self.seqlen

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sparsity"] = str(self.sparsity)
        out["layers"] = list(self.layers) if self.layers else None
        out["eval"] = list(self.eval)
        return out
