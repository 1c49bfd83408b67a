"""Peak working memory of a prune against model size (issue 11: StructPrune's O(sqrt N) claim).

Random LLaMA-shaped models whose width d and depth L grow together (L = d / 64, FFN 2.6875 d as
in LLaMA-2-7B, head_dim 64, vocabulary 1024 so the decoder holds most of the N parameters),
pruned on the same calibration tokens (random ids; ``--nsamples`` x ``--seqlen``). Each run is
its own process. Its working memory is the prune's peak resident memory *above* what the
process held when the prune started (the model, the calibration ids): Linux's high-water mark
VmHWM is reset through /proc/self/clear_refs just before the prune and read after it. On a GPU
this is what the device would hold (the driver keeps one decoder layer, its inputs and the
method's statistics on the compute device; the model stays on the host), so the growth of this
number with N is the claim under test. The exponent is the slope of log(working memory) over
log(N), least squares over the sizes.

What to expect from the shapes alone: a decoder layer has 4 d^2 + 3 d x 2.6875 d = 12.06 d^2
weights, so with L = d / 64 the model has N ~ 772 d^3 (exponent 2/3 for one layer's weights and
Grams); the per-token buffers (inputs, outputs, the FFN's auxiliaries) grow like d (exponent 1/3)
at a fixed token count. An O(sqrt N) working set needs depth to grow faster than width
(L ~ d^2).

    python benchmarks/structprune_memory.py --methods structprune,sparsegpt --out benchmarks/results/structprune_memory.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quality import commit_label, git_state, machine, save  # noqa: E402

FFN_RATIO = 11008 / 4096  # LLaMA-2-7B's intermediate / hidden
HEAD_DIM = 64
VOCAB = 1024
MMAP_THRESHOLD = 1 << 16  # bytes (see main)


def shape(width: int) -> dict:
    return dict(hidden_size=width, intermediate_size=int(round(width * FFN_RATIO / 32)) * 32,
                num_attention_heads=width // HEAD_DIM, num_key_value_heads=width // HEAD_DIM,
                num_hidden_layers=max(1, width // 64), vocab_size=VOCAB, max_position_embeddings=4096)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def warm_compiled_steps() -> None:
    """Run the solver's element-wise steps once on a call large enough for the compiled backend
    (:mod:`sparsellm._inductor_backend`; the warm-up's one-layer model stays below its size
    threshold). Its first call imports TorchDynamo and TorchInductor and loads the compiled code:
    about 65 MiB once per process (the width-256 StructPrune run: 145 MiB with it, 78 MiB with
    ``SPARSELLM_BACKEND=reference``), a constant that is not the prune's working memory and would
    flatten the fitted exponent."""
    import torch

    from sparsellm import ops
    from sparsellm._inductor_backend import MIN_ELEMENTS

    p, m, s, g = torch.randn(4, 2 * MIN_ELEMENTS // 256, 256, generator=torch.Generator().manual_seed(0)).unbind(0)
    z = ops.swiglu_z_step(p, m, s, 0.5, 0.5)
    ops.swiglu_s_step(s, g, p, z, 0.5, 0.5, 2)


def measure_one(width: int, method: str, sparsity: str, nsamples: int, seqlen: int) -> dict:
    """Prune one random model in this process; returns the memory record."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsellm.config import PruneConfig
    from sparsellm.data.tokens import Calibration
    from sparsellm.methods import get_method
    from sparsellm.models import get_adapter

    def setup(w: int, samples: int):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape(w))).eval()
        windows = torch.randint(0, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(0))
        config = PruneConfig(method=method, sparsity=sparsity, structure="channels" if method == "structprune" else None,
                             nsamples=samples, seqlen=seqlen, device="cpu", quiet=True)
        return model, Calibration("random", None, seqlen, 0, windows), get_method(config)

    def prune(model, calibration, method_obj) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            method_obj.prune_model(model, get_adapter(model), calibration)
        return time.perf_counter() - start

    # A warm-up prune of a one-layer model first: the modules the prune imports lazily and the
    # math libraries' one-off buffers then do not count as working memory of the measured run.
    prune(*setup(64, 2))
    warm_compiled_steps()
    gc.collect()
    model, calibration, method_obj = setup(width, nsamples)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in model.model.layers.parameters())
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident size
    held = _status_kib("VmRSS")
    seconds = prune(model, calibration, method_obj)
    peak = _status_kib("VmHWM")
    return {"width": width, "layers": cfg.num_hidden_layers, "ffn": cfg.intermediate_size, "params": params,
            "decoder_params": decoder, "layer_weight_bytes": 4 * decoder // cfg.num_hidden_layers,
            "model_bytes": 4 * params, "held_bytes": held * 1024, "working_bytes": (peak - held) * 1024,
            "seconds": seconds, "method": method, "sparsity": sparsity}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y over log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def local_exponents(runs: list[dict], method: str) -> list[float]:
    """The slope between each pair of consecutive sizes: where it heads as N grows."""
    mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["params"])
    return [slope([a["params"], b["params"]], [a["working_bytes"], b["working_bytes"]]) for a, b in zip(mine, mine[1:])]


