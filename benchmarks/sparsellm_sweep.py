"""Choose SparseLLM's defaults by a small measured sweep on the default model.

Stage 1 (``layers``): the FFN inputs of the first layers are gathered once, with everything
upstream pruned by sequential SparseGPT at the sweep's sparsity (the protocol's 32 windows x
512 tokens, seed 0), and cached. Each setting then solves the same per-layer FFN problems, so
settings are compared on identical inputs; the signal is the FFN relative error
||Y - FFN(X)|| / ||Y|| against candidate 0 (sequential SparseGPT of the FFN).

Stage 2 (``ppl``): full-model perplexity on the benchmark protocol for chosen settings.

    python benchmarks/sparsellm_sweep.py layers --layers 0,2,4,6,8,10,11 --sparsity 0.7
    python benchmarks/sparsellm_sweep.py ppl --sparsity 0.7 --setting default
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time

import torch
from torch import nn

from sparsellm import api, data
from sparsellm.config import PruneConfig, SparseLLMSettings
from sparsellm.driver import LayerDriver
from sparsellm.methods.sparsellm import SparseLLM
from sparsellm.models import get_adapter
from sparsellm.models.base import FFN

import quality  # benchmarks/quality.py: git_state

# name -> SparseLLMSettings overrides. Only the ratios of alpha, beta, gamma matter.
SETTINGS = {
    "default": {},
    "raw-5-5-5": dict(alpha=5.0, beta=5.0, gamma=5.0, scale_aware=False),  # paper-like, unnormalised
    "sa-1-1-1": dict(alpha=1.0, beta=1.0, gamma=1.0, scale_aware=True),
    "sa-1-1-10": dict(alpha=1.0, beta=1.0, gamma=10.0, scale_aware=True),
    "sa-10-1-1": dict(alpha=10.0, beta=1.0, gamma=1.0, scale_aware=True),
    "sa-1-10-1": dict(alpha=1.0, beta=10.0, gamma=1.0, scale_aware=True),
    "sa-10-1-10": dict(alpha=10.0, beta=1.0, gamma=10.0, scale_aware=True),
    "sa-1-0.1-1": dict(alpha=1.0, beta=0.1, gamma=1.0, scale_aware=True),
    # over-relaxation of the auxiliaries (the default's penalties; "plain" is the default before it)
    "plain": dict(relaxation=1.0, iterations=4),
    "relax-1.3": dict(relaxation=1.3),
    "relax-1.5": dict(relaxation=1.5),
    "relax-1.6": dict(relaxation=1.6),
    "relax-1.7": dict(relaxation=1.7),
    "relax-1.9": dict(relaxation=1.9),
    # the CPU's float32 products on torch's GEMM (MKL) instead of the default's oneDNN
    "torch-gemm": dict(cpu_gemm="torch"),
}

CACHE = os.environ.get("SPARSELLM_SWEEP_CACHE", "/tmp/sparsellm_sweep_inputs")


class _Recorder(SparseLLM):
    """Sequential SparseGPT (iterations=0) that keeps each FFN's dense weights and inputs."""

    def __init__(self, config, keep):
        super().__init__(config)
        self.keep, self.seen, self.saved = keep, 0, {}

    def prune_ffn(self, ffn, x, pattern):
        if self.seen in self.keep:
            self.saved[self.seen] = {"activation": ffn.activation, "x": x.clone(),
                                     "weights": ffn.dense_copy(),
                                     "bias": {k: None if l.bias is None else l.bias.detach().clone()
                                              for k, l in ffn.linears().items()}}
        self.seen += 1
        return super().prune_ffn(ffn, x, pattern)


def gather(layers: list[int], sparsity: str, nsamples: int, seqlen: int) -> dict:
    # keyed by the commit too: inputs gathered by other code are not this commit's (meta names it)
    commit = (quality.git_state().get("commit") or "unknown")[:12]
    stem = f"{CACHE}_{commit}_{sparsity}_{nsamples}x{seqlen}"
    path = f"{stem}_{'-'.join(map(str, layers))}.pt"
    for other in glob.glob(f"{stem}_*.pt"):  # any cache holding these layers
        if set(layers) <= {int(i) for i in other.rsplit("_", 1)[1][:-3].split("-")}:
            return torch.load(other)
    model, tok = api.load_model("smollm2")
    config = PruneConfig(method="sparsellm", sparsity=sparsity, nsamples=nsamples, seqlen=seqlen, quiet=True,
                         layers=(0, max(layers) + 1), sparsellm=SparseLLMSettings(iterations=0))
    windows = data.calibration_windows("wiki", tok, nsamples, seqlen, 0)
    method = _Recorder(config, set(layers))
    LayerDriver(model, get_adapter(model), method, config).run(windows)
    torch.save(method.saved, path)
    return method.saved


def build_ffn(saved) -> FFN:
    linears = {}
    for name, w in saved["weights"].items():
        bias = saved["bias"][name]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        lin.weight.data.copy_(w)
        if bias is not None:
            lin.bias.data.copy_(bias)
        linears[name] = lin
    return FFN(saved["activation"], linears["up"], linears["down"], linears.get("gate"))


