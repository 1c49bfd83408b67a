"""pytest-benchmark: sparse inference kernels vs dense.

CPU (always): dense ``F.linear`` vs float32 CSR (:class:`sparsellm.export.CSRLinear`) on a
4096x4096 linear at 70/80/90/95% sparsity, token batches 1/16/128.

GPU (``gpu`` marker, skipped without CUDA / compute capability 8.0): torch 2:4 semi-structured
vs dense in fp16/bf16 on LLaMA-2-7B shapes (4096->4096, 4096->11008, 11008->4096), token
batches 1..4096; and end-to-end prefill / decode tokens/s of a random LLaMA-7B-shaped model,
dense vs 2:4 (``SPARSELLM_BENCH_LAYERS`` shrinks the layer count, default 32).

    pytest benchmarks/bench_export.py                       # measure (CPU part ~1 min)
    pytest benchmarks/bench_export.py --benchmark-disable   # smoke: each case once
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.export import CSRLinear, to_semi_structured

CPU_SIZE = 4096
CPU_SPARSITIES = (0.7, 0.8, 0.9, 0.95)
CPU_TOKENS = (1, 16, 128)

GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (in, out) of LLaMA-2-7B's linears
GPU_TOKENS = (1, 16, 128, 512, 2048, 4096)
GPU_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _has_sparse_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


needs_sparse_gpu = pytest.mark.skipif(not _has_sparse_gpu(), reason="needs CUDA with compute capability >= 8.0")


# ------------------------------------------------------------------------------------------ CPU

_cpu_cache: dict = {}


def _cpu_linear(sparsity):
    """One pruned 4096x4096 linear and its CSR twin per sparsity, built once (conversion
    of a 16M-entry matrix costs more than the matmuls being measured)."""
    if sparsity not in _cpu_cache:
        gen = torch.Generator().manual_seed(0)
        lin = nn.Linear(CPU_SIZE, CPU_SIZE)
        with torch.no_grad():
            lin.weight.masked_fill_(torch.rand(lin.weight.shape, generator=gen) < sparsity, 0)
        _cpu_cache[sparsity] = (lin, CSRLinear(lin))
    return _cpu_cache[sparsity]


@pytest.mark.parametrize("tokens", CPU_TOKENS)
@pytest.mark.parametrize("sparsity", CPU_SPARSITIES)
@pytest.mark.parametrize("impl", ["dense", "csr"])
def test_cpu_linear(benchmark, impl, sparsity, tokens):
    lin, csr = _cpu_linear(sparsity)
    x = torch.randn(tokens, CPU_SIZE, generator=torch.Generator().manual_seed(tokens))
    benchmark.group = f"cpu {CPU_SIZE}x{CPU_SIZE} sparsity={sparsity} tokens={tokens}"
    benchmark.extra_info.update(impl=impl, sparsity=sparsity, tokens=tokens)
    with torch.no_grad():
        fn = (lambda: F.linear(x, lin.weight, lin.bias)) if impl == "dense" else (lambda: csr(x))
        y = benchmark(fn)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ GPU kernels

def _two_four(out_f, in_f, dtype, seed=0):
    """A random weight with exactly 2 zeros in every group of 4 inputs."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen)
    order = torch.rand(out_f, in_f // 4, 4, device="cuda", generator=gen).argsort(-1)
    mask = torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool, device="cuda")
    mask.scatter_(-1, order[..., :2], True)
    return w.masked_fill(mask.reshape(out_f, in_f), 0)


def _cuda_timed(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.gpu
@needs_sparse_gpu
@pytest.mark.parametrize("tokens", GPU_TOKENS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
@pytest.mark.parametrize("impl", ["dense", "2:4"])
def test_gpu_linear(benchmark, impl, dtype, shape, tokens):
    in_f, out_f = shape
    lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=GPU_DTYPES[dtype])
    with torch.no_grad():
        lin.weight.copy_(_two_four(out_f, in_f, GPU_DTYPES[dtype]))
    x = torch.randn(tokens, in_f, device="cuda", dtype=GPU_DTYPES[dtype])
    with torch.no_grad():
        want = lin(x)
        if impl == "2:4":
            holder = nn.Module()
            holder.layers = nn.ModuleList([nn.Module()])
            holder.layers[0].lin = lin
            report = to_semi_structured(holder)
            assert report["n_converted"] == 1, report
        benchmark.group = f"gpu {dtype} {in_f}->{out_f} tokens={tokens}"
        benchmark.extra_info.update(impl=impl, dtype=dtype, tokens=tokens, shape=list(shape))
        got = benchmark(_cuda_timed(lambda: lin(x)))
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-1)


# ------------------------------------------------------------------------------------------ GPU end to end

_e2e: dict = {}


def _llama7b(kind):
    """The dense random LLaMA-7B-shaped model, and a 2:4 copy on semi-structured kernels."""
    if kind not in _e2e:
        if "dense" not in _e2e:
            from transformers import LlamaConfig, LlamaForCausalLM

            layers = int(os.environ.get("SPARSELLM_BENCH_LAYERS", "32"))
            cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
            torch.manual_seed(0)
            with torch.device("cuda"):
                _e2e["dense"] = LlamaForCausalLM(cfg).to(torch.float16).eval()
        if kind == "2:4":
            model = copy.deepcopy(_e2e["dense"])
            with torch.no_grad():  # magnitude 2:4: drop the 2 smallest of every 4 inputs
                for name, mod in model.named_modules():
                    if isinstance(mod, nn.Linear) and ".layers." in name:
                        w = mod.weight
                        groups = w.abs().reshape(w.shape[0], -1, 4)
                        drop = torch.zeros_like(groups, dtype=torch.bool)
                        drop.scatter_(-1, groups.argsort(-1)[..., :2], True)
                        w.masked_fill_(drop.reshape(w.shape), 0)
            report = to_semi_structured(model)
            assert report["n_dense"] == 0, report["dense"]
            _e2e[kind] = model
    return _e2e[kind]


@pytest.mark.gpu
@needs_sparse_gpu
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("impl", ["dense", "2:4"])
def test_gpu_llama7b_tokens_per_s(benchmark, impl, phase):
    from transformers import DynamicCache

    model = _llama7b(impl)
    batch, prompt, steps = 1, 2048 if phase == "prefill" else 128, 64
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=False)
        torch.cuda.synchronize()

    def prompt_cache():
        # untimed (pedantic setup): prefill the prompt, so only the decode steps are measured
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        return (out.past_key_values, out.logits[:, -1:].argmax(-1)), {}

    def decode(cache, nxt):
        with torch.no_grad():
            for _ in range(steps):
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()

    benchmark.group = f"gpu llama-7b-shape fp16 {phase}"
    if phase == "prefill":
        benchmark.pedantic(prefill, rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(decode, setup=prompt_cache, rounds=3)
    tokens = batch * prompt if phase == "prefill" else batch * steps
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats else None
    benchmark.extra_info.update(impl=impl, phase=phase, tokens=tokens,
                                tokens_per_s=tokens / mean if mean else None)
