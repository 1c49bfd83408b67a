"""Shared builders for the tests: tiny random models and correlated synthetic inputs."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 128


def tiny_llama(seed=0, layers=2, kv_heads=2, mlp_bias=False):
    """4 query heads of 16: grouped-query attention (2 per key/value head) by default, multi-head
    attention with ``kv_heads=4``. ``mlp_bias``: gate/up/down with biases, those of gate and up
    N(0, 2), large enough that an FFN solve leaving one out is far off."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=256, mlp_bias=mlp_bias)
    model = LlamaForCausalLM(config).eval()
    if mlp_bias:
        with torch.no_grad():
            for layer in model.model.layers:
                for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
                    linear.bias.normal_(0, 2)
    return model


def tiny_opt(seed=0, layers=2, bias_std=0.0):
    """OPT initialises every bias to zero: ``bias_std`` > 0 draws the linears' biases from
    N(0, bias_std^2), so that a test of bias handling (fc1's bias cut with its channel) can fail."""
    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                       vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=256)
    model = OPTForCausalLM(config).eval()
    if bias_std:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, bias_std)
    return model


def correlated_inputs(tokens, dim, seed=0, outliers=4):
    """Inputs like an LLM layer's: correlated features with a few large-scale columns."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim ** 0.5 + torch.eye(dim)
    x = torch.randn(tokens, dim, generator=g) @ mixing
    scale = torch.ones(dim)
    scale[torch.randperm(dim, generator=g)[:outliers]] = 20.0
    return x * scale
