"""Elsa on the default model, against the one-shot method it starts from and the fair baseline.

The wiki protocol of ../shared/PROTOCOL.md (SmolLM2-135M in float32, perplexity on the first
40 windows of 512 tokens of the test part). Per sparsity setting, in one process:

1. SparseGPT (32 x 512 calibration tokens, seed 0, all layers): its perplexity is the
   "sparsegpt" row, measured here with the same code as the rest.
2. Elsa from those weights (the same as ``--init sparsegpt``), ``--steps`` steps of
   ``--batch-size`` fresh 512-token calibration windows: the "elsa" row.
3. masked-adam from the same SparseGPT weights, the same steps on the same windows: the
   "masked-adam" row (what plain fine-tuning with the mask fixed gives).

Each entry is stored in benchmarks/results/elsa.json with the commit, every setting, the
tokens trained on and the wall-clock seconds (SparseGPT's included in the two trained rows);
the table is rendered from that file, into the README between the elsa markers with --readme.

    python benchmarks/elsa_quality.py --settings 0.9 --steps 300 --batch-size 2 --lr 5e-4 --readme README.md
    python benchmarks/elsa_quality.py --render --readme README.md
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

from quality import achieved_sparsity, commit_label, fmt_ppl, git_state, load, save, write_into

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "elsa.json")
QUALITY_JSON = os.path.join(HERE, "results", "quality.json")
MARKERS = ("<!-- elsa:start -->", "<!-- elsa:end -->")


def commit() -> str:
    """The commit the numbers come from; '+dirty' when the tracked files differ from it."""
    state = git_state()
    return state["commit"][:7] + ("+dirty" if state["dirty"] else "")


def measure(setting: str, args, results: dict) -> None:
    """Fill ``results["runs"][setting]``, saving after each row; the SparseGPT model is cached
    on disk (per setting and commit), so an interrupted benchmark resumes without redoing it."""
    import torch

    from sparsellm import api
    from sparsellm.config import ElsaSettings, PruneConfig

    common = dict(sparsity=setting, nsamples=args.nsamples, seqlen=args.seqlen, seed=0, eval=("wiki",),
                  eval_windows=args.eval_windows, quiet=not args.progress, device="cpu" if args.cpu else None)
    elsa = ElsaSettings(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        admm_lambda=args.admm_lambda, admm_interval=args.admm_interval, score=args.score)
    entry = {"setting": setting, "rows": {}, "commit": commit(), "init": "sparsegpt",
             "settings": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                          "seqlen": args.seqlen, "lr": args.lr, "admm_lambda": args.admm_lambda,
                          "admm_interval": args.admm_interval, "score": args.score, "nsamples": args.nsamples,
                          "eval_windows": args.eval_windows},
             "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                        f"{torch.get_num_threads()} threads"}
    previous = results["runs"].get(setting)
    if previous and previous["commit"] == entry["commit"] and previous["settings"] == entry["settings"]:
        entry["rows"] = previous["rows"]  # the same code and settings: keep the rows already measured
    rows = entry["rows"]
    model, tokenizer = api.load_model("smollm2")
    cache = os.path.join(args.cache, f"sparsegpt-{setting.replace(':', 'of')}-{entry['commit']}.pt")
    if "sparsegpt" in rows and os.path.exists(cache):
        model.load_state_dict(torch.load(cache))
    else:
        start = time.perf_counter()
        api.prune(model, tokenizer, PruneConfig(method="sparsegpt", **common))
        seconds = time.perf_counter() - start
        rows["sparsegpt"] = {"ppl": api.evaluate(model, tokenizer, PruneConfig(**common))["wiki"], "seconds": seconds}
        os.makedirs(args.cache, exist_ok=True)
        torch.save(model.state_dict(), cache)
        results["runs"][setting] = entry
        save(results, args.json)
    print(f"{setting} sparsegpt: ppl {fmt_ppl(rows['sparsegpt']['ppl'])} ({rows['sparsegpt']['seconds']:.0f} s)",
          flush=True)
    pruned = copy.deepcopy(model.state_dict())
    for method in args.methods.split(","):
        if method in rows:
            continue
        model.load_state_dict(pruned)
        config = PruneConfig(method=method, elsa=elsa, **common)
        start = time.perf_counter()
        records, details = api._prune(model, tokenizer, config)
        seconds = time.perf_counter() - start
        ppl = api.evaluate(model, tokenizer, config)["wiki"]
        sparsity = achieved_sparsity(records)
        rows[method] = {"ppl": ppl, "seconds": rows["sparsegpt"]["seconds"] + seconds, "train_seconds": seconds,
                        "achieved_sparsity": sparsity, "final_loss": details["loss_curve"][-1]["loss"],
                        "first_loss": details["loss_curve"][0]["loss"], "admm": details["admm"],
                        "tokens": details["tokens_per_step"] * details["steps"]}
        results["runs"][setting] = entry
        save(results, args.json)
        print(f"{setting} {method}: ppl {fmt_ppl(ppl)} ({seconds:.0f} s training, sparsity {sparsity:.4f})",
              flush=True)


def sparsellm_rows(path: str = QUALITY_JSON) -> dict:
    """SparseLLM's one-shot perplexity over all layers per setting, from the quality table's
    JSON (benchmarks/quality.py measures it with the same protocol): {setting: entry}."""
    runs = load(path)["runs"] if os.path.exists(path) else {}
    return {k.split("|")[1]: v for k, v in runs.items() if k.startswith("sparsellm|") and k.endswith("|all")}


def machines(entries: list[dict]) -> dict[str, list[str]]:
    """{machine description: the settings measured on it}."""
    out: dict[str, list[str]] = {}
    for e in entries:
        out.setdefault(e["machine"], []).append(e["setting"])
    return out


def render(results: dict, sparsellm: dict | None = None) -> str:
    entries = [results["runs"][k] for k in sorted(results["runs"])]
    if not entries:
        return "No Elsa results yet.\n"
    sparsellm = sparsellm_rows() if sparsellm is None else sparsellm
    lines = ["Perplexity on the wiki test part (40 x 512 tokens; dense 19.61), all 30 layers. SparseGPT: one-shot, "
             "32 x 512 calibration tokens. elsa and masked-adam start from that SparseGPT model and train on fresh "
             "calibration windows; time = SparseGPT's + training, wall-clock on this project's 2-core CPU.", "",
             "| sparsity | sparsegpt | sparsellm | masked-adam | elsa | steps x tokens | time (min) | commit |",
             "|---|---|---|---|---|---|---|---|"]
    sparsellm_notes = []
    for e in entries:
        r = e["rows"]
        if not {"sparsegpt", "elsa", "masked-adam"} <= set(r):
            continue  # a benchmark still running
        tokens = e["settings"]["steps"] * e["settings"]["batch_size"] * e["settings"]["grad_accum"] * e["settings"]["seqlen"]
        one_shot = sparsellm.get(e["setting"])
        if one_shot:
            sparsellm_notes.append(f"{e['setting']}: {one_shot['prune_seconds'] / 60:.0f} min, "
                                   f"commit {commit_label(one_shot.get('git'))}")
        lines.append(f"| {e['setting']} | {fmt_ppl(r['sparsegpt']['ppl'])} | "
                     f"{fmt_ppl(one_shot['ppl']) if one_shot else 'not run'} | {fmt_ppl(r['masked-adam']['ppl'])} | "
                     f"{fmt_ppl(r['elsa']['ppl'])} | {e['settings']['steps']} x "
                     f"{tokens // e['settings']['steps']} | {r['sparsegpt']['seconds'] / 60:.0f} + "
                     f"{r['masked-adam']['train_seconds'] / 60:.0f} / {r['elsa']['train_seconds'] / 60:.0f} | "
                     f"{e['commit']} |")
    s = entries[-1]["settings"]
    lines += ["", f"Training settings: lr {s['lr']} (linear decay), lambda {s['admm_lambda']}, interval "
              f"{s['admm_interval']}, score {s['score']}, batch {s['batch_size']} x {s['seqlen']} tokens. "
              "Machine: " + "; ".join(f"{m} ({', '.join(settings)})" for m, settings in machines(entries).items())
              + "."]
    if sparsellm_notes:
        lines += ["", "sparsellm: one-shot SparseLLM over all layers with the same calibration, from "
                  "benchmarks/quality.py (its prune time and commit: " + "; ".join(sparsellm_notes) + ")."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="0.9")
    p.add_argument("--methods", default="elsa,masked-adam", help="trained rows, after the SparseGPT row")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "sparsellm", "elsa-bench"),
                   help="where the SparseGPT-pruned model of each setting is kept between runs")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--admm-lambda", type=float, default=0.01)
    p.add_argument("--admm-interval", type=int, default=20)
    p.add_argument("--score", default="fisher")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--render", action="store_true", help="only render the table from the JSON")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--readme", default=None)
    args = p.parse_args(argv)
    results = load(args.json)
    if not args.render:
        for setting in args.settings.split(","):
            measure(setting, args, results)
    text = render(results)
    if args.readme:
        write_into(args.readme, text, *MARKERS)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
