"""Prune time of two layer-wise methods, measured layer by layer in turn on one machine.

    python benchmarks/interleaved_ratio.py --methods sparsellm,sparsegpt --sparsity 0.7 --layers 0:15 --json X

(``benchmarks/results/sparsellm_cpu_ratio.json``'s ``interleaved_avx2_3456f80`` holds two such runs.)

Why: the 2-core machines here drift by 10-20% in speed within the hour, so two whole runs one
after the other (``benchmarks/quality.py``, about 9 minutes for the pair) measure the drift as
much as the methods. Here each method prunes its own copy of the model, and the two drivers are
advanced one decoder layer at a time in turn (:meth:`sparsellm.driver.LayerDriver.prune_layers`),
the first method first on even layers and the second first on odd ones: both see the same
machine within seconds. Nothing is shared between the two copies but the calibration windows,
so each copy ends with the weights (and perplexity) of a run of its method alone.

Each method's time is that of ``benchmarks/quality.py``'s ``prune_seconds`` (the calibration
sample, the capture of the first layer's inputs and every layer's prune) but for tokenizing the
calibration text, which a process does once: it is done before either method is timed (in
quality.py each run pays it, a few seconds that pull its ratio towards 1). The JSON holds each
layer's seconds for both methods, the total ratio, the median of the per-layer ratios, and the
perplexities, with the commit, the machine and the settings.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quality import achieved_sparsity, add_text_options, git_state, machine, save, text_sources  # noqa: E402

from sparsellm.cli import parse_layers  # noqa: E402


class _Run:
    """One method on its own copy of the model, advanced a layer at a time."""

    def __init__(self, config):
        from sparsellm import api
        from sparsellm.driver import LayerDriver
        from sparsellm.methods import get_method
        from sparsellm.models import get_adapter

        self.config = config
        self.model, self.tokenizer = api.load_model(config.model)
        adapter = get_adapter(self.model)
        api._check_layers(config, len(adapter.layers(self.model)))  # the API's check of --layers
        self.name = config.method
        self.seconds: list[float] = []  # per step: the first also holds the capture of the inputs
        self.records = []
        self._driver = LayerDriver(self.model, adapter, get_method(self.config), self.config)
        self._layers = None
        self.sample_seconds = 0.0

    def calibration(self):
        from sparsellm import data

        return data.Calibration.sample(self.config.calib, self.tokenizer, self.config.nsamples, self.config.seqlen,
                                       self.config.seed)

    def start(self) -> None:
        start = time.perf_counter()
        windows = self.calibration().windows
        self.sample_seconds = time.perf_counter() - start
        self._layers = self._driver.prune_layers(windows)

    def step(self) -> bool:
        """Prune the next layer; False when none is left."""
        start = time.perf_counter()
        record = next(self._layers, None)
        if record is None:
            return False
        self.seconds.append(time.perf_counter() - start)
        self.records.append(record)
        return True

    def perplexity(self) -> float:
        from sparsellm import api

        return api.evaluate(self.model, self.tokenizer, self.config)[self.config.eval[0]]


def _gram_on_onednn(parser) -> None:
    """Every Gram statistic's float32 accumulation on the CPU through oneDNN's GEMM, as SparseLLM's
    solver products (``--gram-gemm onednn``): both methods' statistics then use the same library."""
    import torch

    from sparsellm import plan
    from sparsellm.methods.sparsellm import Products
    from sparsellm.precision import onednn_gemm_available

    if not onednn_gemm_available():
        parser.error("--gram-gemm onednn: this torch has no oneDNN float32 GEMM")
    torch_add, products = plan.Gram.add, Products("tf32", "onednn")  # float32 products, on oneDNN

    def add(self, x):
        x2 = x.reshape(-1, self.width)
        if x2.device.type != "cpu" or x2.dtype != torch.float32 or self.gram.dtype != torch.float32:
            return torch_add(self, x)
        products.gram_add(self.gram, x2, x2)
        self.tokens += x2.shape[0]

    plan.Gram.add = add


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="sparsellm,sparsegpt", help="two layer-wise methods: A,B (ratio A/B)")
    p.add_argument("--model", default="default", help="the model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sparsity", default="0.7")
    p.add_argument("--layers", default="0:15", type=parse_layers,
                   help="START:STOP range of decoder layers, as sparsellm-prune takes it (':' for all)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--cpu", action="store_true", help="force the CPU even where CUDA is present")
    add_text_options(p)
    p.add_argument("--iterations", type=int, default=None,
                   help="SparseLLM's (and StructPrune's) solver iterations (default: the method's own)")
    p.add_argument("--gram-gemm", choices=("torch", "onednn"), default="torch",
                   help="the library of the Gram statistics every local method gathers (plan.Gram: SparseGPT's "
                        "Hessians, SparseLLM's attention Hessians); onednn is an experiment that gives SparseGPT's "
                        "own products the library SparseLLM's solver takes on the CPU (sparsellm.precision)")
    p.add_argument("--json", default=None, help="write the measurement here (a new file)")
    args = p.parse_args(argv)
    names = args.methods.split(",")
    if len(names) != 2 or names[0] == names[1]:
        p.error(f"--methods takes two methods, different ones (the report keys each one's run by name), got "
                f"{args.methods!r}")
    if args.json and os.path.exists(args.json):
        p.error(f"{args.json} exists: this script writes a new file")

    import torch

    from sparsellm.config import PruneConfig, SparseLLMSettings
    from sparsellm.default_model import ALIASES as DEFAULT_ALIASES
    from sparsellm.methods import METHODS, LayerwiseMethod

    for name in names:
        if name not in METHODS or not issubclass(METHODS[name], LayerwiseMethod):
            p.error(f"{name!r} is not a layer-wise method (choose from "
                    f"{', '.join(n for n, c in METHODS.items() if issubclass(c, LayerwiseMethod))})")
    layers_text = f"{args.layers[0]}:{'' if args.layers[1] is None else args.layers[1]}"
    try:  # bad settings fail here, before a model is loaded
        configs = [PruneConfig(model=args.model, method=name, sparsity=args.sparsity, layers=args.layers,
                               nsamples=args.nsamples, seqlen=args.seqlen, seed=0, calib=args.calib, eval=(args.eval,),
                               eval_windows=args.eval_windows, quiet=True, device="cpu" if args.cpu else None,
                               sparsellm=SparseLLMSettings(iterations=args.iterations))
                   for name in names]
    except ValueError as exc:
        p.error(str(exc))
    if args.gram_gemm == "onednn":
        _gram_on_onednn(p)
    # api.prune seeds the global RNG before a prune; the same here, once for both runs (no
    # layer-wise method draws from it, so interleaving them cannot change what either computes:
    # the perplexities of the JSON equal those of separate runs)
    torch.manual_seed(0)
    try:
        runs = [_Run(config) for config in configs]
    except ValueError as exc:  # a layer range the model does not have
        p.error(str(exc))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs[0].calibration()  # tokenizes the calibration text, once per process: before either is timed
    for run in runs:
        run.start()
    layer = 0
    while True:
        order = runs if layer % 2 == 0 else runs[::-1]
        done = [not run.step() for run in order]
        if any(done):
            if not all(done):
                raise RuntimeError("the two runs prune different numbers of layers")
            break
        print(f"layer {runs[0].records[-1].index}: " + ", ".join(
            f"{run.name} {run.seconds[-1]:.1f}s" for run in runs), flush=True)
        layer += 1

    totals = [run.sample_seconds + sum(run.seconds) for run in runs]
    # per-layer ratios from the second layer on: the first step also captures the inputs, and the
    # first SparseLLM layer compiles the element-wise steps
    per_layer = [a / b for a, b in zip(runs[0].seconds[1:], runs[1].seconds[1:])]
    result = {
        "what": f"prune time of {names[0]} over {names[1]}, the two advanced one decoder layer at a time in turn "
                f"(benchmarks/interleaved_ratio.py)",
        "command": "python benchmarks/interleaved_ratio.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git": git_state(), "started": started, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(args.cpu), "threads": torch.get_num_threads(), "gram_gemm": args.gram_gemm,
        "iterations": args.iterations,  # None: each method's own solver iterations
        "protocol": {"model": "smollm2" if args.model in DEFAULT_ALIASES else args.model, "sparsity": args.sparsity,
                     "layers": layers_text, "nsamples": args.nsamples, "seqlen": args.seqlen,
                     "eval_windows": args.eval_windows, "seed": 0, **text_sources(args)},
        "ratio": totals[0] / totals[1],
        "median_layer_ratio": statistics.median(per_layer) if per_layer else None,
        "runs": {},
    }
    for run, total in zip(runs, totals):
        result["runs"][run.name] = {
            "prune_seconds": total, "sample_seconds": run.sample_seconds, "layer_seconds": run.seconds,
            "ppl": run.perplexity(), "achieved_sparsity": achieved_sparsity(run.records),
            "ffn_rel_error": [r.ffn_rel_error for r in run.records]}
        print(f"{run.name}: prune {total:.1f}s, ppl {result['runs'][run.name]['ppl']:.4f}", flush=True)
    median = result["median_layer_ratio"]  # None where no layer has two timed runs (one pruned layer)
    print(f"ratio {result['ratio']:.3f} (median per layer {'n/a' if median is None else f'{median:.3f}'})", flush=True)
    if args.json:  # a new file (checked above), written whole or not at all
        save(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
