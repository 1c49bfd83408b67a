"""Model-family adapters: every model type the LLaMA adapter claims prunes, and what an adapter
cannot model is refused before any work instead of being pruned wrongly."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sparsellm.config import PruneConfig
from sparsellm.driver import LayerDriver
from sparsellm.methods import get_method
from sparsellm.models import UnsupportedModel, get_adapter
from sparsellm.models.llama import LlamaAdapter
from sparsellm.structure import compact_model

from helpers import VOCAB


def tiny(model_type, **overrides):
    """A random 2-layer model of ``model_type``: 4 query heads of 16 in 2 key/value groups."""
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                    pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**settings, **overrides})).eval()


def windows(n=4, seqlen=32):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


def prune(model, **settings):
    config = PruneConfig(nsamples=4, seqlen=32, quiet=True, device="cpu", **settings)
    return LayerDriver(model, get_adapter(model), get_method(config), config).run(windows())


@pytest.mark.parametrize("model_type", LlamaAdapter.model_types)
def test_every_claimed_llama_family_type_prunes(model_type):
    """SparseLLM at 50%: every linear of every layer exactly half zero, the errors measured and
    below the dense output's size, and the pruned model's logits finite."""
    model = tiny(model_type)
    records = prune(model, method="sparsellm", sparsity=0.5)
    for record in records:
        assert len(record.matrices) == 7
        assert all(m["sparsity"] == 0.5 for m in record.matrices.values()), record.matrices
        assert 0 < record.ffn_rel_error < 1 and 0 < record.output_rel_error < 1
    with torch.no_grad():
        assert model(windows(2)).logits.isfinite().all()


@pytest.mark.parametrize("model_type", [t for t in LlamaAdapter.model_types if t != "olmo2"])
def test_heads_and_channels_come_out_without_changing_the_outputs(model_type):
    model = tiny(model_type)
    prune(model, method="sparsegpt", sparsity=0.25, structure="channels+heads", head_sparsity=0.5)
    ids = windows(2)
    with torch.no_grad():
        zeroed = model(ids).logits
    info = compact_model(model, get_adapter(model))
    assert info["removed"]["heads"] == [2, 2] and info["removed"]["channels"] == [32, 32]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed, rtol=1e-5, atol=1e-5)


def test_olmo2_heads_are_refused_channels_are_not():
    """OLMo-2 normalises the whole q projection (not each head): zeroing a head would rescale the
    others, so head removal is refused; FFN channels still come out."""
    model = tiny("olmo2")
    with pytest.raises(NotImplementedError, match="q_norm normalises the whole projection"):
        prune(model, method="sparsegpt", structure="heads", head_sparsity=0.5)
    records = prune(model, method="sparsegpt", sparsity=0.25, structure="channels")
    assert [r.target["channels_removed"] for r in records] == [32, 32]


def test_a_llama_model_without_silu_is_refused():
    """SparseLLM's solve and every FFN error model down(SiLU(gate x) * up x): a LLaMA-architecture
    model with another activation is refused when the adapter is made, not pruned wrongly."""
    model = tiny("llama", hidden_act="gelu")
    with pytest.raises(UnsupportedModel, match="SiLU-gated FFNs .* only, got GELUActivation"):
        get_adapter(model)
    assert get_adapter(tiny("llama", hidden_act="swish")) is not None  # SiLU by its other name


def test_layers_of_different_attention_types_are_refused():
    """Sliding-window and full layers in one model would each need their own mask; the driver
    runs every layer with the first one's."""
    model = tiny("qwen2", use_sliding_window=True, max_window_layers=1, sliding_window=16)
    assert len(set(model.config.layer_types)) == 2
    with pytest.raises(UnsupportedModel, match="different attention types"):
        get_adapter(model)


def test_a_base_model_without_its_lm_head_is_refused():
    """AutoModel's LlamaModel/OPTModel (no LM head, the layers one attribute up) is refused with a
    message that says what to load, not an AttributeError from deep in the adapter."""
    for model_type in ("llama", "opt"):
        model = tiny(model_type, **({"ffn_dim": 128, "word_embed_proj_dim": 64} if model_type == "opt" else {}))
        with pytest.raises(UnsupportedModel, match=r"expected a causal LM \(AutoModelForCausalLM\), got "):
            get_adapter(model.model)


def test_a_model_without_decoder_layers_is_refused():
    """num_hidden_layers 0: a clear refusal, not the IndexError of the family check's first layer."""
    for model_type in ("llama", "opt"):
        model = tiny(model_type, num_hidden_layers=0,
                     **({"ffn_dim": 128, "word_embed_proj_dim": 64} if model_type == "opt" else {}))
        with pytest.raises(UnsupportedModel, match="no decoder layers"):
            get_adapter(model)
