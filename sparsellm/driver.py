"""The layer-by-layer driver: executes the methods' plans (see :mod:`sparsellm.plan`).

The one place that moves layers between devices, captures the first decoder layer's inputs,
runs the calibration passes with the statistics a plan asks for, calls the steps' solves,
measures errors and propagates outputs. It knows no method by name or flag. Only one decoder
layer is on the compute device at a time, so a model larger than the device can be pruned.

Per layer, with the method's plan (its steps in data-flow order, e.g. q/k/v, o, gate/up, down):

- sequential (the default): each step's statistic is gathered in its own pass over the
  calibration windows, with the earlier steps already applied, then the step is solved; so the
  FFN is pruned from the pruned attention's output. A step that observes nothing (magnitude)
  needs no pass. Non-sequential: one pass of the dense layer gathers every step's statistic
  (as the Wanda and SparseGPT reference code), then the steps are solved in order.
- The first pass always runs the dense layer and keeps its outputs: the reference for the
  layer's output error. Every other observing pass stops as soon as its observed modules have
  received their inputs (what follows them in the layer is not needed).
- A final pass runs the pruned layer: its outputs are the next layer's inputs, and on the way
  it measures each pruned linear's output error, the FFN's and the layer's, against dense
  copies of the same weights on the same inputs.
"""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function as stage
from tqdm.auto import tqdm

from .allocation import layer_targets
from .config import PruneConfig
from .models import ModelAdapter
from .perplexity import eval_mode
from .placement import on_device
from .plan import LayerView, Statistic, Step
from .sparsity import zero_fraction

if TYPE_CHECKING:
    from .methods import LayerwiseMethod

log = logging.getLogger(__name__)

# Windows go through a layer in batches of about this many tokens: large enough for efficient
# matrix products, small enough that attention activations stay modest.
WINDOW_TOKENS_PER_CALL = 4096


@dataclass
class LayerRecord:
    """What happened to one decoder layer; goes into the JSON report."""

    index: int
    matrices: dict[str, dict] = field(default_factory=dict)  # name -> {sparsity, rel_error, numel}
    ffn_rel_error: float = float("nan")  # ||Y - FFN_pruned(X)|| / ||Y||, X = the FFN's inputs
    output_rel_error: float = float("nan")  # the same for the whole decoder layer
    seconds: float = 0.0
    # moving the layer to the compute device and back home (outside ``seconds``; 0 on the CPU)
    placement_seconds: float = 0.0
    diagnostics: dict = field(default_factory=dict)  # method-specific (e.g. SparseLLM iterations)
    target: dict = field(default_factory=dict)  # what the allocation asked of this layer


class _StopForward(Exception):
    pass