def sweep_layers(args):
    layers = [int(i) for i in args.layers.split(",")]
    t = time.perf_counter()
    saved = gather(layers, args.sparsity, args.nsamples, args.seqlen)
    print(f"inputs ready ({time.perf_counter() - t:.0f}s)", flush=True)
    results = {}
    for name in args.settings.split(","):
        settings = dataclasses.replace(SparseLLMSettings(), **SETTINGS[name])
        if args.iterations is not None:
            settings.iterations = args.iterations
        config = PruneConfig(method="sparsellm", sparsity=args.sparsity, sparsellm=settings)
        method = SparseLLM(config)
        rows = {}
        for index in layers:
            ffn = build_ffn(saved[index])
            t = time.perf_counter()
            diag = method.prune_ffn(ffn, saved[index]["x"], config.sparsity)
            rows[index] = {"start": diag["start_ffn_rel_error"], "best": diag["best_ffn_rel_error"],
                           "best_it": diag["best_iteration"], "seconds": time.perf_counter() - t,
                           "iters": [e["ffn_rel_error"] for e in diag["iterations"]]}
            print(name, index, json.dumps({**rows[index], "iters": [round(e, 4) for e in rows[index]["iters"]]}),
                  flush=True)
        results[name] = {"settings": dataclasses.asdict(settings), "layers": rows}
    print("\nsetting      " + " ".join(f"L{i:<7d}" for i in layers) + " mean-ratio  sec")
    start = {i: results[next(iter(results))]["layers"][i]["start"] for i in layers}
    print("sparsegpt    " + " ".join(f"{start[i]:<8.4f}" for i in layers) + " 1.000")
    for name, result in results.items():
        rows = result["layers"]
        ratio = sum(rows[i]["best"] / rows[i]["start"] for i in layers) / len(layers)
        secs = sum(rows[i]["seconds"] for i in layers)
        print(f"{name:<12s} " + " ".join(f"{rows[i]['best']:<8.4f}" for i in layers) + f" {ratio:.4f}  {secs:.0f}")
    if args.out:
        meta = {"commit": quality.git_state(), "sparsity": args.sparsity, "nsamples": args.nsamples,
                "seqlen": args.seqlen, "threads": torch.get_num_threads(), "machine": quality.machine(True),
                "measured": time.strftime("%Y-%m-%d")}
        quality.save({"meta": meta, "settings": results}, args.out)  # atomic


def sweep_ppl(args):
    for name in args.settings.split(","):
        method = "sparsegpt" if name == "sparsegpt" else "sparsellm"
        settings = dataclasses.replace(SparseLLMSettings(), **SETTINGS.get(name, {}))  # sparsegpt: unused
        if args.iterations is not None:
            settings.iterations = args.iterations
        layers = tuple(int(i) for i in args.range.split(":")) if args.range else None
        config = PruneConfig(method=method, sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                             eval=("wiki",), eval_windows=40, quiet=True, sparsellm=settings, layers=layers,
                             eval_dense=False)
        report = api.run(config)
        ffn = [round(r["ffn_rel_error"], 4) for r in report["layer_errors"]]
        print(json.dumps({"setting": name, "sparsity": args.sparsity, "range": args.range,
                          "ppl": report["ppl"]["pruned"],
                          "prune_seconds": report.get("prune_seconds"), "ffn_rel_error": ffn}), flush=True)
        if args.out:  # the run's report, with the commit and machine it came from (the report has neither)
            quality.save({**report, "git": quality.git_state(), "machine": quality.machine(False),
                          "measured": time.strftime("%Y-%m-%d")}, f"{args.out}.{name}.{args.sparsity}.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("layers", "ppl"))
    parser.add_argument("--sparsity", default="0.7")
    parser.add_argument("--layers", default="0,2,4,6,8,10,11")
    parser.add_argument("--settings", default="sa-1-1-1,raw-5-5-5")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--range", default=None, help="ppl stage: decoder layer range start:stop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    known = set(SETTINGS) | ({"sparsegpt"} if args.stage == "ppl" else set())
    unknown = [name for name in args.settings.split(",") if name not in known]
    if unknown:  # the ppl stage ran the defaults under an unknown name; the layers stage failed late
        parser.error(f"unknown --settings {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    try:  # --sparsity, --layers and --range: exit 2 now, not a traceback after gathering the inputs
        layers = [int(i) for i in args.layers.split(",")]
        if min(layers) < 0:
            raise ValueError(f"--layers {args.layers}: negative layer")
        span = tuple(int(i) for i in args.range.split(":")) if args.range else None
        if span is not None and len(span) != 2:
            raise ValueError(f"--range expects START:STOP, got {args.range!r}")
        PruneConfig(method="sparsellm", sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                    layers=span)
    except ValueError as exc:
        parser.error(str(exc))
    with torch.no_grad():  # (not set_grad_enabled(False): main() run in-process leaves grad mode as it was)
        (sweep_layers if args.stage == "layers" else sweep_ppl)(args)


if __name__ == "__main__":
    main()
