"""OPT: fc1 -> ReLU -> fc2 with biases, learned positions."""
from __future__ import annotations

from torch import nn

from .base import FFN, ModelAdapter


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    ffn_size_field = "ffn_dim"
    attention_groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",))
    ffn_groups = (("fc1",), ("fc2",))

    def decoder(self, model):
        return model.model.decoder

    def pre_layer_modules(self, model):
        decoder = model.model.decoder
        mods = [decoder.embed_tokens, decoder.embed_positions, decoder.project_in]
        return [m for m in mods if m is not None]

    def ffn(self, layer):
        if not isinstance(layer.activation_fn, nn.ReLU):
            raise NotImplementedError(f"the OPT adapter supports the ReLU FFN only, got {layer.activation_fn}")
        return FFN("relu", up=layer.fc1, down=layer.fc2)