def resolve_device(device: str | None) -> torch.device:
    """The compute device: ``None`` picks cuda when available; an unusable one is a ValueError
    that says why (a CPU build of torch, no visible GPU, an index out of range)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} ({exc}); use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) is a CPU-only build; "
                             "install a CUDA build of torch, or use --device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is visible to torch")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif resolved.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    elif resolved.index not in (None, 0):
        # torch takes cpu:N and places tensors on the one CPU whatever N is: a number that
        # selects nothing is a typo (for cuda:N, most likely), not a choice
        raise ValueError(f"device {device!r}: there is one CPU device; use cpu")
    else:
        resolved = torch.device("cpu")  # cpu:0 is cpu; torch.device("cpu:0") != torch.device("cpu")
    return resolved


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, device: torch.device):
    """Run the embedding part of the model on each window and catch what the first decoder
    layer receives: its hidden states ([n, seqlen, d] on ``device``) and the keyword
    arguments (position embeddings, masks) that are the same for every window. The model runs
    in eval mode (no dropout), as every layer call of the driver."""
    layers = adapter.layers(model)
    first = layers[0]
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach())
        if not kwargs_seen:
            # no KV cache is carried between layer calls ("cache" is its name from transformers 5.24)
            kwargs_seen.update({k: v for k, v in kwargs.items()
                                if k not in ("past_key_values", "cache", "hidden_states")})
            kwargs_seen["use_cache"] = False
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), eval_mode(model), ExitStack() as on_device_now:
            for module in [*adapter.pre_layer_modules(model), first]:  # unchanged: no copy back
                on_device_now.enter_context(on_device(module, device, changed=False))
            for row in windows:
                try:
                    model(row.unsqueeze(0).to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return torch.cat(captured, dim=0), kwargs_seen


class _ErrorMeter:
    """Accumulates ||reference - actual||^2 and ||reference||^2. Squared norms are summed in
    float32 (torch reduces pairwise: about 1e-7 relative) and accumulated in float64 scalars, so
    no float64 copy of a large activation is made."""

    def __init__(self):
        self.err = 0.0
        self.ref = 0.0

    def add(self, reference: torch.Tensor, actual: torch.Tensor) -> None:
        # the sums stay on the device (float64 scalars, the same values as Python floats of
        # the float32 sums) until `relative` reads them: no wait for the GPU per batch
        reference = reference.float()
        self.err += (reference - actual.float()).square().sum().double()
        self.ref += reference.square().sum().double()

    @property
    def relative(self) -> float:
        err, ref = float(self.err), float(self.ref)
        return (err / ref) ** 0.5 if ref > 0 else float("nan")


class LayerDriver:
    """Prunes the decoder layers of one model with one layer-wise method (see the module docs).

    Passes over the calibration windows per pruned layer: one per step that observes data
    (sequential), or one for all steps (non-sequential), at least one (the dense reference),
    plus the final pass. Only the first and the final pass run the whole layer.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, method: "LayerwiseMethod", config: PruneConfig):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.config = config
        self.device = resolve_device(config.device)
        self.targets: dict = {}  # layer index -> LayerTarget (sparsellm.allocation), set by run()

    def _pass(self, layer, inputs, kwargs, hooks=(), outputs: torch.Tensor | None = None, per_batch=None):
        """Run ``layer`` over all windows, a few at a time (to bound activation memory), with
        ``hooks`` installed; store outputs into ``outputs`` (may alias ``inputs``: each batch
        is read before it is overwritten); ``per_batch(rows, out)`` sees each output."""
        step = max(1, WINDOW_TOKENS_PER_CALL // inputs.shape[1])
        with torch.no_grad(), eval_mode(layer), _hooks(list(hooks)):
            for i in range(0, inputs.shape[0], step):
                rows = slice(i, min(i + step, inputs.shape[0]))
                try:
                    out = self.adapter.call_layer(layer, inputs[rows], kwargs)
                except _StopForward:  # a hook has what this pass needs of the batch (see _observe)
                    continue
                if per_batch is not None:
                    per_batch(rows, out)
                if outputs is not None:
                    outputs[rows] = out

    @stage("driver.observe")
    def _observe(self, layer, inputs, kwargs, steps: list[Step], outputs=None) -> list:
        """One pass gathering each step's statistic of its observed module's input; returns
        the statistics' results in the order of ``steps``.

        Without ``outputs`` the rest of the layer is not needed: each batch's forward stops
        as soon as every observed module has received its input (before the last of them
        runs). What was gathered is what the whole forward would have gathered, so the result
        is the same, and a pass observing o_proj, the FFN's input or down_proj skips what
        follows them."""
        stats: list[Statistic | None] = [None] * len(steps)
        observers: dict[int, tuple[nn.Module, list[int]]] = {}  # module id -> (module, its steps)
        for i, step in enumerate(steps):
            observers.setdefault(id(step.observed_module), (step.observed_module, []))[1].append(i)
        seen: set[int] = set()  # the observed modules that have received the current batch

        def observer(module: nn.Module, indices: list[int]):
            def hook(module, args):
                x = args[0].detach()
                for i in indices:
                    if stats[i] is None:
                        stats[i] = steps[i].observe(x.shape[-1], x.device)
                    stats[i].add(x)
                seen.add(id(module))
                if outputs is None and len(seen) == len(observers):
                    raise _StopForward  # caught by _pass: on to the next batch
            return module.register_forward_pre_hook(hook)

        hooks = [layer.register_forward_pre_hook(lambda module, args: seen.clear())]
        hooks += [observer(module, indices) for module, indices in observers.values()]
        self._pass(layer, inputs, kwargs, hooks, outputs=outputs)
        return [stat.result() for stat in stats]

    def layer_view(self, index: int, layer: nn.Module) -> LayerView:
        target = self.targets.get(index)
        structure = target.structure if target is not None else None
        return LayerView(index=index, pattern=target.pattern if target is not None else self.config.sparsity,
                         attention_groups=self.adapter.groups(layer, "attention"),
                         ffn_groups=self.adapter.groups(layer, "ffn"), ffn=self.adapter.ffn(layer),
                         structure=structure,
                         attention=self.adapter.attention(layer) if structure and structure.removes_heads else None)

    def prune_layer(self, index: int, layer: nn.Module, inputs: torch.Tensor, kwargs: dict,
                    outputs: torch.Tensor) -> LayerRecord:
        """Prune one decoder layer; writes the pruned layer's outputs into ``outputs``."""
        record = LayerRecord(index=index)
        start = time.perf_counter()
        view = self.layer_view(index, layer)
        if index in self.targets:
            record.target = self.targets[index].to_dict()
        steps = self.method.plan(view)
        planned = {name: linear for step in steps for name, linear in step.linears.items()}
        # Dense copies of every linear of the layer: the references of the final pass; the FFN's
        # biases too (the dense FFN's reference), which structured pruning zeroes with their channels.
        dense = {id(linear): linear.weight.detach().clone() for group in view.groups for linear in group.values()}
        dense_ffn_biases = {role: None if linear.bias is None else linear.bias.detach().clone()
                            for role, linear in view.ffn.linears().items()}

        dense_out = torch.empty_like(inputs)
        reference_pending = True  # the first pass runs the dense layer and keeps its outputs
        for batch in ([[s] for s in steps] if self.config.sequential else [steps]):
            observing = [s for s in batch if s.observe is not None]
            observed = {}
            if observing or reference_pending:
                # held by ``observed`` alone: each statistic (SparseLLM's: every FFN input token,
                # [N, d]) is released as its step is solved, not kept through the final pass
                observed = dict(zip(map(id, observing), self._observe(layer, inputs, kwargs, observing,
                                                                      outputs=dense_out if reference_pending else None)))
                reference_pending = False
            for step in batch:
                with torch.no_grad(), stage("driver.solve"):
                    diagnostics = step.solve(observed.pop(id(step), None))
                record.diagnostics.update(diagnostics or {})
        if reference_pending:  # a plan without steps still measures (and propagates) the layer
            self._pass(layer, inputs, kwargs, outputs=dense_out)

        linear_errors = self._final_pass(layer, view, planned, dense, dense_ffn_biases, inputs, kwargs, dense_out,
                                         outputs, record)
        for name, linear in planned.items():
            record.matrices[name] = {"sparsity": zero_fraction(linear.weight), "rel_error": linear_errors[name],
                                     "numel": linear.weight.numel()}
        record.seconds = time.perf_counter() - start
        return record

    @stage("driver.final_pass")
    def _final_pass(self, layer, view, planned, dense, dense_ffn_biases, inputs, kwargs, dense_out, outputs, record):
        """Run the pruned layer: its outputs feed the next layer, and its errors against the
        dense references are measured on the same inputs. Returns each planned linear's
        relative output error ||(W - W_p) x|| / ||W x||."""
        ffn = view.ffn
        ffn_meter, layer_meter = _ErrorMeter(), _ErrorMeter()
        meters = {name: _ErrorMeter() for name in planned}
        ffn_inputs: list[torch.Tensor] = []
        ffn_linears = ffn.linears()
        dense_ffn = {role: dense[id(linear)] for role, linear in ffn_linears.items()}
        # This batch's dense up/gate outputs, from the linears' error references: the dense FFN
        # below reuses them instead of computing them again (where the linear has no bias, whose
        # addition would round differently from the fused product's)
        reusable = {id(linear): role for role, linear in ffn_linears.items() if role != "down" and linear.bias is None}
        dense_outputs: dict[str, torch.Tensor] = {}

        def linear_hook(name):
            def hook(module, args, out):
                reference = F.linear(args[0], dense[id(module)])
                if id(module) in reusable:
                    dense_outputs[reusable[id(module)]] = reference
                actual = out if module.bias is None else out - module.bias
                meters[name].add(reference, actual)
            return hook

        def ffn_hook(module, args, out):  # the dense FFN on the same (pruned-attention) inputs
            known = dict(dense_outputs)
            dense_outputs.clear()
            ffn_meter.add(ffn.forward(ffn_inputs.pop(), dense_ffn, known, dense_ffn_biases), out)

        hooks = [linear.register_forward_hook(linear_hook(name)) for name, linear in planned.items()]
        hooks.append(ffn.up.register_forward_pre_hook(lambda module, args: ffn_inputs.append(args[0])))
        hooks.append(ffn.down.register_forward_hook(ffn_hook))
        self._pass(layer, inputs, kwargs, hooks, outputs=outputs,
                   per_batch=lambda rows, out: layer_meter.add(dense_out[rows], out))
        record.ffn_rel_error = ffn_meter.relative
        record.output_rel_error = layer_meter.relative
        return {name: meter.relative for name, meter in meters.items()}

    # -- the whole model ------------------------------------------------------------------------

    def allocate(self, inputs: torch.Tensor, kwargs: dict) -> dict:
        """Each pruned layer's target under the allocation rule and structure (see
        :mod:`sparsellm.allocation`; empty for a uniform unstructured run), from one pass of the
        dense layers over a copy of the first layer's ``inputs``."""
        if self.config.allocation.rule == "uniform" and self.config.structure is None:
            return {}
        layers = self.adapter.layers(self.model)
        start, stop = self.config.layer_range(len(layers))
        hidden = inputs.clone()  # the allocation's pass of the dense layers must not touch inputs
        return layer_targets(self.config, self.model, self.adapter, range(start, stop), device=self.device,
                             run_layer=lambda layer, hooks: self._pass(layer, hidden, kwargs, hooks, outputs=hidden))

    def _asked(self) -> str:
        """What the run asks for, for the progress bar: the pattern, or a structured run's shares
        (its sparsity is the channel share; structure heads has none)."""
        config = self.config
        if config.structure is None:
            return str(config.sparsity)
        return ", ".join(([f"channels {config.sparsity}"] if "channels" in config.structure else [])
                         + ([f"heads {config.head_sparsity:g}"] if "heads" in config.structure else []))

    def run(self, windows: torch.Tensor) -> list[LayerRecord]:
        return list(self.prune_layers(windows))

    def prune_layers(self, windows: torch.Tensor):
        """:meth:`run` one layer at a time: yields each pruned layer's record as soon as that layer
        is done (the first ``next`` also captures the inputs and allocates). Two drivers of two
        model copies can so be advanced in turn, and timed under the same machine conditions
        (``benchmarks/interleaved_ratio.py``)."""
        layers = self.adapter.layers(self.model)
        start, stop = self.config.layer_range(len(layers))
        inputs, kwargs = capture_layer_inputs(self.model, self.adapter, windows, self.device)
        self.targets = self.allocate(inputs, kwargs)
        bar = tqdm(range(stop), desc=f"{self.method.name} {self._asked()}", unit="layer", disable=self.config.quiet)
        for index in bar:
            layer = layers[index]
            moving = time.perf_counter()
            # a layer below the range only propagates: its host weights need no copy back
            with on_device(layer, self.device, changed=index >= start):
                placement = time.perf_counter() - moving
                if index >= start:
                    try:
                        record = self.prune_layer(index, layer, inputs, kwargs, outputs=inputs)
                    except BaseException:  # an error, or an interrupt of a long prune
                        # the model is pruned in place and nothing undoes it: say how far it got
                        done = {0: "", 1: f"layer {start} pruned, "}.get(index - start, f"layers {start}-{index - 1} pruned, ")
                        log.warning("pruning stopped in layer %d: the model is left partly pruned (%slayer %d "
                                    "possibly in part, the others dense)", index, done, index)
                        raise
                    bar.set_postfix(ffn_err=f"{record.ffn_rel_error:.3g}", out_err=f"{record.output_rel_error:.3g}")
                    log.info("layer %d: ffn rel error %.4g, output rel error %.4g (%.1fs)", index,
                             record.ffn_rel_error, record.output_rel_error, record.seconds)
                elif index + 1 < stop:
                    self._pass(layer, inputs, kwargs, outputs=inputs)  # next layer's inputs
                moving = time.perf_counter()
            if index >= start:
                record.placement_seconds = placement + time.perf_counter() - moving
                yield record
