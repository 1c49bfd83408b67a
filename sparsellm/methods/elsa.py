"""Elsa (Lee, Jang, Lee, Alistarh, Lee 2025: "The Unseen Frontier: Pushing the Limits of LLM
Sparsity with Surrogate-Free ADMM"): prune by minimising the model's own next-token loss under
the sparsity constraint, instead of any layer-wise surrogate.

    minimise f(w)  subject to  w in S       f: mean next-token cross-entropy on calibration text
                                            S: the sparsity set of each prunable matrix

Scaled-dual ADMM with a copy z of the prunable weights and the dual u:

1. Start: u = 0, z = Proj_S(w) (w: the dense weights, or those of ``init``, a layer-wise method).
2. Every step: the loss gradient of a batch of fresh calibration windows, clipped; then the
   proximal term lambda (w - z + u) is added to each prunable weight's gradient (after the
   clipping, so the constraint is never clipped away) and one AdamW step is taken: an inexact
   w-step of the augmented Lagrangian, as in the paper.
3. Every ``interval`` steps: lambda moves along its schedule (u is rescaled by old / new lambda,
   so the unscaled dual lambda u is unchanged), then z = Proj_S(w + u) and u = u + w - z.
4. End: w = Proj_S(w) with the same score: exactly sparse.

Proj_S keeps the highest-scoring (1 - s) of each matrix (N:M: the M - N highest of every group
of M consecutive inputs of a row; N pruned of M, this package's convention). Scores: magnitude
|w + u|, or the paper's Fisher-weighted v (w + u)^2 with v Adam's second-moment estimate (before
Adam has seen a gradient, at the very first projection, magnitude is used).

Choices made here, and why:
- Embeddings, norms and lm_head are never pruned and by default frozen
  (``train_dense_params`` trains them too, with every other parameter that is not pruned: biases,
  the linears of layers outside the range): the constraint concerns the linears, and the tied
  embedding of a small model is a fifth of its weights, whose Adam states would cost more
  memory than the linears'.
- The model runs in eval mode (no dropout): runs are deterministic, so a resumed run ends with
  the same weights as an uninterrupted one.
- Data parallel: each step's windows are split over the processes; each process backpropagates
  its share of the *global* mean loss and the gradients are summed, so every process holds the
  gradient of the same global batch and the result does not depend on the process count. The
  proximal term is added after that reduction, unscaled (the public code divides it by the
  number of processes while adding it after the averaging, which weakens the constraint as
  processes are added).
- FSDP (``fsdp``, under torchrun with more than one process): the same split of the windows,
  but the model is a sharded copy (FSDP2, each decoder layer then the root; see
  :class:`sparsellm.distributed.Shards`) whose parameters, gradients and Adam moments are
  blocks of rows, and z, u (Elsa) or the mask (masked-adam) are made from those blocks, so
  each process holds about 1 / N of every state. The reduce-scatter *sums* the gradients (as
  the data-parallel all_reduce does), clipping uses the global norm of the sharded gradients,
  and the proximal term is added to each process's rows after that. Proj_S stays that of one
  process: N:M groups lie within a row, so they are projected locally; the unstructured top
  (1 - s) of a matrix needs all of its scores, which are gathered one matrix at a time (a
  transient full score of the largest matrix per process) and the same selection is run on
  them. Residual, mask change and the masked-adam check are sums over the processes; at the
  end the full weights are gathered back into the caller's (never wrapped) model on every
  process. Checkpoints hold full tensors, the same file as without FSDP (rank 0 writes it; a
  resume gives each process its rows). bitsandbytes' 8-bit Adam is refused with FSDP.

:class:`MaskedAdam` is the fair baseline: the mask of ``init`` kept fixed and the same Adam
steps on the same data, so a table shows what ADMM adds over fine-tuning after one-shot pruning.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed, ops
from ..config import AllocationSettings, SparseLLMSettings
from ..distributed import local
from ..driver import LayerRecord, resolve_device
from ..export import check_writable, folder_holds
from ..precision import large_products, solve_dtype
from ..sparsity import SparsityPattern, nm_violations, pruned_count, reaches_sparsity, zero_fraction
from .base import PruningMethod

log = logging.getLogger(__name__)

CHECKPOINT_STATE = "elsa-state.pt"
CHECKPOINT_RUN = "elsa-run.json"
FLOAT8_MAX = 448.0  # the largest finite float8_e4m3fn


# ---- the pieces, each tested against a restatement of its equation ----------------------------


def project(values: torch.Tensor, score: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Proj_S: ``values`` with every entry zeroed except the highest-``score`` (1 - s) of the
    matrix (N:M: of each group). Ties are broken by the selection's order, deterministically."""
    if pattern.is_nm:
        mask = ops.nm_prune_mask(score, pattern.n, pattern.m)
    else:
        mask = ops.flat_prune_mask(score, pruned_count(score.numel(), pattern.fraction))
    return values.masked_fill(mask, 0)


