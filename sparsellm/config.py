"""One settings object for a pruning run, built once from the CLI or in Python."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .sparsity import SparsityPattern

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (see sparsellm.default_model)
DEFAULT_SPARSITY = 0.5  # PruneConfig.sparsity left unset (structure "heads": 0)
DTYPES = ("float32", "float16", "bfloat16")
SAVE_FORMATS = ("dense", "compressed")
EXPORT_KINDS = ("semi-structured", "csr", "sparse-gpu")


PRODUCT_PRECISIONS = ("tf32", "float32", "bfloat16", "float16")
CPU_GEMMS = ("torch", "onednn")  # SparseLLMSettings.cpu_gemm (sparsellm.precision)


def _is_number(value) -> bool:
    """An int or a float, not a bool: True is an int to Python (alpha=True would read as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # iterations=False would read as 0


@dataclass
class SparseLLMSettings:
    """Hyperparameters of the SparseLLM FFN solver (see sparsellm.methods.sparsellm)."""

    # Only the ratios of alpha, beta, gamma matter. Chosen by benchmarks/sparsellm_sweep.py on
    # SmolLM2-135M at 70% (layers 2, 6, 11, 20; log in benchmarks/results/sparsellm_sweep_0.7.log):
    # best FFN error over SparseGPT's, mean of the layers, after 6 iterations: equal scale-aware
    # weights 0.883, the raw (paper-like) 5/5/5 0.930, gamma x10 0.876 (better on 2 layers,
    # worse on 2), alpha x10 0.906. The error was still falling at the 6th iteration on three of
    # the four layers; 4 iterations kept most of the gain (0.897) at two thirds of the cost. Since
    # then the auxiliaries are over-relaxed (``relaxation``): 3 relaxed iterations gave lower FFN
    # errors than 4 plain ones (benchmarks/results/sparsellm_relaxation/).
    alpha: float = 5.0
    beta: float = 5.0
    gamma: float = 5.0
    # Alternating iterations of the FFN solver; None: the method's own (SparseLLM 3, StructPrune 4).
    iterations: int | None = None
    # Over-relaxation omega of the auxiliaries z and s, in (0, 2) (1: the plain alternation); None:
    # the method's own (SparseLLM 1.6; StructPrune 1, which judges on held-out tokens and was
    # measured without it). See sparsellm.methods.sparsellm.
    relaxation: float | None = None
    s_step_iterations: int = 2  # warm-started each iteration; 5 cost 40% of the solver's time
    # Normalise alpha/beta/gamma by the scale of the terms they weigh (see the method's docs).
    scale_aware: bool = True
    # Precision of the solver's large products (the token-wise forward products and the Gram
    # accumulations over all calibration tokens, ~95% of its arithmetic at 7B shapes): "tf32"
    # uses the tensor cores' TF32 mode on CUDA and plain float32 on the CPU, "float32" plain
    # float32 everywhere, "bfloat16" bfloat16 operands with float32 results (the CPU's AMX units:
    # on the default model's first 15 layers at 70% it moved the mean FFN error from 0.3733 to
    # 0.3743, so it is not the default), "float16" float16 operands scaled by a power of two into
    # its range, float32 results (for CUDA: twice TF32's tensor-core rate on Hopper with the same
    # 11 significant bits per operand; on the CPU emulated in float32, slower). None: float16 on
    # CUDA where torch has float16 GEMMs with float32 output (torch 2.8+), tf32 elsewhere
    # (sparsellm.methods.sparsellm.default_product_precision). On an H200 at 7B shapes
    # (benchmarks/RESULTS.md, "SparseLLM at 7B shapes", run 5) float16 took 2.66 s a layer
    # against TF32's 3.13 s with FFN errors within 3e-4 (none above TF32's); TF32
    # against float32: run 2, 2.3x faster, FFN errors moved by at most 1.5e-4. Factorisations,
    # the OBS sweeps and the p-step system stay float32 in every mode.
    product_precision: str | None = None
    # Which library multiplies the solver's float32 products on the CPU: "torch" (torch's matmul,
    # MKL) or "onednn" (oneDNN's float32 GEMM, which torch ships: the same float32 arithmetic in
    # another summation order, 1.6-2.2x faster than MKL on an AMD EPYC, where MKL runs its AVX2
    # kernels; sparsellm.precision). None: the method's own (SparseLLM onednn where this torch has
    # it; StructPrune torch, as its tables were measured). Other devices ignore it.
    cpu_gemm: str | None = None
    # Calibration tokens per chunk of the solver's token-wise steps (None: automatic, temporaries
    # of 32 MB on the CPU and 128 MB on CUDA; see sparsellm.methods.sparsellm). Only memory and
    # speed depend on it (and float32 rounding of sums over chunks).
    chunk_tokens: int | None = None

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"sparsellm {name} must be a positive number, got {value!r}")
        if self.iterations is not None and not (_is_integer(self.iterations) and self.iterations >= 0):
            raise ValueError(f"sparsellm iterations must be an integer >= 0, got {self.iterations!r}")
        if self.relaxation is not None and not (_is_number(self.relaxation)
                                                and 0 < self.relaxation < 2):
            raise ValueError(f"sparsellm relaxation must be a number in (0, 2), got {self.relaxation!r}")
        if self.product_precision is not None and self.product_precision not in PRODUCT_PRECISIONS:
            raise ValueError(f"sparsellm product_precision must be one of {', '.join(PRODUCT_PRECISIONS)}, "
                             f"got {self.product_precision!r}")
        if self.cpu_gemm is not None and self.cpu_gemm not in CPU_GEMMS:
            raise ValueError(f"sparsellm cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {self.cpu_gemm!r}")
        if not (_is_integer(self.s_step_iterations) and self.s_step_iterations >= 1):
            raise ValueError(f"sparsellm s_step_iterations must be an integer >= 1, got {self.s_step_iterations!r}")
        if self.chunk_tokens is not None and not (_is_integer(self.chunk_tokens) and self.chunk_tokens >= 1):
            raise ValueError(f"sparsellm chunk_tokens must be a positive integer or None, got {self.chunk_tokens!r}")


