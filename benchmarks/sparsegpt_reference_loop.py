"""Cross-check of our SparseGPT against a plain re-statement of the reference loop.

The reference code (IST-DASLab/sparsegpt, ``llama_sequential`` + ``SparseGPT.fasterprune``)
calls each decoder layer on one calibration window at a time; a forward hook on every linear of
the *dense* layer keeps a running mean of its input's Gram matrix (per window:
``H *= n / (n + 1); n += 1; x = sqrt(2 / n) * x; H += x x^T``, float32); then each linear is
pruned on its own: dead inputs (zero diagonal) get ``H_ii = 1`` and a zero weight column,
``H += percdamp * mean(diag H) * I``, ``Hinv`` = upper Cholesky factor of ``H^-1``; per block of
128 columns the mask is ``score <= sorted(score)[int(numel * sparsity)]`` with
``score = w^2 / diag(Hinv_block)^2`` over the whole block, and the columns are swept with the
lazy updates. The pruned layer's outputs (again one window at a time) feed the next layer.

This script does that on our captured inputs (same model, same windows as
``benchmarks/quality.py``) and prints the perplexity. Switches restate one of our choices inside
the reference loop, to measure each alone: ``--gram batched`` (our Gram: sum of X^T X over
windows run through the layer in batches, divided by the token count), ``--mask topk`` (our
mask rule: exactly ``int(numel * sparsity)`` lowest scores). ``--compare-layers N`` also runs our
driver (``sequential=False``) on a fresh model over the first N layers and prints, per matrix,
how many mask entries differ and both relative output errors.

    python benchmarks/sparsegpt_reference_loop.py --sparsity 0.9 --json sparsegpt_reference_0.9.json
    python benchmarks/sparsegpt_reference_loop.py --sparsity 0.9 --compare-layers 4 --no-eval

``--float64`` runs the model, the Hessians and the solves in float64 (``quality.py --float64``
prunes ours the same way): without float32 rounding, ``--mask topk`` and our ``--no-sequential``
driver give the same masks (``--compare-layers``) and perplexities to about 1e-7 (README, Quality).

``--json PATH`` writes what it prints (perplexity, prune seconds, per-layer output errors and
the comparison) with the commit, settings and machine.
"""
from __future__ import annotations

import math
import time

import torch

from sparsellm.precision import solve_dtype
from sparsellm.config import PruneConfig
from sparsellm.driver import WINDOW_TOKENS_PER_CALL, LayerDriver, capture_layer_inputs
from sparsellm.methods import get_method
from sparsellm.models import get_adapter

from reference_protocol import (load_protocol, parse_protocol_args, protocol_model, protocol_parser,
                                protocol_perplexity, write_results)