def importance(values: torch.Tensor, second_moment: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The projection score of ``values`` (w + u, or w at the end): Fisher v (w + u)^2, or |w + u|.

    A non-zero entry whose Fisher score is 0 (Adam never saw a gradient for it, v = 0: a ReLU
    row that never fires on the calibration text; or the product underflowed) would tie with
    the zeros, and the projection could keep a zero in its place: an N:M group with more than
    N zeros, a kept weight lost. Such entries score just above 0 instead, in the order of their
    magnitudes, below any score a weight with a gradient gets (the smallest normal float up to
    twice it); the same for every process's rows, so a sharded run selects as one process."""
    if kind == "fisher" and second_moment is not None:
        score = second_moment * values.square()
        unscored = (score == 0) & (values != 0)
        if not unscored.any():
            return score
        magnitude = values.abs().to(score.dtype)
        by_magnitude = torch.finfo(score.dtype).tiny * (1 + magnitude / (1 + magnitude))
        return torch.where(unscored, by_magnitude, score)
    return values.abs()


def lambda_at(settings, step: int) -> float:
    """lambda after ``step`` of ``settings.steps`` steps: constant, or a linear / cosine ramp
    from ``admm_lambda_start`` (default lambda / 10) at step 0 towards ``admm_lambda`` at step
    ``steps``. The steps run 0 .. steps - 1 and the z-updates at multiples of the interval below
    ``steps``, so the last value in use is short of ``admm_lambda`` (0.901 of a 0.01 -> 1 ramp
    over 60 steps, interval 6); the Elsa rows in the README ran with this schedule."""
    final = settings.admm_lambda
    if settings.admm_schedule == "constant":
        return final
    start = settings.lambda_start
    t = min(max(step / settings.steps, 0.0), 1.0)
    ramp = t if settings.admm_schedule == "linear" else 0.5 * (1 - math.cos(math.pi * t))
    return start + (final - start) * ramp


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear or cosine decay to 0
    at ``steps``, or constant."""
    if schedule == "constant":
        return 1.0
    t = step / steps
    return 1.0 - t if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * t))


class StateStore:
    """How z and u are kept: float32, bfloat16, or float8 (e4m3) with one float32 scale per
    tensor (the paper's memory-lean Elsa-L). ``encode`` / ``decode`` go to and from float32."""

    BYTES = {"float32": 4, "bfloat16": 2, "float8": 1}

    def __init__(self, dtype: str):
        if dtype not in self.BYTES:
            raise ValueError(f"state dtype must be one of {', '.join(self.BYTES)}, got {dtype!r}")
        if dtype == "float8" and not hasattr(torch, "float8_e4m3fn"):
            raise ValueError("state dtype float8 needs a torch with float8_e4m3fn")
        self.dtype = dtype

    def encode(self, t: torch.Tensor, amax: float | None = None) -> dict:
        """``amax``: the largest |entry| of the whole tensor when ``t`` is one shard of it (float8
        keeps one scale per tensor, the same on every process); None: that of ``t``."""
        if self.dtype == "float32":
            return {"data": t.float().clone()}
        if self.dtype == "bfloat16":
            return {"data": t.to(torch.bfloat16)}
        if amax is None:
            amax = float(t.abs().max()) if t.numel() else 0.0
        scale = amax / FLOAT8_MAX if amax > 0 else 1.0
        return {"data": (t.float() / scale).to(torch.float8_e4m3fn), "scale": scale}

    def decode(self, stored: dict) -> torch.Tensor:
        # read-only use on the hot path (every step): float32 states come back without a copy
        if "scale" not in stored:
            return stored["data"].float()
        return stored["data"].float() * stored["scale"]

    def bytes_per_element(self) -> int:
        return self.BYTES[self.dtype]


# ---- the optimiser ------------------------------------------------------------------------------

# Bytes per weight of AdamW's two moments: fp32, or 8-bit blockwise-quantised (bitsandbytes; the
# float32 absmax of each 256-entry block adds 2 x 4 / 256).
BNB_BLOCK = 256  # the block of bitsandbytes' blockwise optimiser states
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2 + 8 / BNB_BLOCK}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: a smaller tensor keeps float32 moments


def training_bytes(weight: torch.Tensor, optimizer: str) -> float:
    """Bytes per entry of a trained ``weight``: the weight and its gradient, and AdamW's two
    moments, in the weight's own dtype (a bfloat16 or float16 model trains in it, with no
    float32 master copy, and torch's AdamW keeps its moments in it: counting 4 bytes each
    reported 24 bytes a weight where a bfloat16 run held 16), or bitsandbytes' 8-bit moments
    (float32 for a tensor below its min_8bit_size)."""
    size = weight.element_size()
    if optimizer == "adamw8bit":
        moments = OPTIMIZER_BYTES["adamw8bit"] if weight.numel() >= BNB_MIN_8BIT_SIZE else 8
    else:
        moments = 2 * size
    return 2 * size + moments


def decay_groups(params, weight_decay: float) -> list:
    """AdamW's parameter groups: the decay on matrices only (the prunable linears, and under
    ``train_dense_params`` the embeddings, lm_head and dense linears); the vectors
    (biases, norm scales) train without it, as is usual: decaying a norm's scale towards 0
    shrinks what it normalises, and a bias is no capacity to regularise. A single group where
    the split changes nothing (no decay, or no vector trained), the state dict of runs that
    train only the linears then being that of one group, as before the split."""
    vectors = [p for p in params if p.dim() < 2]
    if weight_decay == 0 or not vectors:
        return [{"params": list(params), "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": vectors, "weight_decay": 0.0}]


def make_optimizer(settings, params):
    groups = decay_groups(params, settings.weight_decay)
    if settings.optimizer == "adamw8bit":
        import bitsandbytes  # checked by SparseTraining.preflight

        return bitsandbytes.optim.AdamW8bit(groups, lr=settings.lr, betas=settings.betas)
    # The fused AdamW (CPU and CUDA) is several times faster than the per-tensor loop on CPU.
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
                for p in params)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, fused=fused)


