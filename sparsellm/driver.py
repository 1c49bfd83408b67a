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


class LayerDriver:
    """Prunes the decoder layers of one model with one method."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, method: PruningMethod, config: PruneConfig):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.config = config
        self.device = resolve_device(config.device)

    # -- passes over the calibration windows -------------------------------------------------

    def _run(self, layer, inputs, kwargs, outputs: torch.Tensor | None = None):
        """Run ``layer`` on every window (one at a time, to bound memory); optionally store
        the outputs into ``outputs`` (may alias ``inputs``: each window is read before it is
        overwritten)."""
        with torch.no_grad():
            for i in range(inputs.shape[0]):
                out = self.adapter.call_layer(layer, inputs[i:i + 1], kwargs)
                if outputs is not None:
                    outputs[i:i + 1] = out

    def _gather(self, layer, inputs, kwargs, groups) -> list[InputStats]:
        accumulators = [_GramAccumulator(next(iter(group.values()))) for group in groups]
        with _hooks([a.handle for a in accumulators]):
            self._run(layer, inputs, kwargs)
        return [a.stats() for a in accumulators]

    def _gather_ffn_inputs(self, layer, inputs, kwargs) -> torch.Tensor:
        """All FFN input tokens of this layer, [N, d] (float32)."""
        ffn = self.adapter.ffn(layer)
        chunks: list[torch.Tensor] = []
        handle = ffn.up.register_forward_hook(
            lambda mod, inp, out: chunks.append(inp[0].detach().reshape(-1, inp[0].shape[-1]).float()))
        with _hooks([handle]):
            self._run(layer, inputs, kwargs)
        return torch.cat(chunks)

    # -- pruning --------------------------------------------------------------------------------

    def _prune_group(self, group: dict[str, nn.Linear], stats: InputStats, record: LayerRecord):
        pattern = self.config.sparsity
        for name, linear in group.items():
            dense = linear.weight.detach().float()
            pruned = self.method.prune(dense, stats, pattern)
            self._record_matrix(record, name, dense, pruned, stats.gram)
            linear.weight.data.copy_(pruned.to(linear.weight.dtype))

    @staticmethod
    def _record_matrix(record, name, dense, pruned, gram):
        record.matrices[name] = {
            "sparsity": zero_fraction(pruned),
            "rel_error": _relative_error_from_gram(dense, pruned, gram),
            "numel": pruned.numel(),
        }

    def prune_layer(self, index: int, layer: nn.Module, inputs: torch.Tensor, kwargs: dict) -> LayerRecord:
        record = LayerRecord(index=index)
        start = time.perf_counter()
        dense_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        ffn = self.adapter.ffn(layer)
        dense_ffn = ffn.dense_copy()
        attention = self.adapter.groups(layer, "attention")
        ffn_groups = self.adapter.groups(layer, "ffn")

        if self.method.joint_ffn:
            self._prune_sequential(layer, inputs, kwargs, attention, record)
            x = self._gather_ffn_inputs(layer, inputs, kwargs)
            record.diagnostics = self.method.prune_ffn(ffn, x, self.config.sparsity) or {}
            hidden = ffn.hidden(x)  # what the pruned down projection sees
            grams = {"down": hidden.T @ hidden / hidden.shape[0]}
            del hidden
            for group in ffn_groups:
                for qualified, linear in group.items():
                    name = next(n for n, lin in ffn.linears().items() if lin is linear)
                    gram = grams.get(name)
                    if gram is None:
                        gram = grams.setdefault("input", x.T @ x / x.shape[0])
                    self._record_matrix(record, qualified, dense_ffn[name].float(),
                                        linear.weight.detach().float(), gram)
            del x
        elif self.config.sequential:
            self._prune_sequential(layer, inputs, kwargs, attention + ffn_groups, record)
        else:
            groups = attention + ffn_groups
            for group, stats in zip(groups, self._gather(layer, inputs, kwargs, groups)):
                self._prune_group(group, stats, record)
        self._measure(layer, ffn, dense_state, dense_ffn, inputs, kwargs, record)
        record.seconds = time.perf_counter() - start
        return record

    def _prune_sequential(self, layer, inputs, kwargs, groups, record):
        for group in groups:
            (stats,) = self._gather(layer, inputs, kwargs, [group])
            self._prune_group(group, stats, record)

    def _measure(self, layer, ffn, dense_state, dense_ffn, inputs, kwargs, record):
        """Relative output errors of the pruned FFN and layer against their dense versions on
        the same inputs (the FFN's inputs are those the pruned attention produces)."""
        sums = torch.zeros(4, dtype=torch.float64)
        in_pruned_pass = [False]  # the hook must not fire during the dense pass

        def ffn_hook(module, inp, out):
            if in_pruned_pass[0]:
                x = inp[0].detach()
                dense_y = ffn.forward(x, dense_ffn).double()
                sums[0] += float(((dense_y - ffn.forward(x).double()) ** 2).sum())
                sums[1] += float((dense_y ** 2).sum())

        with torch.no_grad(), _hooks([ffn.up.register_forward_hook(ffn_hook)]):
            for i in range(inputs.shape[0]):
                window = inputs[i:i + 1]
                in_pruned_pass[0] = True
                pruned = self.adapter.call_layer(layer, window, kwargs).double()
                in_pruned_pass[0] = False
                dense = torch.func.functional_call(layer, dense_state, (window,), kwargs)
                dense = (dense[0] if isinstance(dense, (tuple, list)) else dense).double()
                sums[2] += float(((dense - pruned) ** 2).sum())
                sums[3] += float((dense ** 2).sum())
        record.ffn_rel_error = float((sums[0] / sums[1]).sqrt()) if sums[1] > 0 else float("nan")
        record.output_rel_error = float((sums[2] / sums[3]).sqrt()) if sums[3] > 0 else float("nan")

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
                record = self.prune_layer(index, layer, inputs, kwargs)
                records.append(record)
                bar.set_postfix(ffn_err=f"{record.ffn_rel_error:.3g}", out_err=f"{record.output_rel_error:.3g}")
                log.info("layer %d: ffn rel error %.4g, output rel error %.4g (%.1fs)", index,
                         record.ffn_rel_error, record.output_rel_error, record.seconds)
            if index + 1 < stop:
                self._run(layer, inputs, kwargs, outputs=inputs)  # next layer's inputs
            layer.to(home)
        return records
