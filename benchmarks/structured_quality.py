"""Structured pruning on the default model: perplexity, size and CPU speed (issue 11).

The protocol of ../shared/PROTOCOL.md (SmolLM2-135M-Instruct, float32, 32 x 512 calibration
tokens, seed 0, all 30 decoder layers, perplexity on the first 40 512-token windows of the wiki
test part). Each run is one `sparsellm.run` (prune, physical removal, evaluation) and is kept
in benchmarks/results/structured_quality.json with the git commit (and whether the tree had
uncommitted changes), the settings, the parameters and FLOPs per token, and when it ran; the
file's protocol (--nsamples, --seqlen, --eval-windows) and the dense perplexity at it (measured
once per test protocol) give the table's caption.

    python benchmarks/structured_quality.py --methods structprune,sparsegpt,wanda,magnitude --channels 0.2,0.5
    python benchmarks/structured_quality.py --methods structprune --channels 0.5 --allocation energy
    python benchmarks/structured_quality.py --methods sparsegpt --channels 0.3 --allocation energy:3  # temperature 3
    python benchmarks/structured_quality.py --methods structprune,sparsegpt --channels 0.5 --heads 0.25
    python benchmarks/structured_quality.py --speed structprune,0.5   # needs the run made with --save-models
    python benchmarks/structured_quality.py --merge benchmarks/results/structured_speed.json --readme README.md

A job running beside another one writes its own file (--json X for runs, --speed-json X for a
speed entry), merged afterwards with --merge: each job rewrites its whole --json when it saves.

`sparsegpt`, `wanda`, `magnitude` here are their structured versions (structured OBS with the
consumer refit, Wanda-style unit scores, unit norms). Existing entries are skipped unless --rerun.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quality import (commit_label, dense_ppl, fmt_ppl, git_state, load, machine, protocol_caption,  # noqa: E402
                     protocol_differences, refuse_other_protocol, save, write_into,
                     write_text)  # (the quality table's helpers)

DEFAULT_JSON = os.path.join(HERE, "results", "structured_quality.json")
DEFAULT_MD = os.path.join(HERE, "results", "structured_quality.md")
MODELS_DIR = os.path.join("/tmp", "sparsellm_structured_models")
README_START, README_END = "<!-- structured:start -->", "<!-- structured:end -->"
DENSE_HEADS = 9  # query heads per layer of the default model (SmolLM2-135M: 9 heads, 3 key/value heads)


def key(method, channels, heads, allocation) -> str:
    return f"{method}|c{channels}|h{heads or 0}|{allocation}"


def run_config(method, channels, heads, allocation, args):
    """The PruneConfig of one run (its checks are those of the options: see check_options)."""
    from sparsellm.config import PruneConfig

    structure = "channels+heads" if heads else "channels"
    rule, _, temperature = allocation.partition(":")  # energy:T, a temperature other than the default
    save_dir = os.path.join(MODELS_DIR, key(method, channels, heads, allocation).replace("|", "_")) \
        if args.save_models else None
    return PruneConfig(method=method, sparsity=channels, structure=structure, head_sparsity=heads or None,
                       allocation={"rule": rule, **({"temperature": float(temperature)} if temperature else {})},
                       nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                       eval=("wiki",), eval_windows=args.eval_windows, eval_dense=False,
                       quiet=not args.progress, device="cpu", save=save_dir,
                       overwrite=save_dir is not None)  # the API refuses --overwrite without --save


def check_options(parser: argparse.ArgumentParser, args) -> list[tuple]:
    """The (method, channels, heads) cells of --methods, --channels and --heads, each run's
    settings checked as its PruneConfig checks them: a typo is exit 2 now, not a traceback after
    the dense model was evaluated (or after the other cells ran)."""
    try:
        heads = [float(h) for h in args.heads.split(",")]
        channels = [float(c) for c in args.channels.split(",")]
    except ValueError as exc:
        parser.error(f"--channels and --heads take numbers, comma-separated ({exc})")
    cells = [(method, c, h) for h in heads for c in channels for method in args.methods.split(",")]
    for method, c, h in cells:
        try:
            run_config(method, c, h, args.allocation, args)
        except ValueError as exc:
            parser.error(f"--methods {method} --channels {c:g} --heads {h:g} --allocation {args.allocation}: {exc}")
    return cells


def run_one(method, channels, heads, allocation, args) -> dict:
    from sparsellm import run

    config = run_config(method, channels, heads, allocation, args)
    save_dir = config.save
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = run(config)
    return {"method": method, "channels": channels, "heads": heads, "allocation": allocation,
            "ppl": report["ppl"]["pruned"]["wiki"], "prune_seconds": report["prune_seconds"],
            "cost": report["cost"], "layer_sizes": report["structure"]["layer_sizes"],
            "ffn_rel_error": [e["ffn_rel_error"] for e in report["layer_errors"]],
            "output_rel_error": [e["output_rel_error"] for e in report["layer_errors"]],
            # StructPrune's per-layer choices: the kept iterate, the down dampening, held-out errors
            "solver": [{k: e["diagnostics"][k] for k in ("best_iteration", "down_damping", "start_selection_error",
                                                       "best_selection_error") if k in e["diagnostics"]}
                       for e in report["layer_errors"]],
            "settings": report["settings"], "git": git_state(), "started": started, "saved_to": save_dir}


def _timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (time.process_time) of ``repeats`` calls of ``fn`` after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def prefill_and_decode(model, vocab: int, prompt: int = 512, new_tokens: int = 16, repeats: int = 3) -> dict:
    """CPU tokens/s of one ``prompt``-token window (median of ``repeats`` after a warm-up):

    - prefill as ``generate`` runs it: the KV cache and the logits of the last position only
      (``logits_to_keep=1``);
    - scoring: the logits of every position (as a perplexity evaluation), where the 49152-word
      output layer, which pruning does not shrink, is about a fifth of the work;

    and greedy decode of ``new_tokens`` with the KV cache after a 64-token prompt. Both by wall
    clock and by this process's CPU time (time.process_time): on a machine whose cores other
    jobs share, the CPU time is the steadier measure of the work each model does."""
    import torch

    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    out = {"prompt": prompt, "new_tokens": new_tokens}
    with torch.no_grad():
        for name, call in (("prefill", lambda: model(ids, use_cache=True, logits_to_keep=1)),
                           ("scoring", lambda: model(ids, use_cache=False))):
            wall, cpu = _timed(call, repeats)
            out.update({f"{name}_tokens_per_s": prompt / statistics.median(wall), f"{name}_seconds": wall,
                        f"{name}_tokens_per_cpu_s": prompt / statistics.median(cpu), f"{name}_cpu_seconds": cpu})
        start, start_cpu = time.perf_counter(), time.process_time()
        model.generate(ids[:, :64], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        decode, decode_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    out.update({"decode_tokens_per_s": new_tokens / decode, "decode_tokens_per_cpu_s": new_tokens / decode_cpu})
    return out


def speed(entry: dict, args) -> dict:
    """Dense vs the saved pruned model, measured back to back in this process."""
    import torch

    from sparsellm import load_model, load_pruned

    torch.set_num_threads(args.speed_threads)
    dense, tokenizer = load_model("smollm2")
    pruned, _ = load_pruned(entry["saved_to"])
    vocab = dense.config.vocab_size
    out = {"threads": torch.get_num_threads(), "git": git_state(), "machine": machine(True),  # the timing's
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for round_ in range(args.speed_rounds):  # alternate, so load from other jobs hits both alike
        for name, model in (("dense", dense), ("pruned", pruned)):
            out.setdefault(name, []).append(prefill_and_decode(model.eval(), vocab))
    for measure in ("prefill_tokens_per_s", "prefill_tokens_per_cpu_s", "scoring_tokens_per_s",
                    "scoring_tokens_per_cpu_s", "decode_tokens_per_s", "decode_tokens_per_cpu_s"):
        for name in ("dense", "pruned"):
            out[f"{name}_{measure}"] = statistics.median(r[measure] for r in out[name])
        out[f"speedup_{measure}"] = out[f"pruned_{measure}"] / out[f"dense_{measure}"]
    return out


def num_layers(results: dict) -> int | None:
    """The model's decoder layers (every run prunes all of them): recorded with the dense
    perplexity, or, in files from before that, the length of the runs' per-layer sizes."""
    if results.get("num_layers"):
        return results["num_layers"]
    counts = {len(r["layer_sizes"]["intermediate_size"]) for r in results["runs"].values() if r.get("layer_sizes")}
    return counts.pop() if len(counts) == 1 else None