def second_moment(optimizer, param) -> torch.Tensor | None:
    """Adam's second-moment estimate v of ``param`` (float32), or None before its first step;
    under FSDP this process's rows of it (Adam's states are split like their parameter)."""
    state = optimizer.state.get(param, {})
    if "exp_avg_sq" in state:
        return local(state["exp_avg_sq"])
    if "state2" in state:  # bitsandbytes' 8-bit Adam: v blockwise quantised (float32 for small tensors)
        if state["state2"].dtype.is_floating_point:
            return state["state2"]
        from bitsandbytes.functional import dequantize_blockwise

        return dequantize_blockwise(state["state2"], absmax=state["absmax2"], code=state["qmap2"],
                                    blocksize=BNB_BLOCK).view_as(param)
    return None


# ---- checkpoints -------------------------------------------------------------------------------


def run_settings(config) -> dict:
    """What determines a run's result: a checkpoint resumes only a run with the same values."""
    settings = asdict(config.elsa)
    # where and how often, and how the work is spread (a checkpoint holds full tensors either way)
    for name in ("checkpoint_dir", "checkpoint_every", "fsdp"):
        settings.pop(name)
    if not settings["compile"]:
        settings.pop("compile")  # the key of an eager run stays that of the checkpoints written before the option
    settings["betas"] = list(settings["betas"])
    key = {"method": config.method, "model": _source(config.model), "sparsity": str(config.sparsity),
           "layers": list(config.layers) if config.layers else None, "calib": _source(config.calib),
           "nsamples": config.nsamples, "seqlen": config.seqlen, "seed": config.seed, "dtype": config.dtype,
           "percdamp": config.percdamp, "blocksize": config.blocksize, "elsa": settings}
    # The per-layer patterns (allocation) and the --init prune (sequential, SparseLLM's settings)
    # shape the result too; named only where they differ from the defaults, so that the key of a
    # default run stays that of the checkpoints written before they were part of it.
    if config.allocation != AllocationSettings():
        key["allocation"] = asdict(config.allocation)
    if not config.sequential:
        key["sequential"] = False
    if config.sparsellm != SparseLLMSettings():
        key["sparsellm"] = asdict(config.sparsellm)
    # batch_size is per process: the torchrun job's process count sets the windows of a step too
    # (named only above 1, as the key of a one-process run was before)
    if distributed.launched_processes() > 1:
        key["processes"] = distributed.launched_processes()
    return key


def _exact_text(pattern: SparsityPattern) -> str:
    """A pattern as text that parses back to it exactly (a resume reads the checkpoint's per-layer
    patterns): str() prints six digits, and an allocation's 0.6423476321 came back as 0.642348,
    so the resumed run pruned other counts than the run it resumed."""
    return str(pattern) if pattern.is_nm else repr(pattern.fraction)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the weights a run starts from, which a resume checks: the settings name the
    model by its path, and a caller of the API can pass another model (another fine-tune of
    the same architecture) under the same name. Each parameter's name, shape and float64 sum,
    to six digits (a sum's last bits follow the reduction order, which differs between
    machines and thread counts)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            measurable = param.is_floating_point() and param.device.type != "meta"
            total = float(param.sum(dtype=torch.float64)) if measurable else 0.0
            digest.update(f"{name}{tuple(param.shape)}{total:.6g};".encode())
    return digest.hexdigest()[:16]


def _source(name: str) -> str:
    """A model or text named by a local path is keyed by its resolved path: ./model and
    /work/model (or a link to it) are one run's; a hub name or alias (nothing at that path) as
    given."""
    return os.path.realpath(name) if os.path.exists(name) else name


