"""LLaMA family: llama, mistral, qwen2, ... (gated SiLU FFN, rotary positions, GQA)."""
from __future__ import annotations

from .base import FFN, ModelAdapter


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
