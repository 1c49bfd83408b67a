"""GreedyDecoder (static KV cache, CUDA-graph replay on a GPU): the tokens equal
``model.generate``'s greedy tokens; its errors."""
import pytest
import torch

from helpers import tiny_llama, tiny_opt
from sparsellm.decode import GreedyDecoder


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_greedy_decoder_matches_generate(make):
    model = make(seed=3).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=9, do_sample=False, min_new_tokens=9)[:, 7:]
    dec = GreedyDecoder(model, max_len=32)
    first = dec.prefill(prompt)
    got = dec.decode(8)
    assert dec.mode == "eager"
    assert torch.equal(got[:, :1], first)
    assert torch.equal(torch.cat([got, dec.ids], dim=1), want)
    # a second prompt reuses the cache from scratch
    dec.prefill(prompt)
    assert torch.equal(dec.decode(8), got)


def test_greedy_decoder_errors():
    model = tiny_llama().eval()
    dec = GreedyDecoder(model, max_len=8)
    with pytest.raises(RuntimeError, match="prefill"):
        dec.decode(1)
    with pytest.raises(ValueError, match="no room"):
        dec.prefill(torch.zeros(1, 8, dtype=torch.long))
    dec.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed"):
        dec.decode(5)
    with pytest.raises(ValueError, match="1 x P"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="CUDA"):
        GreedyDecoder(model, max_len=8, graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_decoder_cuda_graph_matches_eager():
    model = tiny_llama(seed=4).to("cuda", torch.float16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), device="cuda")
    eager = GreedyDecoder(model, max_len=40, graph=False)
    eager.prefill(prompt)
    want = eager.decode(12)
    graph = GreedyDecoder(model, max_len=40, graph=True)
    graph.prefill(prompt)
    assert graph.mode == "cuda-graph", graph.graph_error
    assert torch.equal(graph.decode(12), want)