def _run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _integral(value):
    """``value`` with each float that holds an integer as that int: lambda 1 (a Python caller) and
    1.0 (the command line) are the same setting, which JSON writes two ways."""
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def check_checkpoint_dir(config) -> None:
    """Refuse, before anything loads, a checkpoint folder that holds another run's checkpoint
    (one message naming the settings that differ); nothing there is touched."""
    folder = config.elsa.checkpoint_dir
    if folder is None:
        return
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint dir {folder} is a file")
    # The saved model is published by renaming its staging folder onto --save: checkpoints in
    # that folder made it non-empty, so the publish refused it after the whole training run.
    if getattr(config, "save", None) and folder_holds(config.save, path):
        raise ValueError(f"checkpoint dir {folder} is the --save folder {config.save} or inside it, which the saved "
                         f"model replaces whole; keep the checkpoints elsewhere")
    check_writable(path)  # a file in its way, or no write access: now, not at the first checkpoint
    record = path / CHECKPOINT_RUN
    if not record.exists():
        if (path / CHECKPOINT_STATE).exists():  # the first checkpoint's write was cut between its two files
            raise ValueError(f"checkpoint dir {folder} holds {CHECKPOINT_STATE} without {CHECKPOINT_RUN}, so whose run "
                             "it is cannot be checked; delete it or use another folder")
        return
    try:
        saved = json.loads(record.read_text())["settings"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint dir {folder}: unreadable {CHECKPOINT_RUN} ({exc})") from None
    current = run_settings(config)
    layers = config.layers
    if layers is not None and layers[1] is None and isinstance(saved.get("layers"), list) \
            and saved["layers"][0] == layers[0]:
        # START: runs to the last layer, which the record holds resolved (the model is not loaded
        # yet); the resume checks the resolved range again
        current["layers"] = saved["layers"]
    for name in ("model", "calib"):
        if saved.get(name) == getattr(config, name):  # a record written before paths were resolved
            current[name] = saved[name]
    if _run_key(_integral(saved)) != _run_key(_integral(current)):
        flat_saved, flat_now = _flatten(saved), _flatten(current)
        changed = [f"{k}: {flat_saved.get(k)!r} there, {flat_now.get(k)!r} now"
                   for k in sorted(set(flat_saved) | set(flat_now)) if flat_saved.get(k) != flat_now.get(k)]
        raise ValueError(f"checkpoint dir {folder} holds a different run ({'; '.join(changed)}); "
                         "use another folder, or the same settings to resume")


STATE_KEYS = ("step", "trained", "optimizer", "scheduler", "history", "admm_history", "method", "patterns", "rng")


def _read_state(path: Path) -> dict:
    """A checkpoint's state, or one clear error naming the file (a damaged or foreign file)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"unreadable checkpoint {path} ({type(exc).__name__}: {exc}); delete it or use another "
                         "folder") from None
    missing = [k for k in STATE_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}; delete it or use another folder")
    return saved


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        # a write cut short (a full disk) left a partial file of up to a checkpoint's size
        tmp.unlink(missing_ok=True)


# ---- the training loop shared by Elsa and its baseline ----------------------------------------


class _Target:
    """One prunable matrix: its module, its pattern and its place in the report."""

    def __init__(self, layer: int, name: str, linear: nn.Linear, pattern: SparsityPattern):
        self.layer, self.name, self.linear, self.pattern = layer, name, linear, pattern

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight


class SparseTraining(PruningMethod):
    """Whole-model pruning by training on the calibration text (see the module docs). Subclasses
    set the constraint: :meth:`_start`, :meth:`_before_step`, :meth:`_after_step`,
    :meth:`_finish`, and their checkpointed state. Under FSDP the hooks see the sharded copy's
    targets: their weights and gradients are DTensors, and the hooks work on this process's rows
    (:func:`local`), with :meth:`_project`, :meth:`_encode`, :meth:`_full`, :meth:`_rows` and
    :meth:`_sum` for what needs the whole matrix or all processes."""

    whole_model = True  # trains the whole model at once: runs distributed, --fsdp applies
    settings_groups = ("elsa",)
    solver_settings = ()  # trains the whole model; its --init prune reads that method's

    @classmethod
    def preflight(cls, config):
        check_checkpoint_dir(config)
        if config.elsa.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--optimizer adamw8bit needs bitsandbytes: pip install 'sparsellm[adam8bit]'")

    def __init__(self, config):
        super().__init__(config)
        self.settings = config.elsa
        self.history: list[dict] = []
        self.admm_history: list[dict] = []
        self._details: dict = {}
        self.shards: distributed.Shards | None = None  # set under FSDP

    def details(self) -> dict:
        return self._details

    # -- hooks ----------------------------------------------------------------------------------

    def _start(self, targets: list[_Target]) -> None:
        raise NotImplementedError

    def _before_step(self, targets, optimizer) -> None:
        """Change the gradients after clipping (before the optimiser step)."""

    def _after_step(self, step: int, targets, optimizer) -> None:
        """After the optimiser step ``step`` (0-based)."""

    def _finish(self, targets, optimizer) -> None:
        raise NotImplementedError

    def _state(self, targets) -> dict:
        """The method's state for a checkpoint, as full tensors (under FSDP gathered: a collective)."""
        return {}

    def _load_state(self, state: dict, targets) -> None:
        pass

    # -- one process's rows and the whole matrix (no-ops without FSDP) ------------------------------

    def _project(self, values: torch.Tensor, score: torch.Tensor, target: _Target) -> torch.Tensor:
        """Proj_S of this process's rows ``values`` of ``target``'s matrix, exactly as one process
        projects the whole matrix (the same selection on the same scores)."""
        pattern = target.pattern
        if self.shards is None or pattern.is_nm:  # N:M groups lie within a row: local is exact
            return project(values, score, pattern)
        # Unstructured: the top (1 - s) of the whole matrix. Its scores are gathered (one matrix
        # at a time, a transient full copy of its scores on each process) and the one-process
        # selection runs on them; each process keeps its rows of the mask.
        whole = self.shards.full(score, target.weight)
        mask = ops.flat_prune_mask(whole, pruned_count(whole.numel(), pattern.fraction))
        return values.masked_fill(self.shards.scatter(mask, target.weight, src=None), 0)

    def _encode(self, values: torch.Tensor) -> dict:
        """``store.encode`` of this process's rows, with the whole matrix's float8 scale."""
        amax = None
        if self.shards is not None and self.store.dtype == "float8":
            amax = self.shards.max([float(values.abs().max()) if values.numel() else 0.0])[0]
        return self.store.encode(values, amax)

    def _full(self, part: torch.Tensor, target: _Target) -> torch.Tensor:
        """The whole matrix of which ``part`` holds this process's rows (a collective under FSDP)."""
        return part if self.shards is None else self.shards.full(part, target.weight)

    def _rows(self, whole: torch.Tensor, target: _Target) -> torch.Tensor:
        """This process's rows of a whole matrix (e.g. a loaded z), on its weight's device: a
        checkpoint loads into host memory, and a state left there would cross the bus every step."""
        if self.shards is None:
            return whole.to(target.weight.device)
        return self.shards.scatter(whole, target.weight)

    def _sum(self, values: list[float]) -> list[float]:
        return values if self.shards is None else self.shards.sum(values)

    def _state_bytes_per_param(self) -> float:
        return 0.0

    # -- the loop ---------------------------------------------------------------------------------

    def _layer_patterns(self, model, adapter, calibration) -> dict[int, SparsityPattern]:
        """Each layer's pattern: the target, or the allocation rule's share for it (computed on
        the dense model, before any --init, as a layer-wise run computes it)."""
        if self.config.allocation.rule == "uniform":
            return {}
        from ..driver import LayerDriver, capture_layer_inputs

        driver = LayerDriver(model, adapter, self, self.config)
        inputs, kwargs = capture_layer_inputs(model, adapter, calibration.windows, driver.device)
        return {index: target.pattern for index, target in driver.allocate(inputs, kwargs).items()}

    def _targets(self, adapter, model, patterns: dict[int, SparsityPattern]) -> list[_Target]:
        layers = adapter.layers(model)
        start, stop = self.config.layer_range(len(layers))
        targets = []
        for index in range(start, stop):
            pattern = patterns.get(index, self.config.sparsity)
            for name, linear in adapter.linears(layers[index]).items():
                pattern.check_shape(linear.in_features)
                targets.append(_Target(index, name, linear, pattern))
        return targets

    def _initialise(self, model, adapter, calibration) -> None:
        from . import get_method  # the registry imports this module

        # the layer-wise init runs unsharded, in every process, before any sharding
        init_config = replace(self.config, method=self.settings.init, elsa=replace(self.settings, fsdp=False))
        log.info("%s: starting from %s", self.name, self.settings.init)
        get_method(init_config).prune_model(model, adapter, calibration)

    def prune_model(self, model, adapter, calibration):
        s = self.settings
        device = resolve_device(self.config.device)
        rank, world = distributed.world(device, join_single=s.fsdp)
        # FSDP over the job's processes, also one under torchrun (FSDP2's own code path on one
        # device: the same result, and its cost measurable); without a process group, the ordinary run
        sharded = s.fsdp and dist.is_initialized()
        per_step = s.batch_size * s.grad_accum * world
        folder = Path(s.checkpoint_dir) if s.checkpoint_dir else None
        saved = None
        if folder is not None:
            # the same run, or one clear error; and a folder that can be written: before any work,
            # also where no preflight ran (sparsellm.prune), not at the first checkpoint
            check_checkpoint_dir(self.config)
            self.fingerprint = model_fingerprint(model)  # of the weights as given, before any --init
        if folder is not None and (folder / CHECKPOINT_STATE).exists():
            saved = _read_state(folder / CHECKPOINT_STATE)
            if saved.get("model_fingerprint") not in (None, self.fingerprint):  # (None: written before it)
                raise ValueError(f"checkpoint {folder / CHECKPOINT_STATE} was written for other starting weights "
                                 "than this model's (the settings, model name included, are the same); delete it "
                                 "or use another folder")
            log.info("%s: resuming from step %d of %s", self.name, saved["step"], folder)
            self.patterns = {int(k): SparsityPattern.parse(v) for k, v in saved["patterns"].items()}
        else:
            self.patterns = self._layer_patterns(model, adapter, calibration)
            if s.init is not None:
                self._initialise(model, adapter, calibration)

        targets = self._targets(adapter, model, self.patterns)
        prunable = {id(t.weight) for t in targets}
        trained = [p for p in model.parameters() if id(p) in prunable or
                   (s.train_dense_params and p.dtype.is_floating_point)]
        trained_ids = {id(p) for p in trained}
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained_ids)
        if sharded:
            # Train a sharded copy (rank 0's weights; the original's parameters are freed until
            # the end, when the trained ones are gathered back): its targets and parameters.
            self.shards = distributed.Shards(device)
            net = self.shards.shard(model, adapter.layers)
            names = {id(p): name for name, p in model.named_parameters()}
            by_name = dict(net.named_parameters())
            params = [by_name[names[id(p)]] for p in trained]
            train_targets = self._targets(adapter, net, self.patterns)
        else:
            self.shards = None
            model.to(device)
            if world > 1:  # every process starts from the same weights
                for p in trained:
                    dist.broadcast(p.data, src=0)
            net, params, train_targets = model, trained, targets
        optimizer = make_optimizer(s, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(s.lr_schedule, step, s.steps))
        start_step = 0
        if saved is not None:
            try:
                self._load_checkpoint(saved, params, optimizer, scheduler, train_targets)
            except KeyError as exc:  # the method's own state (z and u, or the masks)
                raise ValueError(f"checkpoint {folder / CHECKPOINT_STATE} lacks {exc} in its state; delete it or "
                                 "use another folder") from None
            start_step = saved["step"]
        else:
            self._start(train_targets)

        was_training = net.training
        net.eval()  # no dropout: deterministic, resumable (see the module docs)
        # the compiled module shares net's parameters: the optimiser, hooks and checkpoints see the same tensors
        forward = torch.compile(net) if s.compile else net
        bar = tqdm(total=s.steps, initial=start_step, desc=f"{self.name} {self.config.sparsity}", unit="step",
                   disable=self.config.quiet or rank != 0)
        started = time.perf_counter()
        try:
            for step in range(start_step, s.steps):
                tick = time.perf_counter()
                windows = calibration.draw(per_step, step)
                loss = self._backward(forward, windows[rank::world], per_step, device)
                if world > 1:
                    if not sharded:  # FSDP's reduce-scatter has summed them already
                        for p in params:
                            dist.all_reduce(p.grad)
                    loss_t = torch.tensor([loss], dtype=torch.float64,
                                          device=device if dist.get_backend() == "nccl" else "cpu")
                    dist.all_reduce(loss_t)
                    loss = float(loss_t)
                self._before_clip(train_targets)
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)  # sharded: the global norm
                self._before_step(train_targets, optimizer)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                info = self._step_info()  # what this step used, before a z-update moves lambda on
                self._after_step(step, train_targets, optimizer)
                seconds = time.perf_counter() - tick
                entry = {"step": step + 1, "loss": loss, "lr": lr, "seconds": seconds,
                         "tokens_per_s": per_step * windows.shape[1] / seconds}
                entry.update(info)
                self.history.append(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", **self._postfix(), tok_s=f"{entry['tokens_per_s']:.0f}")
                if folder is not None and ((step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps):
                    self._save_checkpoint(folder, step + 1, params, optimizer, scheduler, train_targets)
        finally:
            bar.close()
            net.train(was_training)
            for p in model.parameters():
                p.requires_grad_(requires_grad[id(p)])
        self._finish(train_targets, optimizer)
        n_prunable = sum(t.weight.numel() for t in train_targets)  # a DTensor's numel is the whole matrix's
        # bytes per prunable weight: the weight and its gradient, AdamW's two moments (each matrix
        # as it trains: see training_bytes), the method's state
        per_weight = (sum(training_bytes(t.weight, s.optimizer) * t.weight.numel() for t in train_targets)
                      / max(n_prunable, 1) + self._state_bytes_per_param())
        fsdp = {"fsdp": sharded}
        if sharded:
            # each process holds its rows of every prunable matrix and their states: the bytes of
            # the process with the most rows, per prunable weight of the model (about per_weight / N)
            most = self.shards.max([sum(local(t.weight).numel() for t in train_targets)])[0]
            fsdp["state_bytes_per_param_per_process"] = per_weight * most / n_prunable
            self.shards.unshard(model, net)  # the full trained weights, on every process
            del net, params, train_targets, optimizer
        train_seconds = time.perf_counter() - started
        self._details = {
            "steps": s.steps, "resumed_from_step": start_step, "processes": world, **fsdp,
            "windows_per_step": per_step, "tokens_per_step": per_step * calibration.seqlen,
            "train_seconds": train_seconds, "init": s.init, "trained_parameters": sum(p.numel() for p in trained),
            "prunable_parameters": n_prunable,
            "optimizer": s.optimizer, "train_precision": s.train_precision, "compiled": s.compile,
            "state_bytes_per_param": per_weight,
            "loss_curve": [{k: e[k] for k in ("step", "loss", "seconds", *self._step_info()) if k in e}
                           for e in self.history],
            "admm": self.admm_history,
        }
        return self._records(targets)

    def _backward(self, model, windows: torch.Tensor, global_count: int, device) -> float:
        """Backpropagate this process's share of the global mean loss (each window's mean
        next-token NLL, averaged over the step's windows); returns that share's sum."""
        total = torch.zeros((), dtype=torch.float64, device=device)  # read once, after the last micro-batch
        precision = self.settings.train_precision  # tf32: TF32 matmuls on CUDA, forward and backward
        with large_products(device, precision):
            for micro in windows.split(self.settings.batch_size):
                ids = micro.to(device)
                # bfloat16: mixed precision, the forward under autocast (its backward follows it)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                    logits = model(ids, use_cache=False).logits
                # float32, or the model's own where it is wider (a float64 model's loss in float64)
                logits = logits[:, :-1].reshape(-1, logits.shape[-1]).to(solve_dtype(logits.dtype))
                nll = F.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1).mean(1)
                (nll.sum() / global_count).backward()
                total += nll.detach().sum().double()
        return float(total) / global_count

    def _before_clip(self, targets) -> None:
        """Change the loss gradient before clipping (the masked baseline zeroes pruned entries)."""

    def _step_info(self) -> dict:
        return {}

    def _postfix(self) -> dict:
        return {}

    def _save_checkpoint(self, folder: Path, step: int, params, optimizer, scheduler, targets) -> None:
        """Rank 0 writes (atomically) full tensors: under FSDP every process takes part in gathering
        them; after the write all processes wait for it (a resume then reads the same file)."""
        writer = distributed.is_main_process()
        if writer or self.shards is not None:
            state = {"step": step, "trained": [self._whole(p) for p in params],
                     "optimizer": self._whole_optimizer_state(optimizer), "scheduler": scheduler.state_dict(),
                     "history": self.history, "admm_history": self.admm_history, "method": self._state(targets),
                     "patterns": {str(k): _exact_text(v) for k, v in self.patterns.items()},
                     "rng": torch.get_rng_state(), "model_fingerprint": self.fingerprint}
        if writer:
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(folder / CHECKPOINT_STATE, lambda tmp: torch.save(state, tmp))
            settings = run_settings(self.config)
            _atomic_write(folder / CHECKPOINT_RUN, lambda tmp: tmp.write_text(json.dumps(
                {"settings": settings, "key": _run_key(settings), "step": step}, indent=2)))
        if dist.is_initialized():
            dist.barrier()

    def _whole(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU copy of the full tensor (DTensors gathered: a collective)."""
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()

    def _whole_optimizer_state(self, optimizer) -> dict:
        state = optimizer.state_dict()
        if self.shards is None:
            return state
        return {**state, "state": {i: {k: self._whole(v) if isinstance(v, torch.Tensor) else v
                                       for k, v in entry.items()} for i, entry in state["state"].items()}}

    def _load_checkpoint(self, saved: dict, params, optimizer, scheduler, targets) -> None:
        """Weights, optimiser, schedules, history and method state of a checkpoint (under FSDP,
        each process takes its rows of the full tensors)."""
        with torch.no_grad():
            for p, value in zip(params, saved["trained"]):
                if self.shards is None:
                    p.copy_(value.to(p.device))
                else:
                    local(p).copy_(self.shards.scatter(value, p))
        opt_state = saved["optimizer"]
        if self.shards is not None:  # Adam's moments as DTensors split like their parameter
            # The state dict numbers the parameters in the optimiser's group order, not that of
            # ``params``: with weight decay and trained vectors (decay_groups: matrices first) the
            # two differ, and indexing ``params`` left moments as plain tensors beside DTensors.
            ordered = [p for group in optimizer.param_groups for p in group["params"]]
            opt_state = {**opt_state, "state": {
                i: {k: self.shards.distribute(v, ordered[i]) if isinstance(v, torch.Tensor) and
                    v.shape == ordered[i].shape else v for k, v in entry.items()}
                for i, entry in opt_state["state"].items()}}
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(saved["scheduler"])
        self.history, self.admm_history = saved["history"], saved["admm_history"]
        self._load_state(saved["method"], targets)
        torch.set_rng_state(saved["rng"])

    def _records(self, targets) -> list[LayerRecord]:
        records: dict[int, LayerRecord] = {}
        for t in targets:
            record = records.setdefault(t.layer, LayerRecord(index=t.layer))
            if t.layer in self.patterns:
                record.target = {"sparsity": t.pattern.fraction}
            # no layer-wise reconstruction objective here: errors are not measured (null in the report)
            record.matrices[t.name] = {"sparsity": zero_fraction(t.weight), "rel_error": float("nan"),
                                       "numel": t.weight.numel()}
        return [records[i] for i in sorted(records)]


class Elsa(SparseTraining):
    name = "elsa"

    def _start(self, targets):
        self.store = StateStore(self.settings.state_dtype)
        self.lam = lambda_at(self.settings, 0)
        self.admm: dict[int, dict] = {}  # under FSDP: this process's rows of z and u
        for i, t in enumerate(targets):
            w = local(t.weight).detach().float()
            self.admm[i] = {"z": self._encode(self._project(w, w.abs(), t)),
                            "u": self._encode(torch.zeros_like(w))}

    def _state(self, targets):
        admm = {i: {k: {**stored, "data": self._full(stored["data"], targets[i])} for k, stored in entry.items()}
                for i, entry in self.admm.items()}
        return {"lambda": self.lam, "admm": admm, "state_dtype": self.store.dtype}

    def _load_state(self, state, targets):
        self.store = StateStore(state["state_dtype"])
        self.lam = state["lambda"]
        self.admm = {int(i): {k: {**stored, "data": self._rows(stored["data"], targets[int(i)])}
                              for k, stored in entry.items()} for i, entry in state["admm"].items()}

    def _state_bytes_per_param(self):
        return 2 * self.store.bytes_per_element()

    def _before_step(self, targets, optimizer):
        # grad += lambda (w - z + u) over all the matrices at once: multi-tensor kernels (as torch's
        # own optimisers use) where a loop launches three kernels per matrix, which on a GPU bounds
        # the step of a small model (the same arithmetic, element for element)
        with torch.no_grad():
            weights = [local(t.weight).detach() for t in targets]
            grads = [local(t.weight.grad) for t in targets]
            z, u = ([self.store.decode(self.admm[i][k]).to(w.device) for i, w in enumerate(weights)]
                    for k in ("z", "u"))
            proximal = torch._foreach_sub([w.float() for w in weights], z)
            torch._foreach_add_(proximal, u)
            torch._foreach_add_(grads, [p.to(g.dtype) for p, g in zip(proximal, grads)], alpha=self.lam)

    def _after_step(self, step, targets, optimizer):
        if (step + 1) % self.settings.admm_interval or step + 1 >= self.settings.steps:
            return
        new_lam = lambda_at(self.settings, step + 1)
        sums = []  # per matrix: ||w - z||^2, ||w||^2, entries whose kept/pruned state flipped
        count = 0
        with torch.no_grad():
            for i, t in enumerate(targets):
                w = local(t.weight).detach().float()
                u = self.store.decode(self.admm[i]["u"]).to(w.device) * (self.lam / new_lam)
                old_z = self.store.decode(self.admm[i]["z"]).to(w.device)
                v = second_moment(optimizer, t.weight)
                z = self._project(w + u, importance(w + u, v, self.settings.score), t)
                u = u + w - z
                sums.append(torch.stack([(w - z).square().sum().double(), w.square().sum().double(),
                                         ((old_z == 0) != (z == 0)).sum().double()]))
                count += w.numel()
                self.admm[i] = {"z": self._encode(z), "u": self._encode(u)}
            # read once, not three times per matrix (each read waits for the GPU)
            totals = torch.stack(sums).sum(0).tolist() if sums else [0.0, 0.0, 0.0]
        residual, weight, flipped, count = self._sum([*totals, count])  # FSDP: all rows
        entry = {"step": step + 1, "lambda": new_lam, "residual": math.sqrt(residual / max(weight, 1e-30)),
                 "mask_change": flipped / max(count, 1)}
        self.admm_history.append(entry)
        self.lam = new_lam
        log.info("elsa step %d: lambda %.4g, ||w - z|| / ||w|| %.4g, mask change %.4g", step + 1, new_lam,
                 entry["residual"], entry["mask_change"])

    def _step_info(self):
        return {"lambda": self.lam}

    def _postfix(self):
        return {"lam": f"{self.lam:.3g}"}

    def _finish(self, targets, optimizer):
        with torch.no_grad():
            for t in targets:
                weight = local(t.weight)
                # scored in float32 (or wider), the kept weights left exactly as trained
                w = weight.detach().to(solve_dtype(weight.dtype))
                v = second_moment(optimizer, t.weight)
                weight.copy_(self._project(weight.detach(), importance(w, v, self.settings.score), t))


def _check_kept_mask(layer: int, name: str, zeros: float, broken: float, shape, pattern: SparsityPattern) -> None:
    """masked-adam keeps the model's zeros as its mask: they must reach the layer's target."""
    share = zeros / (shape[0] * shape[1])
    # the pruners' own rounding (less than one entry a row) passes; anything less does not
    if broken or not reaches_sparsity(share, pattern.fraction, shape[1]):
        found = f"{int(broken)} groups breaking {pattern}" if broken else f"{share:.2%} zeros"
        raise ValueError(f"masked-adam keeps the model's mask, but layer {layer} {name} has {found} for a "
                         f"target of {pattern}: set --init (e.g. sparsegpt) or pass a model pruned to it")


class MaskedAdam(SparseTraining):
    """The fair baseline of Elsa: the mask of ``init`` (or of the model as given, when it was
    pruned before) kept fixed, the same Adam steps on the same data (pruned entries get no
    gradient and stay zero)."""

    name = "masked-adam"

    def _start(self, targets):
        # The mask is the model's zeros: those of --init, or of a model pruned before (a saved one);
        # under FSDP this process's rows of it.
        # on the weights' device (1 byte a weight): read twice a step, a host copy would cross the bus each time
        self.masks = {i: local(t.weight).detach() == 0 for i, t in enumerate(targets)}
        zeros = self._sum([float(self.masks[i].sum()) for i in range(len(targets))])
        # N:M groups lie within a row, so each process counts its own rows' groups that break the pattern
        broken = self._sum([float(nm_violations(local(t.weight).detach(), t.pattern.n, t.pattern.m))
                            if t.pattern.is_nm else 0.0 for t in targets])
        for i, t in enumerate(targets):
            _check_kept_mask(t.layer, t.name, zeros[i], broken[i], t.weight.shape, t.pattern)

    @classmethod
    def check_model(cls, config, model, adapter):
        """Without --init the model must come pruned: a dense one is refused now, before the
        dense evaluation, where the target of every layer is known (uniform allocation) and no
        checkpoint of this run holds the mask instead."""
        s = config.elsa
        resuming = s.checkpoint_dir is not None and (Path(s.checkpoint_dir) / CHECKPOINT_STATE).exists()
        if s.init is not None or resuming or config.allocation.rule != "uniform":
            return
        layers = adapter.layers(model)
        for index in range(*config.layer_range(len(layers))):
            for name, linear in adapter.linears(layers[index]).items():
                weight = linear.weight.detach()
                broken = nm_violations(weight, config.sparsity.n, config.sparsity.m) if config.sparsity.is_nm else 0
                _check_kept_mask(index, name, float((weight == 0).sum()), float(broken), weight.shape, config.sparsity)

    def _state(self, targets):
        return {"masks": {i: self._full(mask, targets[i]).cpu() for i, mask in self.masks.items()}}

    def _load_state(self, state, targets):
        self.masks = {int(i): self._rows(mask, targets[int(i)]) for i, mask in state["masks"].items()}

    def _before_clip(self, targets):
        for i, t in enumerate(targets):
            grad = local(t.weight.grad)
            grad.masked_fill_(self.masks[i], 0)

    def _after_step(self, step, targets, optimizer):
        with torch.no_grad():  # AdamW's weight decay would move pruned entries: zero them again
            for i, t in enumerate(targets):
                weight = local(t.weight)
                weight.masked_fill_(self.masks[i], 0)

    def _state_bytes_per_param(self):
        return 1  # the boolean mask

    def _finish(self, targets, optimizer):
        self._after_step(-1, targets, optimizer)
