"""GreedyDecoder (static KV cache, CUDA-graph replay on a GPU): the tokens equal
``model.generate``'s greedy tokens; its errors."""
import pytest
import torch
from torch import nn

from helpers import tiny_llama, tiny_opt
from sparsellm import ops, reference
from sparsellm.decode import GreedyDecoder
from sparsellm.export import to_sparse_gpu


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


def _step_logits_error(model, dec, prompt, steps):
    """Largest difference, relative to the logits' scale, between each eager decode step's
    logits and a plain forward pass over the whole sequence so far."""
    tokens, step_logits = [dec.ids.clone()], []
    for _ in range(steps):
        step_logits.append(dec._step().clone())
        dec.ids.copy_(step_logits[-1].argmax(-1, keepdim=True))
        dec.position.add_(1)
        tokens.append(dec.ids.clone())
    with torch.no_grad():
        full = model(torch.cat([prompt] + tokens[:-1], dim=1)).logits[0, prompt.shape[1]:]
    return ((full - torch.cat(step_logits)).abs().max() / full.abs().max()).item()


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_warm_up_steps_leave_the_cache_where_it_was(make):
    """The steps run before a CUDA-graph capture advance the static cache's own write counter;
    _warm_up puts it back, so the decode that follows computes the right logits. Without that
    (the graph bug measured on an H200) the next keys land two slots late: the logits move by
    about a tenth of their scale on these models."""
    model = make(seed=3).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    dec = GreedyDecoder(model, max_len=32)
    dec.prefill(prompt)
    counters = [getattr(layer, name).clone() for layer, name in dec._counters()]
    assert counters and all(int(c) == 7 for c in counters)
    dec._warm_up(2)
    assert all(torch.equal(getattr(layer, name), c) for (layer, name), c in zip(dec._counters(), counters))
    assert _step_logits_error(model, dec, prompt, steps=5) < 1e-5
    # the same steps without putting the counters back are wrong: the check above can fail
    dec.prefill(prompt)
    for _ in range(2):
        dec._step()
    assert _step_logits_error(model, dec, prompt, steps=5) > 1e-3


def _sparse_tiny_llama():
    """tiny_llama with layer 0 pruned 2:4 and layer 1 to 90% per row (magnitude), exported with
    to_sparse_gpu: every decoder linear a SparseGPULinear, 7 nm24 and 7 sell."""
    model = tiny_llama(seed=3).eval()
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, nn.Linear) and ".layers." in name:
                w = lin.weight
                if ".layers.0." in name:
                    w.masked_fill_(reference.nm_prune_mask(w.abs(), 2, 4), 0)
                else:
                    w.masked_fill_(reference.row_prune_mask(w.abs(), int(w.shape[1] * 0.9)), 0)
    assert to_sparse_gpu(model)["formats"] == {"nm24": 7, "sell": 7}
    return model


def test_compiled_decoder_with_sparse_linears_matches_generate():
    """compile=True: the tokens are generate's, the step compiles to one graph without a break,
    and the sparse products run at every step as the custom operators (ops counts each call:
    traced through instead, they would run only while tracing)."""
    import torch._dynamo

    model = _sparse_tiny_llama()
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=9, do_sample=False, min_new_tokens=9)[:, 7:]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    ops.reset_usage()
    dec = GreedyDecoder(model, max_len=32, compile=True)
    first = dec.prefill(prompt)
    got = dec.decode(8)
    assert dec.mode == "compiled+eager"
    assert torch.equal(got[:, :1], first)
    assert torch.equal(torch.cat([got, dec.ids], dim=1), want)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    used = ops.usage()
    assert sum(used["nm24_linear"].values()) == sum(used["sell_linear"].values()) == 7 * 8


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


def test_decoding_no_steps_returns_no_tokens_and_negative_steps_are_refused():
    model = tiny_llama().eval()
    dec = GreedyDecoder(model, max_len=8)
    first = dec.prefill(torch.zeros(1, 4, dtype=torch.long))
    none = dec.decode(0)
    assert none.shape == (1, 0) and none.dtype == first.dtype
    with pytest.raises(ValueError, match="steps must be >= 0.*got -1"):
        dec.decode(-1)
    assert torch.equal(dec.decode(1), first)  # neither call moved the decoder on


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_decoder_eager_on_cuda_matches_generate():
    model = tiny_llama(seed=4).to("cuda").eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=13, do_sample=False, min_new_tokens=13)[:, 6:]
    dec = GreedyDecoder(model, max_len=40)
    dec.prefill(prompt)
    assert torch.equal(torch.cat([dec.decode(12), dec.ids], dim=1), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["dense", "sparse", "sparse-compiled"])
def test_greedy_decoder_cuda_graph_is_greedy(dtype, kind):
    """Each token the replayed graph picks is the argmax of a plain forward pass over the whole
    sequence so far (up to rounding: its logit within a tolerance of the maximum), so the graph
    computed the right step at every position, also where a near-tie makes exact token
    equality with another decode a matter of rounding. The same with the sparse kernels
    (to_sparse_gpu), eager and compiled inside the graph; and a second prompt on the same
    decoder replays the same graph from a fresh cache."""
    model = (tiny_llama(seed=4) if kind == "dense" else _sparse_tiny_llama()).to("cuda", dtype).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(1))
    dec = GreedyDecoder(model, max_len=40, graph=True, compile=kind == "sparse-compiled")
    dec.prefill(prompt)
    assert dec.mode.endswith("cuda-graph"), dec.graph_error
    tokens = dec.decode(12)
    dec.prefill(prompt)
    assert torch.equal(dec.decode(12), tokens)
    seq = torch.cat([prompt, tokens, dec.ids], dim=1)
    with torch.no_grad():
        logits = model(seq[:, :-1]).logits[0, prompt.shape[1] - 1:].float()  # predicts seq[6:]
    chosen = logits.gather(1, seq[0, prompt.shape[1]:, None])[:, 0]
    scale = logits.abs().max()
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * scale
    assert torch.isfinite(logits).all()
    assert (chosen >= logits.max(dim=1).values - tol).all(), (chosen, logits.max(dim=1).values)


def _tiny_sliding_mistral(seed=3):
    """A 2-layer Mistral whose attention window (8) is shorter than the decoder's cache: its
    static cache has sliding-window layers, which keep a Python counter beside the tensor one."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    return MistralForCausalLM(config).eval()


def test_sliding_window_cache_warm_up_and_capture():
    """A sliding-window layer picks its write path (in place, or roll once full) by its Python
    cumulative_length_int: the warm-up puts it back (else the window rolled two steps early and
    the tokens left generate's), and no graph is captured (a replay would not advance it)."""
    model = _tiny_sliding_mistral()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 5:]
    dec = GreedyDecoder(model, max_len=32)
    dec.prefill(prompt)
    assert any(not torch.is_tensor(getattr(layer, name)) for layer, name in dec._counters())
    dec._warm_up(2)
    assert torch.equal(torch.cat([dec.decode(19), dec.ids], dim=1), want)
    dec.prefill(prompt)
    dec._capture()  # refused before any warm-up or CUDA call, so it runs on the CPU too
    assert dec.graph is None and "cumulative_length_int" in dec.graph_error
    assert torch.equal(torch.cat([dec.decode(19), dec.ids], dim=1), want)