def reference_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, blocksize: int = 128,
                        percdamp: float = 0.01, mask_rule: str = "le") -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``fasterprune`` (unstructured, no quantizer), restated. Returns
    ``(pruned weight, prune mask)``; neither argument is modified."""
    w_all = weight.detach().to(solve_dtype(weight.dtype), copy=True)  # float32, float64 with --float64
    h = hessian.clone()
    cols = w_all.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w_all[:, dead] = 0
    idx = torch.arange(cols)
    h[idx, idx] += percdamp * torch.mean(torch.diag(h))
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    full_mask = torch.zeros_like(w_all, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        block = w_all[:, b0:b1].clone()
        quantized = torch.zeros_like(block)
        errors = torch.zeros_like(block)
        hb = hinv[b0:b1, b0:b1]
        score = block ** 2 / torch.diag(hb).reshape(1, -1) ** 2
        if mask_rule == "le":  # the reference: the score at index int(numel * sparsity) and all below it
            cut = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            mask = score <= cut
        else:  # ours (sparsellm.reference.flat_prune_mask): exactly int(numel * sparsity) entries
            mask = torch.zeros(score.numel(), dtype=torch.bool)
            mask[torch.topk(score.flatten(), int(score.numel() * sparsity), largest=False).indices] = True
            mask = mask.reshape(score.shape)
        for i in range(b1 - b0):
            w = block[:, i]
            q = w.clone()
            q[mask[:, i]] = 0
            quantized[:, i] = q
            err = (w - q) / hb[i, i]
            block[:, i:] -= err.unsqueeze(1).matmul(hb[i, i:].unsqueeze(0))
            errors[:, i] = err
        w_all[:, b0:b1] = quantized
        w_all[:, b1:] -= errors.matmul(hinv[b0:b1, b1:])
        full_mask[:, b0:b1] = mask
    return w_all, full_mask


def _linears(layer):
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _rel_error(x: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """||x (W - W_p)^T|| / ||x W^T|| over all tokens of ``x``."""
    x = x.reshape(-1, x.shape[-1])
    ref = x @ dense.T
    return float((ref - x @ pruned.T).norm() / ref.norm())


def reference_loop(model, adapter, windows, sparsity: float, num_layers: int, gram: str = "running",
                   mask_rule: str = "le", keep_inputs: int = 0, log_every: int = 0, reverse: bool = False):
    """Prune the first ``num_layers`` decoder layers in place. Returns per layer
    ``{name: (mask, rel_error)}``, for the first ``keep_inputs`` layers each linear's inputs on
    the calibration windows, and per layer the output error ||pruned - dense|| / ||dense|| of the
    layer on its (already pruned-upstream) inputs, as our driver's ``output_rel_error``."""
    if reverse:  # the same windows in the opposite order: the same statistics up to rounding
        windows = windows.flip(0)
    inputs, kwargs = capture_layer_inputs(model, adapter, windows, torch.device("cpu"))
    per_layer, kept, layer_errors = [], [], []
    batch = max(1, WINDOW_TOKENS_PER_CALL // inputs.shape[1])
    for index, layer in enumerate(adapter.layers(model)[:num_layers]):
        start = time.perf_counter()
        linears = _linears(layer)
        dtype = solve_dtype(inputs.dtype)  # float32, float64 with --float64
        hess = {n: torch.zeros(m.in_features, m.in_features, dtype=dtype) for n, m in linears.items()}
        seen = dict.fromkeys(linears, 0)
        xs = {n: [] for n in linears}

        def hook_for(name):
            def hook(module, inp, out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).to(dtype)
                if index < keep_inputs:
                    xs[name].append(x.clone())
                if gram == "running":  # the reference's add_batch, one window per call
                    rows = inp[0].shape[0]
                    hess[name] *= seen[name] / (seen[name] + rows)
                    seen[name] += rows
                    x = math.sqrt(2 / seen[name]) * x.t()
                    hess[name] += x.matmul(x.t())
                else:  # our Gram statistic: sum X^T X, divided by the token count at the end
                    hess[name].addmm_(x.T, x)
                    seen[name] += x.shape[0]
            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
        step = 1 if gram == "running" else batch
        dense_out = torch.empty_like(inputs)  # the dense layer's outputs: the layer error's reference
        for j in range(0, inputs.shape[0], step):
            dense_out[j:j + step] = adapter.call_layer(layer, inputs[j:j + step], kwargs)
        for handle in handles:
            handle.remove()
        result = {}
        for name, linear in linears.items():
            h = hess[name] if gram == "running" else hess[name] / seen[name]
            dense = linear.weight.data.clone()
            pruned, mask = reference_sparsegpt(dense, h, sparsity, mask_rule=mask_rule)
            linear.weight.data = pruned.to(linear.weight.dtype)
            err = _rel_error(torch.cat(xs[name]), dense, pruned) if index < keep_inputs else float("nan")
            result[name] = (mask, err)
        per_layer.append(result)
        if index < keep_inputs:
            kept.append({n: torch.cat(v) for n, v in xs.items()})
        for j in range(0, inputs.shape[0], step):
            inputs[j:j + step] = adapter.call_layer(layer, inputs[j:j + step], kwargs)
        layer_errors.append(float((inputs - dense_out).norm() / dense_out.norm()))
        if log_every and index % log_every == 0:
            print(f"  reference layer {index}: {time.perf_counter() - start:.1f}s", flush=True)
    return per_layer, kept, layer_errors


def main(argv=None) -> None:
    p = protocol_parser(__doc__, 0.9)
    p.add_argument("--gram", choices=("running", "batched"), default="running")
    p.add_argument("--mask", choices=("le", "topk"), default="le")
    p.add_argument("--reverse-windows", action="store_true",
                   help="feed the calibration windows in reverse order (a rounding-level perturbation)")
    args = parse_protocol_args(p, argv)
    model, tokenizer, adapter, windows, num_layers = load_protocol(args)
    start = time.perf_counter()
    ref, _, layer_errors = reference_loop(model, adapter, windows, args.sparsity, num_layers, args.gram, args.mask,
                            keep_inputs=args.compare_layers, log_every=10,
                            reverse=args.reverse_windows)
    seconds = time.perf_counter() - start
    results = {"prune_seconds": seconds, "layer_output_rel_errors": layer_errors}
    if not args.no_eval:
        results["ppl"] = protocol_perplexity(model, tokenizer, args)
        print(f"reference-loop sparsegpt {args.sparsity} (gram={args.gram}, mask={args.mask}, "
              f"reversed={args.reverse_windows}): ppl {results['ppl']:.4f}, "
              f"prune {seconds:.1f}s", flush=True)
    print("layer output rel errors: " + " ".join(f"{e:.4g}" for e in layer_errors), flush=True)
    if args.compare_layers:
        ours, _ = protocol_model(args)
        config = PruneConfig(method="sparsegpt", sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                             quiet=True, sequential=False, device="cpu", layers=(0, args.compare_layers))
        records = LayerDriver(ours, get_adapter(ours), get_method(config), config).run(windows)
        results["compare"] = []
        for index, layer in enumerate(adapter.layers(ours)[:args.compare_layers]):
            errs = records[index].matrices
            matrices = {}
            for name, linear in _linears(layer).items():
                mask, ref_err = ref[index][name]
                ours_mask = linear.weight == 0
                m = matrices[name] = {"mask_entries_differ": int((ours_mask != mask).sum()), "numel": mask.numel(),
                                      "pruned_ref": int(mask.sum()), "pruned_ours": int(ours_mask.sum()),
                                      "rel_error_ref": ref_err, "rel_error_ours": errs[name]["rel_error"]}
                print(f"layer {index} {name}: {m['mask_entries_differ']} of {m['numel']} mask entries differ "
                      f"(pruned: ref {m['pruned_ref']}, ours {m['pruned_ours']}); rel error ref "
                      f"(on its dense-pass inputs) {ref_err:.5g}, ours {m['rel_error_ours']:.5g}", flush=True)
            results["compare"].append({"layer": index, "matrices": matrices,
                                       "output_rel_error_ref": layer_errors[index],
                                       "output_rel_error_ours": records[index].output_rel_error})
            print(f"layer {index} output rel error: ref {layer_errors[index]:.5g}, "
                  f"ours {records[index].output_rel_error:.5g}", flush=True)
    write_results(args, results)


if __name__ == "__main__":
    main()