def caption(results: dict) -> str:
    """The table's caption, from the results' protocol, dense perplexity and layer count."""
    layers = num_layers(results)
    dense = results.get("dense")
    dense = fmt_ppl(dense) if dense is not None else "not measured"
    return (f"{protocol_caption(results.get('protocol', {}))}, all {f'{layers} ' if layers else ''}layers; "
            f"columns: share of FFN channels removed. Dense: {dense}.")


def render(results: dict) -> str:
    runs = sorted(results["runs"].values(), key=lambda r: (r["heads"] or 0, r["allocation"] != "uniform",
                                                           ["structprune", "sparsegpt", "wanda", "magnitude"].index(
                                                               r["method"]) if r["method"] in (
                                                               "structprune", "sparsegpt", "wanda", "magnitude") else 9,
                                                           r["channels"]))
    columns = sorted({r["channels"] for r in runs})
    rows: dict[str, dict] = {}
    for r in runs:
        label = r["method"] + (" (structured)" if r["method"] != "structprune" else "")
        if r["heads"]:  # SmolLM2 removes heads in steps of one per key/value group: say what was removed
            heads = r["layer_sizes"]["num_attention_heads"]
            label += f", --head-sparsity {r['heads']:g} ({1 - sum(heads) / (len(heads) * DENSE_HEADS):.0%} of heads removed)"
        rule, _, temperature = r["allocation"].partition(":")
        label += f", {rule}" + (f" (temperature {temperature})" if temperature else "")
        rows.setdefault(label, {})[r["channels"]] = r
    lines = [caption(results), "",
             "| method | " + " | ".join(f"{c:.0%} channels" for c in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(fmt_ppl(cells[c]["ppl"]) if c in cells else "" for c in columns) + " |")
    lines += ["", "Parameters after / before, and prune seconds (2 shared CPU cores):", "",
              "| method | " + " | ".join(f"{c:.0%} channels" for c in columns) + " |",
              "|" + "---|" * (len(columns) + 1)]
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{cells[c]['cost']['after']['parameters'] / cells[c]['cost']['before']['parameters']:.3f}, "
            f"{cells[c]['prune_seconds']:.0f} s" if c in cells else "" for c in columns) + " |")
    by_commit: dict[str, list[str]] = {}
    for label, cells in rows.items():
        for c, r in cells.items():
            commit = commit_label(r.get("git"))
            by_commit.setdefault(commit, []).append(f"{label} at {c:.0%}")
    lines += ["", "Code each cell was measured with: " + "; ".join(
        f"commit {commit}: {' / '.join(cells)}" for commit, cells in by_commit.items()) + "."]
    for k, s in results.get("speed", {}).items():
        if "speedup_prefill_tokens_per_cpu_s" not in s:
            continue
        prompt = s["dense"][0].get("prompt", 512)  # the timed window's length
        lines += ["", f"CPU speed of `{k}` vs dense ({s['threads']} thread(s), median of {len(s['dense'])} "
                      f"alternating rounds, commit {commit_label(s.get('git'))}"
                      + (f", {s['machine']}" if s.get("machine") else "") + "): " + "; ".join(
                          f"{label} {s[f'dense_{m}_tokens_per_cpu_s']:.1f} -> {s[f'pruned_{m}_tokens_per_cpu_s']:.1f} "
                          f"tokens per CPU second ({s[f'speedup_{m}_tokens_per_cpu_s']:.2f}x; wall clock "
                          f"{s[f'speedup_{m}_tokens_per_s']:.2f}x)" for m, label in (
                              ("prefill", f"prefill of {prompt} tokens (KV cache and last logits, as generate)"),
                              ("scoring", f"scoring {prompt} tokens (every position's logits)"),
                              ("decode", "greedy decode")) if f"speedup_{m}_tokens_per_cpu_s" in s) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="structprune,sparsegpt,wanda,magnitude")
    p.add_argument("--channels", default="0.2,0.5", help="shares of FFN channels removed")
    p.add_argument("--heads", default="0", help="shares of query heads removed (0: channels only)")
    p.add_argument("--allocation", default="uniform", help="uniform, energy, or energy:T (temperature T)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--markdown", default=DEFAULT_MD)
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--render", action="store_true", help="only render the tables")
    p.add_argument("--save-models", action="store_true", help=f"keep each pruned model under {MODELS_DIR}")
    p.add_argument("--speed", default=None, help="METHOD,CHANNELS[,HEADS[,ALLOCATION]] of a saved run: time it vs dense")
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--speed-threads", type=int, default=1, help="torch threads while timing")
    p.add_argument("--speed-json", default=None, help="write the speed entry here instead of --json (a parallel job)")
    p.add_argument("--merge", default=None,
                   help="add the runs and speed entries of another results file (e.g. from a parallel job) to --json")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--readme", default=None)
    args = p.parse_args(argv)

    results = load(args.json)
    results.setdefault("speed", {})
    if args.merge:
        other = load(args.merge)
        # one caption and one dense value speak for every row: runs of another protocol stay apart
        differ = protocol_differences(results.get("protocol") or {}, other.get("protocol") or {})
        if results["runs"] and other["runs"] and results.get("protocol") and differ:
            p.error(f"{args.merge} holds runs of another protocol than {args.json} (" + ", ".join(
                f"{k}: {other['protocol'].get(k)!r} there, {results['protocol'].get(k)!r} here" for k in differ) + ")")
        results["runs"].update(other["runs"])
        results["speed"].update(other.get("speed", {}))
        results["protocol"] = results.get("protocol") or other.get("protocol", {})
        for k in ("dense", "num_layers"):  # the caption's, measured by the job that ran the runs
            if results.get(k) is None and other.get(k) is not None:
                results[k] = other[k]
        save(results, args.json)
    elif args.speed:
        parts = args.speed.split(",")
        try:
            if not 2 <= len(parts) <= 4:
                raise ValueError(f"{len(parts)} fields")
            k = key(parts[0], float(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0,
                    parts[3] if len(parts) > 3 else "uniform")
        except ValueError as exc:
            p.error(f"--speed takes METHOD,CHANNELS[,HEADS[,ALLOCATION]], got {args.speed!r} ({exc})")
        if k not in results["runs"]:
            p.error(f"--speed {args.speed}: no run {k} in {args.json}")
        if not results["runs"][k].get("saved_to") or not os.path.isdir(results["runs"][k]["saved_to"]):
            p.error(f"--speed {args.speed}: the run's pruned model was not kept (run it again with --save-models)")
        entry = speed(results["runs"][k], args)
        if args.speed_json:  # keep --json to the job that writes runs into it; merge later (--merge)
            save({"protocol": {}, "runs": {}, "speed": {k: entry}}, args.speed_json)
        else:
            results["speed"][k] = entry
            save(results, args.json)
    elif not args.render:
        cells = check_options(p, args)
        previous = results.get("protocol") or {}
        protocol = {"model": "smollm2", "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "eval_windows": args.eval_windows, "seed": 0, "machine": machine(True)}
        refuse_other_protocol(p, results, protocol)
        results["protocol"] = protocol
        if (results.get("dense") is None or args.rerun
                or any(previous.get(k) != results["protocol"][k] for k in ("seqlen", "eval_windows"))):
            # the caption's dense perplexity, at this protocol (the runs do not evaluate the dense model)
            results["dense"], results["num_layers"] = dense_ppl(argparse.Namespace(
                nsamples=args.nsamples, seqlen=args.seqlen, eval="wiki", eval_windows=args.eval_windows,
                progress=args.progress, cpu=True, float64=False))
            results.pop("dense_source", None)  # measured here now
            save(results, args.json)
            print(f"dense: {results['dense']:.4f}", flush=True)
        for method, channels, heads in cells:
            k = key(method, channels, heads, args.allocation)
            if k in results["runs"] and not args.rerun:
                continue
            entry = run_one(method, channels, heads, args.allocation, args)
            results["runs"][k] = entry
            save(results, args.json)
            print(f"{k}: ppl {fmt_ppl(entry['ppl'])}, prune {entry['prune_seconds']:.0f}s, parameters "
                  f"{entry['cost']['after']['parameters']:,} of {entry['cost']['before']['parameters']:,}",
                  flush=True)
    text = render(results)
    write_text(args.markdown, text)
    if args.readme:
        write_into(args.readme, text, README_START, README_END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
