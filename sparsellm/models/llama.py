"""LLaMA family: llama, mistral, qwen2, ... (gated SiLU FFN, rotary positions, GQA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FFN, AttentionHeads, ModelAdapter

# Where the FFN's activation is compared with SiLU: both tails and the bend.
_PROBE = torch.linspace(-8.0, 8.0, 161)


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2", "smollm3")
    attention_groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
    ffn_groups = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

    def decoder(self, model):
        return model.model

    def pre_layer_modules(self, model):
        decoder = model.model
        return [m for m in (decoder.embed_tokens, getattr(decoder, "rotary_emb", None)) if m is not None]

    def check(self, model):
        super().check(model)
        # The FFN is modelled (SparseLLM's solve, the FFN error) as down(SiLU(gate x) * up x): a
        # LLaMA-architecture model with another hidden_act (e.g. GELU) is refused, not mis-modelled.
        # Once per model (every layer is built from the same hidden_act), not on every ffn() call.
        mlp = self.layers(model)[0].mlp
        device = mlp.gate_proj.weight.device
        # on the model's device: a hub kernel put in place of the activation's forward may take only that
        probe = _PROBE if device.type == "meta" else _PROBE.to(device)
        with torch.no_grad():
            if not torch.allclose(mlp.act_fn(probe), F.silu(probe), rtol=1e-5, atol=1e-6):
                raise NotImplementedError(f"the LLaMA adapter supports SiLU-gated FFNs (hidden_act 'silu') only, "
                                          f"got {type(mlp.act_fn).__name__}")

    def ffn(self, layer):
        mlp = layer.mlp
        return FFN("swiglu", up=mlp.up_proj, down=mlp.down_proj, gate=mlp.gate_proj)

    def attention(self, layer):
        # The module's forward infers the head count from q's rows (view(..., -1, head_dim)) and
        # takes the query heads per key/value head from its own num_key_value_groups, so a layer
        # can run with fewer query heads than the config says once that attribute is updated.
        attn = layer.self_attn
        for name in ("q_norm", "k_norm"):
            # a norm over the whole projection (OLMo-2), not over each head (Qwen3), couples the
            # heads: zeroing one changes the others' scale, so heads cannot be removed
            norm = getattr(attn, name, None)
            weight = getattr(norm, "weight", None)
            if weight is not None and weight.numel() != attn.head_dim:
                raise NotImplementedError(f"removing attention heads is not supported where {name} normalises the "
                                          f"whole projection ({weight.numel()} values, not one head's {attn.head_dim})")
        return AttentionHeads(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj, head_dim=attn.head_dim,
                              module=attn)
