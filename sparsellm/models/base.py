"""The interface every model-family adapter implements.

Nothing outside ``sparsellm/models`` knows a module name such as ``fc1`` or ``gate_proj``:
the driver and the methods see decoder layers, groups of linears that share an input, and an
FFN description (its linears and its activation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FFN:
    """The linears of one FFN block. ``activation`` is "relu" (up -> ReLU -> down) or "swiglu"
    (down(SiLU(gate x) * up x)); biases allowed in both (LLaMA's ``mlp_bias``)."""

    activation: str
    up: nn.Linear
    down: nn.Linear
    gate: nn.Linear | None = None

    def _linear(self, name: str, weights: dict[str, torch.Tensor] | None,
                biases: dict[str, torch.Tensor | None] | None):
        module = getattr(self, name)
        weight = module.weight if weights is None else weights[name]
        bias = module.bias if biases is None else biases[name]
        return lambda t: F.linear(t, weight.to(t.dtype), None if bias is None else bias.to(t.dtype))

    def hidden(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
               known: dict[str, torch.Tensor] | None = None,
               biases: dict[str, torch.Tensor | None] | None = None) -> torch.Tensor:
        """The down projection's input: ReLU(up x) or SiLU(gate x) * up x. ``known`` holds
        outputs of up/gate for ``x`` and these weights that the caller already has (biases
        included): they are used instead of computed again."""
        known = known or {}

        def out(name):
            return known[name] if name in known else self._linear(name, weights, biases)(x)

        if self.activation == "relu":
            return torch.relu(out("up"))
        return F.silu(out("gate")) * out("up")

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
                known: dict[str, torch.Tensor] | None = None,
                biases: dict[str, torch.Tensor | None] | None = None) -> torch.Tensor:
        """The FFN output for inputs ``x`` (..., d), with the current weights or with
        ``weights`` ({"up": W, "down": W, "gate": W}, e.g. a dense copy), and with the modules'
        own biases or with ``biases`` (the same keys, None where a linear has none: a dense
        copy's, where pruning changed them, e.g. the biases of removed channels are zeroed);
        ``known`` as in :meth:`hidden`."""
        return self._linear("down", weights, biases)(self.hidden(x, weights, known, biases))

    def dense_copy(self) -> dict[str, torch.Tensor]:
        return {name: lin.weight.detach().clone() for name, lin in self.linears().items()}

    def linears(self) -> dict[str, nn.Linear]:
        out = {"up": self.up, "down": self.down}
        if self.gate is not None:
            out["gate"] = self.gate
        return out


@dataclass
class AttentionHeads:
    """The linears of one attention block, for removing whole query heads (see
    :mod:`sparsellm.structure`). Query head h reads key/value head h // (num_heads // num_kv_heads)
    (grouped-query attention), and its rows of ``q`` and columns of ``o`` are
    [h * head_dim, (h + 1) * head_dim). ``module`` is the attention module itself."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    module: nn.Module

    # Both counts are read from the projections' current shapes, so they stay true after
    # :func:`sparsellm.structure.compact_attention` shrinks them.
    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


class ModelAdapter:
    """One per model family. Subclasses set ``model_types`` and the name tables."""

    model_types: tuple[str, ...] = ()
    # The config.json fields of the FFN width and of the query-head count (structured pruning
    # rewrites them when every layer keeps the same sizes).
    ffn_size_field: str = "intermediate_size"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str = "num_key_value_heads"
    # Groups of linears in the order they see data; members of a group share one input.
    attention_groups: tuple[tuple[str, ...], ...] = ()
    ffn_groups: tuple[tuple[str, ...], ...] = ()

    def check(self, model: nn.Module) -> None:
        """Refuse (ValueError, NotImplementedError) a model of this family that the driver or the
        methods would get wrong. Layers of different attention types (sliding-window and full, per
        ``config.layer_types``) are refused: the driver runs every layer with the keyword
        arguments (the attention mask) captured at the first one."""
        kinds = set(getattr(model.config, "layer_types", None) or ())
        if len(kinds) > 1:
            raise ValueError(f"layers of different attention types ({', '.join(sorted(kinds))}) are not supported: "
                             "every layer would run with the first layer's attention mask")
        try:
            layers = self.layers(model)
        except AttributeError:  # e.g. AutoModel's LlamaModel: its layers sit one level up, and it has no LM head
            raise ValueError(f"expected a causal LM (AutoModelForCausalLM), got {type(model).__name__}, "
                             "whose decoder layers are not where this family keeps them") from None
        if len(layers) == 0:  # nothing to prune; the families' checks look at the first layer
            raise ValueError("the model has no decoder layers (num_hidden_layers 0): there is nothing to prune")
        for layer in layers[:1]:
            self.ffn(layer)  # a family's FFN that it cannot describe (e.g. OPT's non-ReLU) fails here

    def decoder(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def pre_layer_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that run before the first decoder layer (embeddings, positions, ...)."""
        raise NotImplementedError

    def ffn(self, layer: nn.Module) -> FFN:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> AttentionHeads:
        """The attention block's heads; families whose attention cannot run with fewer heads
        than their config says refuse here."""
        raise NotImplementedError(f"removing attention heads is not supported for {', '.join(self.model_types)} "
                                  "models (only FFN channels)")

    def linear(self, layer: nn.Module, name: str) -> nn.Linear:
        return layer.get_submodule(name)

    def groups(self, layer: nn.Module, part: str) -> list[dict[str, nn.Linear]]:
        """``part`` is "attention" or "ffn": its groups as {qualified name: linear}."""
        names = self.attention_groups if part == "attention" else self.ffn_groups
        return [{name: self.linear(layer, name) for name in group} for group in names]

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Every prunable linear of ``layer`` ({qualified name: linear}), attention then FFN."""
        return {name: linear for part in ("attention", "ffn") for group in self.groups(layer, part)
                for name, linear in group.items()}

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """Run a decoder layer on captured inputs; transformers 5.x layers return a tensor,
        older ones a tuple."""
        out = layer(hidden, **layer_kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out
