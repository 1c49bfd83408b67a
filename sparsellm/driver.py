"""The layer-by-layer driver.

The one place that moves layers between devices, captures the first decoder layer's inputs,
runs hooks to gather statistics, calls the method, and propagates outputs. Only one decoder
layer is on the compute device at a time, so a model larger than the device can be pruned.

Per layer (``sequential``, the default): for each group of linears sharing an input, in the
order data flows (q/k/v, o, gate/up, down), run the layer over the calibration windows with
the earlier groups already pruned, gather that group's input Gram matrix, prune the group.
So the FFN statistics come from the pruned attention's output. Non-sequential mode gathers
all statistics from one pass of the dense layer (as the Wanda and SparseGPT reference code).
A method with ``joint_ffn`` (SparseLLM) gets the whole FFN with its input tokens instead.
Finally the pruned layer produces the next layer's inputs, and its errors against a dense
copy of itself on the same inputs are measured.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import PruneConfig
from .methods import InputStats, PruningMethod
from .models import ModelAdapter
from .sparsity import zero_fraction

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
    diagnostics: dict = field(default_factory=dict)  # method-specific (e.g. SparseLLM iterations)


class _StopForward(Exception):
    pass


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    arguments (position embeddings, masks) that are the same for every window."""
    layers = adapter.layers(model)
    first = layers[0]
    moved = [m for m in adapter.pre_layer_modules(model)] + [first]
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    for m in moved:
        m.to(device)
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach())
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k not in ("past_key_values", "hidden_states")})
            kwargs_seen["use_cache"] = False
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in windows:
                try:
                    model(row.unsqueeze(0).to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        for m, home in zip(moved, homes):
            m.to(home)
    return torch.cat(captured, dim=0), kwargs_seen


class _GramAccumulator:
    """Forward hook on a linear: accumulates X^T X of its inputs in float32."""

    def __init__(self, module: nn.Linear):
        d = module.in_features
        self.gram = torch.zeros(d, d, dtype=torch.float32, device=module.weight.device)
        self.tokens = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.gram.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def stats(self) -> InputStats:
        self.handle.remove()
        return InputStats(gram=self.gram / max(self.tokens, 1), tokens=self.tokens)


def _relative_error_from_gram(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W_p) X|| / ||W X|| computed from the Gram matrix of X, without X."""
    delta = dense - pruned
    num = (delta @ gram * delta).sum()
    den = (dense @ gram * dense).sum()
    return float((num / den).clamp_min(0).sqrt()) if den > 0 else float("nan")


class _ErrorMeter:
    """Accumulates ||reference - actual||^2 and ||reference||^2 (float64)."""

    def __init__(self):
        self.err = 0.0
        self.ref = 0.0

    def add(self, reference: torch.Tensor, actual: torch.Tensor) -> None:
        reference, actual = reference.double(), actual.double()
        self.err += float(((reference - actual) ** 2).sum())
        self.ref += float((reference ** 2).sum())

    @property
    def relative(self) -> float:
        return (self.err / self.ref) ** 0.5 if self.ref > 0 else float("nan")


class LayerDriver:
    """Prunes the decoder layers of one model with one method.

    Passes over the calibration windows per pruned layer: one per group of linears sharing an
    input (sequential), one for all of them (non-sequential, or a method whose result does not
    depend on its inputs, such as magnitude), or attention groups plus one
    FFN pass (joint-FFN methods); then one final pass that both measures the errors and
    produces the next layer's inputs. The first pass runs the dense layer and keeps its
    outputs as the reference for the layer error; the pass that first reaches the FFN with
    pruned attention and a dense FFN keeps the dense FFN outputs as the FFN reference.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, method: PruningMethod, config: PruneConfig):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.config = config
        self.device = resolve_device(config.device)

    def _pass(self, layer, inputs, kwargs, hooks=(), outputs: torch.Tensor | None = None, per_batch=None):
        """Run ``layer`` over all windows, a few at a time (to bound activation memory), with
        ``hooks`` installed; store outputs into ``outputs`` (may alias ``inputs``: each batch
        is read before it is overwritten); ``per_batch(rows, out)`` sees each output."""
        step = max(1, WINDOW_TOKENS_PER_CALL // inputs.shape[1])
        with torch.no_grad(), _hooks(list(hooks)):
            for i in range(0, inputs.shape[0], step):
                rows = slice(i, min(i + step, inputs.shape[0]))
                out = self.adapter.call_layer(layer, inputs[rows], kwargs)
                if per_batch is not None:
                    per_batch(rows, out)
                if outputs is not None:
                    outputs[rows] = out

    def _record_matrix(self, record, name, dense, pruned, gram):
        record.matrices[name] = {
            "sparsity": zero_fraction(pruned),
            "rel_error": _relative_error_from_gram(dense, pruned, gram),
            "numel": pruned.numel(),
        }

    def _prune_group(self, group: dict[str, nn.Linear], stats: InputStats, record: LayerRecord):
        for name, linear in group.items():
            dense = linear.weight.detach().float()
            pruned = self.method.prune(dense, stats, self.config.sparsity)
            self._record_matrix(record, name, dense, pruned, stats.gram)
            linear.weight.data.copy_(pruned.to(linear.weight.dtype))

    def prune_layer(self, index: int, layer: nn.Module, inputs: torch.Tensor, kwargs: dict,
                    outputs: torch.Tensor) -> LayerRecord:
        """Prune one decoder layer; writes the pruned layer's outputs into ``outputs``."""
        record = LayerRecord(index=index)
        start = time.perf_counter()
        ffn = self.adapter.ffn(layer)
        dense_ffn = ffn.dense_copy()
        attention = self.adapter.groups(layer, "attention")
        ffn_groups = self.adapter.groups(layer, "ffn")
        if self.method.joint_ffn:
            passes = [[g] for g in attention] + [["ffn"]]
        elif self.config.sequential and self.method.uses_inputs:
            passes = [[g] for g in attention + ffn_groups]
        else:
            passes = [attention + ffn_groups]

        # The FFN reference is kept where the FFN first runs after attention was pruned; in a
        # single non-sequential pass there is no such pass and the final pass recomputes it.
        ffn_pass = next((n for n, groups in enumerate(passes) if n > 0 and
                         any(g == "ffn" or g is ffn_groups[0] for g in groups)), None)
        dense_out = torch.empty_like(inputs)
        ffn_reference: list[torch.Tensor] | None = None  # dense FFN outputs per batch
        ffn_inputs: list[torch.Tensor] = []
        for number, groups in enumerate(passes):
            hooks, accumulators = [], []
            for group in groups:
                if group == "ffn":  # the joint-FFN method needs every FFN input token
                    hooks.append(ffn.up.register_forward_hook(
                        lambda mod, inp, out: ffn_inputs.append(inp[0].detach().reshape(-1, inp[0].shape[-1]).float())))
                else:
                    accumulators.append(_GramAccumulator(next(iter(group.values()))))
                    hooks.append(accumulators[-1].handle)
            if number == ffn_pass:
                ffn_reference = []
                hooks.append(ffn.down.register_forward_hook(lambda mod, inp, out: ffn_reference.append(out.detach())))
            self._pass(layer, inputs, kwargs, hooks, outputs=dense_out if number == 0 else None)
            for group, acc in zip([g for g in groups if g != "ffn"], accumulators):
                self._prune_group(group, acc.stats(), record)
            if "ffn" in groups:
                self._prune_joint_ffn(ffn, torch.cat(ffn_inputs), dense_ffn, ffn_groups, record)
                ffn_inputs.clear()

        self._final_pass(layer, ffn, dense_ffn, ffn_reference, inputs, kwargs, dense_out, outputs, record)
        record.seconds = time.perf_counter() - start
        return record

    @torch.no_grad()  # the hidden and its Gram below must not build an autograd graph
    def _prune_joint_ffn(self, ffn, x, dense_ffn, ffn_groups, record):
        record.diagnostics = self.method.prune_ffn(ffn, x, self.config.sparsity) or {}
        hidden = ffn.hidden(x)  # what the pruned down projection sees
        grams = {"down": hidden.T @ hidden / hidden.shape[0], "input": x.T @ x / x.shape[0]}
        del hidden
        for group in ffn_groups:
            for qualified, linear in group.items():
                name = next(n for n, lin in ffn.linears().items() if lin is linear)
                self._record_matrix(record, qualified, dense_ffn[name].float(), linear.weight.detach().float(),
                                    grams["down" if name == "down" else "input"])

    def _final_pass(self, layer, ffn, dense_ffn, ffn_reference, inputs, kwargs, dense_out, outputs, record):
        """Run the pruned layer: its outputs feed the next layer, and its errors against the
        dense references are measured on the same inputs."""
        ffn_meter, layer_meter = _ErrorMeter(), _ErrorMeter()
        references = iter(ffn_reference) if ffn_reference is not None else None
        last_input: list[torch.Tensor] = []

        def ffn_hook(module, inp, out):
            if references is not None:
                reference = next(references)
            else:  # non-sequential: recompute the dense FFN on these (pruned-attention) inputs
                reference = ffn.forward(last_input.pop(), dense_ffn)
            ffn_meter.add(reference, out.detach())

        hooks = [ffn.down.register_forward_hook(ffn_hook)]
        if references is None:
            hooks.append(ffn.up.register_forward_hook(lambda mod, inp, out: last_input.append(inp[0].detach())))
        self._pass(layer, inputs, kwargs, hooks, outputs=outputs,
                   per_batch=lambda rows, out: layer_meter.add(dense_out[rows], out))
        record.ffn_rel_error = ffn_meter.relative
        record.output_rel_error = layer_meter.relative

    # -- the whole model ------------------------------------------------------------------------

    def run(self, windows: torch.Tensor) -> list[LayerRecord]:
        layers = self.adapter.layers(self.model)
        start, stop = self.config.layers or (0, len(layers))
        records: list[LayerRecord] = []
        inputs, kwargs = capture_layer_inputs(self.model, self.adapter, windows, self.device)
        bar = tqdm(range(stop), desc=f"{self.method.name} {self.config.sparsity}", unit="layer",
                   disable=self.config.quiet)
        for index in bar:
            layer = layers[index]
            home = next(layer.parameters()).device
            layer.to(self.device)
            if index >= start:
                record = self.prune_layer(index, layer, inputs, kwargs, outputs=inputs)
                records.append(record)
                bar.set_postfix(ffn_err=f"{record.ffn_rel_error:.3g}", out_err=f"{record.output_rel_error:.3g}")
                log.info("layer %d: ffn rel error %.4g, output rel error %.4g (%.1fs)", index,
                         record.ffn_rel_error, record.output_rel_error, record.seconds)
            elif index + 1 < stop:
                self._pass(layer, inputs, kwargs, outputs=inputs)  # next layer's inputs
            layer.to(home)
        return records
