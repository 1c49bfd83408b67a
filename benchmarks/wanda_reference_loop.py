"""Cross-check of our Wanda against a plain re-statement of the reference loop.

The reference code (locuslab/wanda, ``prune_wanda``) runs one calibration window per layer
call, gathers every linear's input norms from the *dense* layer as a running mean of
per-window squared norms, prunes by a stable sort of |W| * norm within each row, and feeds the
pruned layer's outputs to the next layer. This script does exactly that on our captured
inputs (same model, same windows as ``benchmarks/quality.py``) and prints the perplexity, then
optionally runs our driver (``sequential=False``, the reference's statistics) on a fresh model
and lists the matrices of the first ``--compare-layers`` layers whose masks differ.

    python benchmarks/wanda_reference_loop.py --sparsity 0.7 --json wanda_reference_0.7.json
    python benchmarks/wanda_reference_loop.py --sparsity 0.7 --compare-layers 4 --no-eval

``--json PATH`` writes what it prints (perplexity, mask entries that differ) with the commit,
settings and machine.
"""
from __future__ import annotations

import torch

from sparsellm.precision import solve_dtype
from sparsellm.config import PruneConfig
from sparsellm.driver import LayerDriver, capture_layer_inputs
from sparsellm.methods import get_method

from reference_protocol import (load_protocol, parse_protocol_args, protocol_model, protocol_parser,
                                protocol_perplexity, write_results)


def reference_loop(model, adapter, windows, ratio: float, num_layers: int) -> list[dict[str, torch.Tensor]]:
    """Prune the first ``num_layers`` decoder layers in place; returns their masks."""
    inputs, kwargs = capture_layer_inputs(model, adapter, windows, torch.device("cpu"))
    masks = []
    for layer in adapter.layers(model)[:num_layers]:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        dtype = solve_dtype(inputs.dtype)  # float32, float64 with --float64
        norms_sq = {n: torch.zeros(m.in_features, dtype=dtype) for n, m in linears.items()}
        seen = dict.fromkeys(linears, 0)

        def hook_for(name):
            def hook(module, inp, out):  # the reference's running mean over windows
                x = inp[0].reshape(-1, inp[0].shape[-1]).t().to(dtype)
                norms_sq[name] *= seen[name] / (seen[name] + 1)
                seen[name] += 1
                norms_sq[name] += torch.norm(x, p=2, dim=1) ** 2 / seen[name]
            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
        for j in range(inputs.shape[0]):
            adapter.call_layer(layer, inputs[j:j + 1], kwargs)
        for handle in handles:
            handle.remove()
        layer_masks = {}
        for name, linear in linears.items():
            weight = linear.weight.data
            metric = weight.abs() * torch.sqrt(norms_sq[name]).unsqueeze(0)
            order = torch.sort(metric, dim=-1, stable=True)[1][:, :int(weight.shape[1] * ratio)]
            mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order, True)
            weight[mask] = 0
            layer_masks[name] = mask
        masks.append(layer_masks)
        for j in range(inputs.shape[0]):
            inputs[j:j + 1] = adapter.call_layer(layer, inputs[j:j + 1], kwargs)
    return masks


def main(argv=None) -> None:
    args = parse_protocol_args(protocol_parser(__doc__, 0.7), argv)
    model, tokenizer, adapter, windows, num_layers = load_protocol(args)
    masks = reference_loop(model, adapter, windows, args.sparsity, num_layers)
    results = {}
    if not args.no_eval:
        results["ppl"] = protocol_perplexity(model, tokenizer, args)
        print(f"reference-loop wanda {args.sparsity}: ppl {results['ppl']:.4f}")
    if args.compare_layers:
        ours, _ = protocol_model(args)
        config = PruneConfig(method="wanda", sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                             quiet=True, sequential=False, device="cpu", layers=(0, args.compare_layers))
        LayerDriver(ours, adapter, get_method(config), config).run(windows)
        results["compare"] = []
        for index, layer in enumerate(adapter.layers(ours)[:args.compare_layers]):
            matrices = {}
            for name, linear in layer.named_modules():
                if isinstance(linear, torch.nn.Linear):
                    differ = int(((linear.weight == 0) != masks[index][name]).sum())
                    m = matrices[name] = {"mask_entries_differ": differ, "numel": linear.weight.numel()}
                    print(f"layer {index} {name}: {m['mask_entries_differ']} of {m['numel']} mask entries differ")
            results["compare"].append({"layer": index, "matrices": matrices})
    write_results(args, results)


if __name__ == "__main__":
    main()
