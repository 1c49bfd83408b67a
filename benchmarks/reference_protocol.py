"""What the reference-loop cross-checks share (benchmarks/wanda_reference_loop.py,
benchmarks/sparsegpt_reference_loop.py): their command-line options for the quality protocol
(../shared/PROTOCOL.md), loading the default model with its calibration windows, and their
results file (``--json``)."""
from __future__ import annotations

import argparse
import time

import torch
from quality import git_state, machine, save

from sparsellm import api, data
from sparsellm.config import PruneConfig
from sparsellm.models import get_adapter


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:  # the reference loops prune a share of each block
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1), got {text}")
    return value


def protocol_parser(doc: str, sparsity: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=_fraction, default=sparsity, help="unstructured share pruned, in (0, 1)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--compare-layers", type=int, default=0, help="compare with our driver on this many layers")
    p.add_argument("--no-eval", action="store_true", help="only the first --compare-layers layers, no perplexity")
    p.add_argument("--float64", action="store_true",
                   help="the model and every statistic and solve in float64: takes float32 rounding out of the "
                        "comparison (quality.py --float64 prunes ours the same way)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results here: the printed numbers with the commit, settings and machine")
    return p


def parse_protocol_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, and refuse what would measure nothing: --no-eval without --compare-layers pruned no
    layer and wrote a results file without a number."""
    args = p.parse_args(argv)
    for name in ("nsamples", "seqlen", "eval_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.compare_layers < 0:
        p.error(f"--compare-layers must be at least 0, got {args.compare_layers}")
    if args.no_eval and not args.compare_layers:
        p.error("--no-eval measures only the --compare-layers comparison: give --compare-layers N (N >= 1)")
    return args


def write_results(args, results: dict) -> None:
    """Write ``results`` (the numbers the script printed) to ``args.json``, if given, with the
    commit (quality.git_state), the settings, the machine and the date, as the other benchmarks."""
    if not args.json:
        return
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    save({"git": git_state(), "machine": machine(True), "measured": time.strftime("%Y-%m-%d"),
          "settings": settings, **results}, args.json)


def protocol_model(args):
    """The default model and its tokenizer, the model in float64 with ``--float64``."""
    model, tokenizer = api.load_model("smollm2")
    return (model.double() if args.float64 else model), tokenizer


def load_protocol(args):
    """(model, tokenizer, adapter, calibration windows, layers to prune) for the parsed ``args``."""
    torch.set_grad_enabled(False)
    model, tokenizer = protocol_model(args)
    adapter = get_adapter(model)
    windows = data.calibration_windows("wiki", tokenizer, args.nsamples, args.seqlen, 0)
    num_layers = len(adapter.layers(model)) if not args.no_eval else args.compare_layers
    return model, tokenizer, adapter, windows, num_layers


def protocol_perplexity(model, tokenizer, args) -> float:
    config = PruneConfig(nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=args.eval_windows,
                         quiet=True, device="cpu")
    return api.evaluate(model, tokenizer, config)["wiki"]