@dataclass
class ElsaSettings:
    """Settings of the whole-model methods (Elsa and its masked-Adam baseline; see
    sparsellm.methods.elsa). Optimiser defaults are the public recipe's (lr 2e-4, betas
    (0.9, 0.95), no weight decay, linear decay to 0, lambda 0.01, interval 32); the length is
    not (the recipe's 4096 steps are GPU-days on a 7B model): set ``steps`` for your budget."""

    steps: int = 200
    batch_size: int = 4  # windows per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per step; a step sees batch_size x grad_accum x processes windows
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    lr_schedule: str = "linear"  # linear decay to 0, cosine decay to 0, or constant
    max_grad_norm: float = 1.0  # clipping of the loss gradient (the proximal term is added after it)
    admm_lambda: float = 0.01  # penalty lambda (where a ramp heads, at step `steps`: see methods.elsa.lambda_at)
    admm_lambda_start: float | None = None  # where a linear/cosine schedule starts (None: lambda / 10)
    admm_schedule: str = "constant"  # constant, linear or cosine ramp of lambda over the steps
    admm_interval: int = 32  # steps between z/u updates
    score: str = "fisher"  # projection score: fisher (v * (w + u)^2, v = Adam's 2nd moment) or magnitude
    init: str | None = None  # a layer-wise method whose pruned weights start w and z
    train_dense_params: bool = False  # also train every parameter not pruned (embeddings, norms, lm_head, biases, ...)
    state_dtype: str = "float32"  # storage of z and u: float32, bfloat16, or float8 (per-tensor scale)
    optimizer: str = "adamw"  # adamw (torch, fp32 moments) or adamw8bit (bitsandbytes, 8-bit moments)
    # Arithmetic of the forward and backward passes. Weights, gradients, Adam's moments and z/u
    # keep their own dtypes in every mode. "tf32": float32 matmuls on CUDA in the tensor cores'
    # TF32 mode (as SparseLLM's product_precision), plain float32 on the CPU; "float32": plain
    # float32 everywhere; "bfloat16": the forward under torch.autocast(bfloat16), on either device
    # (mixed precision: float32 master weights).
    train_precision: str = "tf32"
    # torch.compile the model for the training passes: fused kernels, far fewer launches, where an
    # eager step of a small model is bound by the host launching kernels; the first step pays the
    # compile (minutes on the CPU). Same arithmetic up to rounding (a different checkpoint key).
    compile: bool = False
    checkpoint_dir: str | None = None  # resume is automatic when it holds a checkpoint of the same run
    checkpoint_every: int = 50  # steps between checkpoints
    # Under torchrun: shard weights, gradients, Adam's moments and z/u (or the mask) over the
    # processes with FSDP2 (each decoder layer, then the root), a torchrun job of one process
    # included (FSDP2's code path on one device); without torchrun: the ordinary run.
    fsdp: bool = False

    LR_SCHEDULES = ("linear", "cosine", "constant")
    ADMM_SCHEDULES = ("constant", "linear", "cosine")
    SCORES = ("fisher", "magnitude")
    STATE_DTYPES = ("float32", "bfloat16", "float8")
    OPTIMIZERS = ("adamw", "adamw8bit")
    TRAIN_PRECISIONS = ("tf32", "float32", "bfloat16")

    def __post_init__(self):
        if not isinstance(self.betas, str):  # a list, an array; a number or a string is refused below as given
            try:
                self.betas = tuple(self.betas)
            except TypeError:
                pass
        if isinstance(self.checkpoint_dir, os.PathLike):
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        if isinstance(self.checkpoint_dir, str):  # as --save and --report: not a folder named "~"
            self.checkpoint_dir = os.path.expanduser(self.checkpoint_dir)
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise ValueError(f"elsa checkpoint_dir must be a non-empty path or None, got {self.checkpoint_dir!r}")

        def number(value) -> bool:  # True is an int to Python, and "0.1" compares with nothing
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("steps", "batch_size", "grad_accum", "admm_interval", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"elsa {name} must be a positive integer, got {value!r}")
        for name in ("lr", "admm_lambda", "max_grad_norm"):
            value = getattr(self, name)
            if not (number(value) and value > 0):
                raise ValueError(f"elsa {name} must be a positive number, got {value!r}")
        if self.admm_lambda_start is not None and not (number(self.admm_lambda_start) and self.admm_lambda_start > 0):
            raise ValueError(f"elsa admm_lambda_start must be a positive number, got {self.admm_lambda_start!r}")
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"elsa weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2
                and all(number(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"elsa betas must be two numbers in [0, 1), got {self.betas!r}")
        for name, allowed in (("lr_schedule", self.LR_SCHEDULES), ("admm_schedule", self.ADMM_SCHEDULES),
                              ("score", self.SCORES), ("state_dtype", self.STATE_DTYPES),
                              ("optimizer", self.OPTIMIZERS), ("train_precision", self.TRAIN_PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"elsa {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("compile", "train_dense_params", "fsdp"):  # a string "false" would read as true
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"elsa {name} must be true or false, got {getattr(self, name)!r}")
        if self.fsdp and self.compile:
            raise ValueError("--compile is not supported with --fsdp yet (the sharded model is trained eagerly); "
                             "drop one of them")
        if self.fsdp and self.optimizer == "adamw8bit":
            raise ValueError("--fsdp does not support --optimizer adamw8bit (bitsandbytes' 8-bit states are not "
                             "sharded tensors); use --optimizer adamw, or drop --fsdp")

    @property
    def lambda_start(self) -> float:
        """Where a linear or cosine ramp of lambda starts: ``admm_lambda_start``, or lambda / 10."""
        return self.admm_lambda_start if self.admm_lambda_start is not None else self.admm_lambda / 10


STRUCTURES = ("channels", "heads", "channels+heads")


@dataclass
class AllocationSettings:
    """How the sparsity target is spread over the decoder layers (see sparsellm.allocation):
    ``uniform`` (every layer the target), ``owl`` (Yin et al. 2023: less sparsity where the
    Wanda scores have more outliers; its published defaults lambda 0.08, M 5) or ``energy``
    (StructPrune's softmax over per-layer energies at ``temperature``). The mean over the pruned
    layers is the target, exactly; each layer stays within [min_sparsity, max_sparsity] (None:
    the target -/+ ``spread``, within [0, 0.95])."""

    rule: str = "uniform"
    temperature: float = 1.0
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    min_sparsity: float | None = None
    max_sparsity: float | None = None
    spread: float = 0.15

    RULES = ("uniform", "owl", "energy")

    def __post_init__(self):
        if self.rule not in self.RULES:
            raise ValueError(f"unknown allocation {self.rule!r}; choose one of {', '.join(self.RULES)}")
        for name in ("temperature", "owl_m", "spread"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"allocation {name} must be a positive number, got {value!r}")
        if not (_is_number(self.owl_lambda) and 0 <= self.owl_lambda < 1):  # False would read as 0
            raise ValueError(f"allocation owl_lambda must lie in [0, 1), got {self.owl_lambda!r}")
        for name in ("min_sparsity", "max_sparsity"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 <= value < 1):
                raise ValueError(f"allocation {name} must lie in [0, 1), got {value!r}")

    def bounds(self, target: float) -> tuple[float, float]:
        low = max(0.0, target - self.spread) if self.min_sparsity is None else self.min_sparsity
        high = min(0.95, target + self.spread) if self.max_sparsity is None else self.max_sparsity
        if not low <= target <= high:
            hint = ("; the default upper bound stops at 0.95: a higher target needs max_sparsity "
                    "(--layer-sparsity-max) at or above it") if self.max_sparsity is None and target > high else ""
            raise ValueError(f"per-layer sparsity bounds [{low}, {high}] do not contain the target {target}{hint}")
        return low, high


@dataclass
class PruneConfig:
    """Everything a run needs. Later stages read this; nothing re-parses strings."""

    model: str = DEFAULT_MODEL
    method: str = "sparsegpt"
    # None: DEFAULT_SPARSITY, or 0 for structure "heads" (which removes no FFN channel and
    # refuses a share it would ignore, so one given must be told from the default)
    sparsity: SparsityPattern | None = None
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
    # structured pruning (sparsellm.structure): with "channels" in it, `sparsity` is the share of
    # FFN channels removed; head_sparsity is the share of query heads removed
    structure: str | None = None  # None (unstructured or N:M), channels, heads, channels+heads
    head_sparsity: float | None = None
    allocation: AllocationSettings = field(default_factory=AllocationSettings)
    elsa: ElsaSettings = field(default_factory=ElsaSettings)
    # evaluation
    eval: tuple[str, ...] = ("wiki",)
    eval_seqlen: int | None = None  # defaults to seqlen
    eval_windows: int | None = None  # cap on evaluation windows; None = all
    eval_dense: bool = True
    # execution
    device: str | None = None  # None: cuda if available, else cpu; a torch.device is taken as its name
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
        if self.sparsity is None:
            self.sparsity = 0.0 if self.structure == "heads" else DEFAULT_SPARSITY
        self.sparsity = SparsityPattern.parse(self.sparsity)
        for name in ("model", "calib", "save", "report"):  # a pathlib.Path is a path too (the report stores text)
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.device, torch.device):
            self.device = str(self.device)  # a torch.device: the report (JSON) stores its name
        for name in ("save", "report"):  # checked before the prune and written after: the same path
            if isinstance(getattr(self, name), str):
                setattr(self, name, os.path.expanduser(getattr(self, name)))
        if isinstance(self.eval, (str, os.PathLike)):
            self.eval = tuple(e for e in os.fspath(self.eval).split(",") if e)
        elif isinstance(self.eval, (list, tuple)):
            self.eval = tuple(os.fspath(e) if isinstance(e, os.PathLike) else e for e in self.eval)
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if isinstance(self.sparsellm, dict):
            self.sparsellm = SparseLLMSettings(**self.sparsellm)
        if isinstance(self.allocation, str):
            self.allocation = AllocationSettings(rule=self.allocation)
        elif isinstance(self.allocation, dict):
            self.allocation = AllocationSettings(**self.allocation)
        from .methods import METHODS  # late: the methods import this module

        if self.structure is None and getattr(METHODS.get(self.method), "structured_only", False):
            self.structure = "channels"  # StructPrune is structured: FFN channels unless told otherwise
        if isinstance(self.elsa, dict):
            self.elsa = ElsaSettings(**self.elsa)
        for name, cls in (("sparsellm", SparseLLMSettings), ("allocation", AllocationSettings),
                          ("elsa", ElsaSettings)):  # validate() and the run read their fields
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be {cls.__name__}(...) or a dict of its fields, "
                                 f"got {getattr(self, name)!r}")
        self.validate()

    def validate(self) -> None:
        """Every check that needs no file, model or device: run when the settings are built,
        so a bad value fails before anything is loaded."""
        from .methods import METHODS, WHOLE_MODEL_METHODS  # late: the methods import this module
        from .ops import BACKENDS

        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("nsamples", "seqlen", "blocksize"):
            positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("model", "calib"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty name or path, got {value!r}")
        if not (isinstance(self.eval, tuple) and all(isinstance(e, str) and e for e in self.eval)):
            raise ValueError(f"eval must be names or paths of evaluation texts (or 'none'), got {self.eval!r}")
        if self.calib == "none":
            raise ValueError("calib 'none' is not a data source (only --eval takes none); give a calibration text")
        for name in ("save", "report"):  # an empty path would be skipped as if not given
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty path or None, got {value!r}")
        for name in ("sequential", "eval_dense", "quiet", "overwrite"):  # a string "false" would read as true
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise ValueError(f"device must be a name such as cpu, cuda or cuda:1, or None, got {self.device!r}")
        positive_int("eval_seqlen", self.eval_seqlen, allow_none=True)
        if self.resolved_eval_seqlen < 2 and any(e != "none" for e in self.eval):  # a window scores seqlen - 1 tokens
            raise ValueError(f"the evaluation window (--eval-seqlen, else --seqlen) needs at least 2 tokens, got "
                             f"{self.resolved_eval_seqlen}")
        positive_int("eval_windows", self.eval_windows, allow_none=True)
        if not (_is_number(self.percdamp) and 0 < self.percdamp < float("inf")):
            raise ValueError(f"percdamp must be positive, got {self.percdamp!r}")
        choices = {"method": sorted(METHODS), "dtype": DTYPES, "save_format": SAVE_FORMATS, "backend": BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.structure is None and self.sparsity.fraction == 0:
            raise ValueError("sparsity 0 prunes nothing, and the run would still change the model (the weights of "
                             "inputs that never fire on the calibration text are zeroed); give a sparsity above 0")
        if self.export is not None and self.export not in EXPORT_KINDS:
            raise ValueError(f"unknown export {self.export!r}; choose one of {', '.join(EXPORT_KINDS)}")
        if self.layers is not None:
            if not (isinstance(self.layers, tuple) and len(self.layers) == 2 and all(
                    v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in self.layers)):
                raise ValueError(f"layers must be a (start, stop) pair of integers (stop None: to the last layer), "
                                 f"got {self.layers!r}")
            start, stop = self.layers
            if start is None or start < 0 or (stop is not None and stop <= start):
                # as typed: '--layers -2:' read back as "-2:None"; and say negatives do not count from the end
                raise ValueError(f"layer range {start}:{'' if stop is None else stop} is empty or negative; "
                                 f"expected 0 <= START < STOP (no negative indices: give the layer numbers)")
        if not self.eval:
            raise ValueError("eval needs at least one text source (or 'none')")
        init = self.elsa.init
        # Elsa and masked-adam keep a per-weight pattern, started from --init's zeros; a structured-only
        # method would remove whole channels instead (and masked-adam then find the pattern unmet)
        layerwise = sorted(name for name, cls in METHODS.items() if hasattr(cls, "plan") and not cls.structured_only)
        if init is not None and init not in layerwise:
            why = " (it removes whole FFN channels, not single weights)" if init in METHODS and METHODS[
                init].structured_only else ""
            raise ValueError(f"elsa init must be an unstructured layer-wise method ({', '.join(layerwise)}), "
                             f"got {init!r}{why}")
        if self.elsa.fsdp and not METHODS[self.method].whole_model:
            raise ValueError(f"--fsdp shards the whole-model training of {', '.join(WHOLE_MODEL_METHODS)}; "
                             f"method {self.method} prunes one layer at a time and does not use it")
        self._validate_structure(METHODS)
        if self.save is None:  # both only shape the saved model: without one they would do nothing
            if self.save_format != "dense":
                raise ValueError(f"save_format {self.save_format} (--save-format) is the layout of the saved model; "
                                 "give --save FOLDER, or drop it")
            if self.overwrite:
                raise ValueError("overwrite (--overwrite) replaces the --save folder; give --save FOLDER, or drop it")
        METHODS[self.method].check_config(self)

    def _validate_structure(self, methods) -> None:
        """--structure, --head-sparsity and --allocation: their values and combinations."""
        method = methods[self.method]
        if self.structure is not None:
            if self.structure not in STRUCTURES:
                raise ValueError(f"unknown structure {self.structure!r}; choose one of {', '.join(STRUCTURES)}")
            if getattr(method, "structured", None) is None:
                able = sorted(n for n, cls in methods.items() if getattr(cls, "structured", None))
                raise ValueError(f"method {self.method} has no structured version; --structure works with "
                                 f"{', '.join(able)}")
            if self.sparsity.is_nm:
                raise ValueError(f"--structure removes whole channels/heads; sparsity {self.sparsity} is an N:M "
                                 "pattern (give the share of FFN channels, e.g. 0.5)")
            if self.structure == "heads" and self.sparsity.fraction != 0:
                raise ValueError(f"structure heads removes attention heads only (head_sparsity, --head-sparsity) "
                                 f"and would ignore sparsity (--sparsity) {self.sparsity}, the share of FFN channels: "
                                 "leave it unset (or 0), or use structure channels+heads")
            if "channels" in self.structure and self.sparsity.fraction == 0:
                raise ValueError(f"structure {self.structure} with sparsity 0 removes no FFN channel (--sparsity is the "
                                 "share of FFN channels removed); give a share above 0, or --structure heads")
            heads = "heads" in self.structure
            if heads and self.head_sparsity is None:
                raise ValueError(f"structure {self.structure} needs head_sparsity (--head-sparsity), the share "
                                 "of query heads removed")
            if self.save_format != "dense":
                raise ValueError("a structured model is saved smaller and dense; --save-format compressed "
                                 "does not apply")
        if self.head_sparsity is not None:
            if self.structure is None or "heads" not in self.structure:
                raise ValueError("head_sparsity (--head-sparsity) needs --structure heads or channels+heads")
            if not (isinstance(self.head_sparsity, (int, float)) and 0 < self.head_sparsity < 1):
                raise ValueError(f"head_sparsity must lie in (0, 1), got {self.head_sparsity!r}")
        rule = self.allocation.rule
        if rule != "uniform":
            if self.sparsity.is_nm:
                raise ValueError(f"allocation {rule} varies the sparsity per layer; N:M {self.sparsity} is fixed")
            if rule == "owl" and self.structure is not None:
                raise ValueError("allocation owl is defined on unstructured Wanda scores; structured runs use "
                                 "uniform or energy")
            if self.structure == "heads":  # layer_targets would quietly run it uniform
                raise ValueError(f"allocation {rule} spreads the FFN channel share over the layers; --structure heads "
                                 "removes no channel, and heads are always allocated uniformly: use --allocation "
                                 "uniform, or --structure channels+heads")
            self.allocation.bounds(self.sparsity.fraction)

    @property
    def resolved_eval_seqlen(self) -> int:
        return self.eval_seqlen or self.seqlen

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """The decoder layers to prune, ``[start, stop)``, of a model with ``num_layers``: all of
        them without ``layers``, up to the last one where its stop is None."""
        start, stop = self.layers or (0, num_layers)
        return start, num_layers if stop is None else stop

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sparsity"] = str(self.sparsity)
        out["layers"] = list(self.layers) if self.layers else None
        out["eval"] = list(self.eval)
        return out
