"""LLaMA family: llama, mistral, qwen2, ... (gated SiLU FFN, rotary positions, GQA)."""
from __future__ import annotations

from .base import FFN, AttentionHeads, ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2", "smollm3")
    attention_groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
    ffn_groups = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

    def decoder(self, model):
        return model.model

    def pre_layer_modules(self, model):
        decoder = model.model
        return [m for m in (decoder.embed_tokens, getattr(decoder, "rotary_emb", None)) if m is not None]

    def ffn(self, layer):
        mlp = layer.mlp
        return FFN("swiglu", up=mlp.up_proj, down=mlp.down_proj, gate=mlp.gate_proj)

    def attention(self, layer):
        # The module's forward infers the head count from q's rows (view(..., -1, head_dim)) and
        # takes the query heads per key/value head from its own num_key_value_groups, so a layer
        # can run with fewer query heads than the config says once that attribute is updated.
        attn = layer.self_attn
        return AttentionHeads(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj, head_dim=attn.head_dim,
                              num_kv_heads=attn.k_proj.out_features // attn.head_dim, module=attn)