def render(result: dict) -> str:
    lines = [f"Working memory of a prune (peak resident memory above the model, {result['nsamples']} x "
             f"{result['seqlen']} calibration tokens; random LLaMA shapes, L = d / 64, FFN 2.6875 d; float32, "
             f"CPU; commit {commit_label(result['git'])}):", "",
             "| d | L | N (params) | one layer's weights | " + " | ".join(
                 f"{m} working memory" for m in result["methods"]) + " |",
             "|---|---|---|---|" + "---|" * len(result["methods"])]
    by_width: dict[int, dict] = {}
    for r in result["runs"]:
        by_width.setdefault(r["width"], {})[r["method"]] = r
    for width in sorted(by_width):
        row = by_width[width]
        first = next(iter(row.values()))
        cells = [f"{row[m]['working_bytes'] / 2**20:.0f} MiB ({row[m]['working_bytes'] / first['layer_weight_bytes']:.1f} "
                 f"layers)" if m in row else "" for m in result["methods"]]
        lines.append(f"| {width} | {first['layers']} | {first['params'] / 1e6:.1f}M | "
                     f"{first['layer_weight_bytes'] / 2**20:.1f} MiB | " + " | ".join(cells) + " |")
    lines += ["", "Exponent of working memory in N (slope of the log-log fit): " + "; ".join(
        f"{m} {e:.2f}" for m, e in result["exponents"].items()) + f" (one layer's weights: "
        f"{result['layer_exponent']:.2f}; sqrt N would be 0.50). Between consecutive sizes: " + "; ".join(
        f"{m} " + ", ".join(f"{e:.2f}" for e in local_exponents(result["runs"], m)) for m in result["methods"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="128,192,256,384,512,768")
    p.add_argument("--methods", default="structprune,sparsegpt")
    p.add_argument("--sparsity", default="0.5", help="share of FFN channels (structprune) or of weights (the others)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--out", default=os.path.join(HERE, "results", "structprune_memory.json"))
    p.add_argument("--render", action="store_true", help="only print the table of --out")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # WIDTH:METHOD, run in a child process
    args = p.parse_args(argv)
    if args.render:
        with open(args.out) as handle:
            print(render(json.load(handle)))
        return 0
    if args.one:
        width, method = args.one.split(":")
        print(json.dumps(measure_one(int(width), method, args.sparsity, args.nsamples, args.seqlen)))
        return 0
    methods = args.methods.split(",")
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        p.error(f"--widths takes integers, comma-separated, got {args.widths!r}")
    if len(set(widths)) < 2:  # the exponent is a slope over sizes: found now, not after every run
        p.error(f"--widths needs at least two different widths, got {args.widths!r}")
    runs = []
    for width in widths:
        for method in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{width}:{method}", "--sparsity", args.sparsity,
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            # glibc serves blocks above this size with mmap and returns them when freed, so the
            # high-water mark follows the live tensors instead of the allocator's retained arenas
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"d={width} L={r['layers']} N={r['params'] / 1e6:.1f}M {method}: working "
                  f"{r['working_bytes'] / 2**20:.0f} MiB, {r['seconds']:.0f} s", flush=True)
    exponents = {m: slope([r["params"] for r in runs if r["method"] == m],
                          [r["working_bytes"] for r in runs if r["method"] == m]) for m in methods}
    first = [r for r in runs if r["method"] == methods[0]]
    result = {"git": git_state(), "machine": machine(True), "malloc_mmap_threshold": MMAP_THRESHOLD, "nsamples": args.nsamples, "seqlen": args.seqlen, "sparsity": args.sparsity,
              "methods": methods, "runs": runs, "exponents": exponents,
              "layer_exponent": slope([r["params"] for r in first], [r["layer_weight_bytes"] for r in first]),
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save(result, args.out)  # atomic
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
