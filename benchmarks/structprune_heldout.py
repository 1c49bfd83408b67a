"""Does the structured refit generalise? FFN errors on the fitted tokens and on other windows.

For some FFNs of the default model (inputs from the dense model, 32 x 512 calibration tokens,
seed 0, against 16 x 512 other windows, seed 1): the local structured OBS at several down
dampenings, and the structured solve after a number of iterations judged on the fitted tokens
only (no held-out selection: ``HELD_OUT_SHARE`` set to 0). What the constants of
sparsellm/methods/structprune.py (HELD_OUT_SHARE, DOWN_DAMPINGS) were chosen from.

    python benchmarks/structprune_heldout.py --layers 3,20 --channels 0.3
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def ffn_inputs(model, adapter, windows, layers) -> dict[int, torch.Tensor]:
    layer_list = adapter.layers(model)
    parts: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [adapter.ffn(layer_list[i]).up.register_forward_pre_hook(
        lambda module, args, i=i: parts[i].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for i in layers]
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    for hook in hooks:
        hook.remove()
    return {i: torch.cat(p) for i, p in parts.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="3,20")
    p.add_argument("--channels", type=float, default=0.3, help="share of FFN channels removed")
    p.add_argument("--dampings", default="0.01,0.1,1.0")
    p.add_argument("--iterations", default="0,2,4,8")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from sparsellm import load_model
    from sparsellm.config import PruneConfig, SparseLLMSettings
    from sparsellm.data.tokens import Calibration
    from sparsellm.methods import structprune
    from sparsellm.models import get_adapter

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality import commit_label, git_state, machine

    # what a stored copy of the output (benchmarks/results/structprune_heldout.txt) must name
    print(f"# python benchmarks/structprune_heldout.py {' '.join(sys.argv[1:] if argv is None else argv)} "
          f"(code of commit {commit_label(git_state())}; {machine(True)})", flush=True)
    model, tokenizer = load_model("smollm2")
    adapter = get_adapter(model)
    layers = [int(i) for i in args.layers.split(",")]
    fit = ffn_inputs(model, adapter, Calibration.sample("wiki", tokenizer, 32, 512, 0).windows, layers)
    held = ffn_inputs(model, adapter, Calibration.sample("wiki", tokenizer, 16, 512, 1).windows, layers)
    structprune.HELD_OUT_SHARE = 0.0  # judge on the fitted tokens, as before held-out selection
    for i in layers:
        ffn = adapter.ffn(adapter.layers(model)[i])
        dense = ffn.dense_copy()
        with torch.no_grad():
            y_fit, y_held = ffn.forward(fit[i], dense).double(), ffn.forward(held[i], dense).double()

        def solve(damping: float, iterations: int) -> tuple[float, float]:
            """Prune the FFN, return its errors on the fitted and the other tokens, restore it."""
            config = PruneConfig(method="structprune", sparsity=args.channels, percdamp=damping,
                                 sparsellm=SparseLLMSettings(iterations=iterations))
            structprune._StructuredFFNSolver(ffn, fit[i], round(args.channels * ffn.down.in_features), config).run()
            with torch.no_grad():
                errors = tuple(float((y - ffn.forward(x).double()).norm() / y.norm())
                               for x, y in ((fit[i], y_fit), (held[i], y_held)))
            for name, weight in dense.items():
                getattr(ffn, name).weight.data.copy_(weight)
            return errors

        rows = [("local structured OBS, dampening %g" % d, *solve(d, 0))
                for d in (float(d) for d in args.dampings.split(","))]
        rows += [(f"structured solve, {k} iterations (kept by fitted-token error)", *solve(0.01, k))
                 for k in (int(k) for k in args.iterations.split(","))]
        print(f"FFN {i}, {args.channels:.0%} of channels: relative error on the fitted tokens / on other windows")
        for label, e_fit, e_held in rows:
            print(f"  {label}: {e_fit:.4f} / {e_held:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
