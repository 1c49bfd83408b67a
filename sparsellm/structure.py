"""Structures removed whole: FFN channels and attention heads; zeroed in place, then removed.

**FFN channel j**: row j of up (and gate, and up's bias) and column j of down. Its whole
contribution to the FFN output is down[:, j] * hidden_j, so once column j of down is zero the
channel can be cut out of all three matrices without changing any output.

**Attention head h**: its rows of q (and q's bias) and its columns of o. Once those columns of o
are zero the head adds nothing to the output, whatever it attends to.

Grouped-query attention (SmolLM2: 9 query heads sharing 3 key/value heads, 3 per group): we
remove *query heads within each key/value group*, the same number from every group of a layer,
and keep every key/value head. Why: (1) the unit is one query head instead of a whole group
(3 heads at once on SmolLM2), so the choice among heads is finer and a weak head never takes
two strong ones with it; (2) k and v are the small projections under GQA (k+v are 2/3 of q's
rows on SmolLM2), so keeping them costs little; (3) removing the same count from every group
keeps the layer a plain GQA layer (num_heads = groups x heads per group), which transformers
runs and, with the same count in every layer, loads from a plain config. A layer keeps at
least one query head per group.

Multi-head attention (one query head per key/value head: LLaMA-1/2, Vicuna) has no head to spare
inside a group, so there the unit is a *whole group*: the query head with its key and value
heads (rows of q, k, v and their biases, columns of o). A layer keeps at least one. The layer
stays a plain MHA layer with fewer heads (num_heads = num_key_value_heads).

Zeroing in place (:func:`zero_channels`, :func:`zero_heads`) keeps every shape, so the driver
measures errors as for any method; :func:`compact_model` then removes what is zero (the
structures whose consuming columns, of down or o, are exactly zero) and records the sizes in
the model's config: the standard fields when every layer has the same sizes and transformers
accepts them (a plain transformers checkpoint; :func:`config_holds_sizes`), and
``sparsellm_layer_sizes`` per layer always, from which :func:`shrink_to_sizes` rebuilds a model
of that shape for :func:`sparsellm.load_pruned`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import FFN, AttentionHeads, ModelAdapter

LAYER_SIZES_FIELD = "sparsellm_layer_sizes"


@dataclass(frozen=True)
class LayerStructure:
    """What one decoder layer is to lose: FFN channels, and query heads per key/value group or
    whole key/value groups (see the module docs; never both)."""

    channels: int = 0
    heads_per_group: int = 0  # query heads removed from every key/value group (grouped-query attention)
    kv_groups: int = 0  # whole key/value groups removed with their query heads (multi-head attention)

    @property
    def removes_heads(self) -> bool:
        return bool(self.heads_per_group or self.kv_groups)


# --------------------------------------------------------------------------------------------
# zeroing in place


def _zero_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight.data[rows] = 0
    if linear.bias is not None:
        linear.bias.data[rows] = 0


def zero_channels(ffn: FFN, channels: torch.Tensor) -> None:
    """Zero FFN channels ``channels`` (indices) in place: rows of up/gate (and up's bias), columns of down."""
    channels = torch.as_tensor(channels, dtype=torch.long, device=ffn.down.weight.device)
    for linear in (ffn.up, ffn.gate):
        if linear is not None:
            _zero_rows(linear, channels)
    ffn.down.weight.data[:, channels] = 0


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The q rows / o columns of query heads ``heads``."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def zero_heads(attention: AttentionHeads, heads: torch.Tensor) -> None:
    """Zero query heads ``heads`` (indices) in place: their rows of q and columns of o."""
    cols = head_columns(heads, attention.head_dim).to(attention.o.weight.device)
    _zero_rows(attention.q, cols)
    attention.o.weight.data[:, cols] = 0


def group_heads(attention: AttentionHeads, groups: torch.Tensor) -> torch.Tensor:
    """The query heads of key/value groups ``groups`` (indices)."""
    groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    return (groups[:, None] * attention.heads_per_group + torch.arange(attention.heads_per_group)).reshape(-1)


def zero_groups(attention: AttentionHeads, groups: torch.Tensor) -> None:
    """Zero whole key/value groups ``groups`` in place: their query heads (:func:`zero_heads`) and
    their rows of k and v. Once o's columns are zero the k/v rows change no output; zeroing them
    makes the weights say what :func:`compact_model` removes."""
    zero_heads(attention, group_heads(attention, groups))
    rows = head_columns(groups, attention.head_dim).to(attention.k.weight.device)
    _zero_rows(attention.k, rows)
    _zero_rows(attention.v, rows)


def removed_channels(ffn: FFN) -> torch.Tensor:
    """Channels whose column of down is exactly zero: they add nothing to the output."""
    return (ffn.down.weight == 0).all(dim=0).nonzero().reshape(-1).cpu()


def removed_heads(attention: AttentionHeads) -> torch.Tensor:
    """Query heads whose columns of o are exactly zero."""
    o = attention.o.weight.reshape(attention.o.out_features, attention.num_heads, attention.head_dim)
    return (o == 0).all(dim=2).all(dim=0).nonzero().reshape(-1).cpu()


# --------------------------------------------------------------------------------------------
# physical removal


def _keep(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Shrink ``linear`` in place to the given rows (outputs) and/or columns (inputs). The
    module object stays the same, so every reference to it (the adapter's views) stays valid."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[rows.to(weight.device)].clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = weight.shape[0]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
        linear.in_features = weight.shape[1]
    linear.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)


def _complement(removed: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().reshape(-1)


def compact_ffn(ffn: FFN, keep: torch.Tensor) -> None:
    """Keep only FFN channels ``keep`` (sorted indices)."""
    for linear in (ffn.up, ffn.gate):
        if linear is not None:
            _keep(linear, rows=keep)
    _keep(ffn.down, cols=keep)


def _kept_groups(attention: AttentionHeads, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The key/value groups that keep query heads ``keep`` and the count each keeps; refuses a
    layer left without heads or keeping different counts in different groups."""
    if len(keep) == 0:
        raise ValueError("a layer would lose every attention head; keep at least one")
    counts = torch.bincount(torch.as_tensor(keep) // attention.heads_per_group, minlength=attention.num_kv_heads)
    kept_groups = counts.nonzero().reshape(-1)
    per_group = int(counts[kept_groups[0]])
    if not (counts[kept_groups] == per_group).all():
        raise ValueError(f"cannot remove query heads unevenly across key/value groups (kept per group: "
                         f"{counts.tolist()}); grouped-query attention needs the same count in every group")
    return kept_groups, per_group


def compact_attention(attention: AttentionHeads, keep: torch.Tensor) -> None:
    """Keep only query heads ``keep`` (sorted indices): the same count in every key/value group
    that keeps any; a group that keeps none loses its key and value heads too."""
    kept_groups, per_group = _kept_groups(attention, keep)
    cols = head_columns(keep, attention.head_dim)
    _keep(attention.q, rows=cols)
    _keep(attention.o, cols=cols)
    if len(kept_groups) < attention.num_kv_heads:
        rows = head_columns(kept_groups, attention.head_dim)
        _keep(attention.k, rows=rows)
        _keep(attention.v, rows=rows)
    attention.module.num_key_value_groups = per_group  # what the attention forward repeats k/v by


def layer_sizes(model: nn.Module, adapter: ModelAdapter) -> dict[str, list[int]]:
    """Per decoder layer: its FFN width and (where heads are supported) its query- and
    key/value-head counts."""
    sizes: dict[str, list[int]] = {"intermediate_size": [], "num_attention_heads": [], "num_key_value_heads": []}
    for layer in adapter.layers(model):
        sizes["intermediate_size"].append(adapter.ffn(layer).down.in_features)
        try:
            attention = adapter.attention(layer)
        except NotImplementedError:
            continue
        sizes["num_attention_heads"].append(attention.num_heads)
        sizes["num_key_value_heads"].append(attention.num_kv_heads)
    return {field: values for field, values in sizes.items() if values}


def _config_takes_heads(config, heads: int) -> bool:
    # transformers' LlamaConfig refuses (on save and on load) a hidden_size that is not a multiple
    # of num_attention_heads, although head_dim is explicit: LLaMA-2-7B at --head-sparsity 0.25
    # keeps 24 heads, and 4096 % 24 != 0
    return config.hidden_size % heads == 0


def config_holds_sizes(config, sizes: dict[str, list[int]]) -> bool:
    """Whether ``config``'s standard fields state every layer's ``sizes`` (:func:`_record_sizes`
    writes them then), so that a plain ``from_pretrained`` builds the model: the same sizes in
    every layer, and a head count that transformers accepts."""
    return is_uniform(sizes) and all(_config_takes_heads(config, h) for h in sizes.get("num_attention_heads", ()))


def _record_sizes(model: nn.Module, adapter: ModelAdapter) -> dict[str, list[int]]:
    """Write the layer sizes into the model's config: per layer always; into the standard fields
    (the FFN width, the head count and, explicitly, head_dim) where every layer agrees and, for
    the heads, transformers accepts the count (else the config keeps the dense head count and
    :func:`shrink_to_sizes` rebuilds the layers)."""
    config = model.config
    sizes = layer_sizes(model, adapter)
    setattr(config, LAYER_SIZES_FIELD, sizes)
    widths = set(sizes["intermediate_size"])
    if len(widths) == 1:
        setattr(config, adapter.ffn_size_field, widths.pop())
    heads = set(sizes.get("num_attention_heads", ()))
    kv_heads = set(sizes.get("num_key_value_heads", ()))
    if len(heads) == 1 and len(kv_heads) == 1 and _config_takes_heads(config, min(heads)):
        # head_dim would otherwise be derived as hidden_size // num_attention_heads
        config.head_dim = adapter.attention(adapter.layers(model)[0]).head_dim
        setattr(config, adapter.heads_field, heads.pop())
        setattr(config, adapter.kv_heads_field, kv_heads.pop())
    return sizes


def is_uniform(sizes: dict[str, list[int]]) -> bool:
    return all(len(set(values)) <= 1 for values in sizes.values())


def compact_model(model: nn.Module, adapter: ModelAdapter) -> dict:
    """Remove every zeroed FFN channel and query head, and every key/value head left without
    query heads (see the module docs), and record the new sizes in ``model.config``. The outputs
    do not change. Returns what was removed per layer, the sizes, whether they are the same in
    every layer (``uniform``) and whether the saved model is a plain transformers checkpoint
    (``plain_checkpoint``; else :func:`sparsellm.load_pruned` loads it)."""
    removed: dict[str, list[int]] = {"channels": [], "heads": [], "key_value_heads": []}
    # Every layer is checked before any is cut: a refusal at a later layer left the earlier ones
    # cut and the config as it was (shapes that no config described).
    plan = []
    for layer in adapter.layers(model):
        ffn = adapter.ffn(layer)
        gone = removed_channels(ffn)
        if len(gone) == ffn.down.in_features:
            raise ValueError("a layer would lose every FFN channel; keep at least one")
        try:
            attention = adapter.attention(layer)
        except NotImplementedError:
            attention = heads = None
        else:
            heads = removed_heads(attention)
            if len(heads):
                _kept_groups(attention, _complement(heads, attention.num_heads))
        plan.append((ffn, gone, attention, heads))
    with torch.no_grad():
        for ffn, gone, attention, heads in plan:
            if len(gone):
                compact_ffn(ffn, _complement(gone, ffn.down.in_features))
            removed["channels"].append(len(gone))
            if attention is None:
                continue
            kv_heads = attention.num_kv_heads
            if len(heads):
                compact_attention(attention, _complement(heads, attention.num_heads))
            removed["heads"].append(len(heads))
            removed["key_value_heads"].append(kv_heads - attention.num_kv_heads)
    removed = {unit: counts for unit, counts in removed.items() if counts}
    sizes = _record_sizes(model, adapter)
    return {"removed": removed, "layer_sizes": sizes, "uniform": is_uniform(sizes),
            "plain_checkpoint": config_holds_sizes(model.config, sizes)}


def shrink_to_sizes(model: nn.Module, adapter: ModelAdapter, sizes: dict[str, list[int]]) -> None:
    """Give a freshly built model (the config's full sizes) the per-layer ``sizes`` recorded by
    :func:`compact_model`, keeping the first channels/heads; its weights are to be loaded next."""
    layers = adapter.layers(model)
    if len(sizes.get("intermediate_size", ())) != len(layers):
        raise ValueError(f"{LAYER_SIZES_FIELD} lists {len(sizes.get('intermediate_size', ()))} layers, "
                         f"the model has {len(layers)}")
    with torch.no_grad():
        for index, layer in enumerate(layers):
            ffn = adapter.ffn(layer)
            compact_ffn(ffn, torch.arange(sizes["intermediate_size"][index]))
            if "num_attention_heads" in sizes:
                attention = adapter.attention(layer)
                heads = sizes["num_attention_heads"][index]
                # checkpoints written before key/value heads could be removed do not list them
                kv_heads = sizes.get("num_key_value_heads", [attention.num_kv_heads] * len(layers))[index]
                keep = group_heads(attention, torch.arange(kv_heads)).reshape(kv_heads, -1)[:, :heads // kv_heads]
                compact_attention(attention, keep.reshape(-1))


# --------------------------------------------------------------------------------------------
# cost


def model_cost(model: nn.Module, adapter: ModelAdapter, context: int) -> dict:
    """Parameters, and matmul FLOPs per token: 2 per weight of every linear (lm_head included,
    embeddings excluded: a lookup), plus attention's scores and weighted sum, 4 x query heads x
    head_dim x the mean context of a ``context``-token window ((context + 1) / 2)."""
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    # q (the first linear of the first attention group) has query heads x head_dim rows
    attention_width = sum(next(iter(adapter.groups(layer, "attention")[0].values())).out_features
                          for layer in adapter.layers(model))
    flops = 2 * linear_weights + 4 * attention_width * (context + 1) / 2
    return {"parameters": sum(p.numel() for p in model.parameters()), "linear_weights": linear_weights,
            "flops_per_token": flops, "context": context}
