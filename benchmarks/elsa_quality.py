"""Elsa on the default model, against the one-shot method it starts from and the fair baseline.

The wiki protocol of ../shared/PROTOCOL.md (SmolLM2-135M in float32, perplexity on the first
40 windows of 512 tokens of the test part). Per sparsity setting, in one process:

1. SparseGPT (32 x 512 calibration tokens, seed 0, all layers): its perplexity is the
   "sparsegpt" row, measured here with the same code as the rest.
2. Elsa from those weights (the same as ``--init sparsegpt``), ``--steps`` steps of
   ``--batch-size`` fresh 512-token calibration windows: the "elsa" row.
3. masked-adam from the same SparseGPT weights, the same steps on the same windows: the
   "masked-adam" row (what plain fine-tuning with the mask fixed gives).

Each entry is stored in benchmarks/results/elsa.json with the commit, every setting, the dense
perplexity at its protocol, the tokens trained on and the wall-clock seconds (SparseGPT's
included in the two trained rows); the table is rendered from that file, into the README between
the elsa markers with --readme. Its caption gives the runs' protocol and dense perplexity (entries
from before the dense value was recorded take the sparsellm file's, where its protocol is the
run's). The sparsellm column is one-shot SparseLLM from a benchmarks/quality.py file
(``--sparsellm-json``), shown only where that file's protocol (model, calibration windows, test
windows, seed, text) is the run's: "-" where it is another.

    python benchmarks/elsa_quality.py --settings 0.9 --steps 300 --batch-size 2 --lr 5e-4 --readme README.md
    python benchmarks/elsa_quality.py --settings 0.9 --methods elsa --admm-schedule linear \
        --admm-lambda 1 --admm-lambda-start 0.01 --tag ramp --readme README.md
    python benchmarks/elsa_quality.py --render --readme README.md
    python benchmarks/elsa_quality.py --merge benchmarks/results/gpu_h200_f1dea5c/elsa_gpu.json --readme README.md

Runs are keyed by setting (and ``--tag``, so that several recipes of one setting stand side by
side); a run whose commit, settings or machine differ from the stored one of its key replaces it
(``--merge`` adds another machine's file the same way: the rows of the same run join).

On a machine without gensim (a GPU machine), ``--calib``/``--eval`` take the wiki splits as .txt
files (``../shared/device/prepare.sh`` writes them: the same tokens, checked), and the default
model comes from ``benchmarks/device_model.sh``; ``benchmarks/gpu_run.sh``'s ``elsafull`` step
runs this script there.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

from quality import (achieved_sparsity, add_text_options, commit_label, corpus, fmt_ppl, git_state, load, machine,
                     save, text_sources, write_into)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "elsa.json")
QUALITY_JSON = os.path.join(HERE, "results", "quality.json")
MARKERS = ("<!-- elsa:start -->", "<!-- elsa:end -->")


def run_key(setting: str, tag: str = "") -> str:
    """The key of a run in the JSON: the setting, and the tag of a recipe variant if any."""
    return f"{setting}|{tag}" if tag else setting


def file_name(*parts: str) -> str:
    """A file or folder name from the parts of a run's key (no '|' or ':' in it)."""
    return "-".join(parts).replace("|", "-").replace(":", "of")


def recipe(settings: dict) -> str:
    """The training recipe of a run, in words (the runs stored before the lambda schedule was
    an option ran with a constant lambda)."""
    schedule = settings.get("admm_schedule", "constant")
    if schedule == "constant":
        lam = f"lambda {settings['admm_lambda']}"
    else:
        from sparsellm.config import ElsaSettings

        start = ElsaSettings(admm_lambda=settings["admm_lambda"], admm_schedule=schedule,
                             admm_lambda_start=settings.get("admm_lambda_start")).lambda_start
        lam = f"lambda {start} -> {settings['admm_lambda']} ({schedule})"
    precision = settings.get("train_precision")  # absent: tf32 (float32 on a CPU)
    return (f"lr {settings['lr']} (linear decay), {lam}, interval {settings['admm_interval']}, score "
            f"{settings['score']}, batch {settings['batch_size']} x {settings['grad_accum']} x {settings['seqlen']} "
            "tokens" + (f", {precision} training passes" if precision else ""))


def commit() -> str:
    """The commit the numbers come from; '+dirty' when the tracked files differ from it."""
    state = git_state()
    return state["commit"][:7] + ("+dirty" if state["dirty"] else "")


ONE_SHOT_SETTINGS = ("nsamples", "seqlen", "eval_windows")  # what the SparseGPT row depends on, with the commit


def run_protocol(entry: dict) -> dict:
    """The evaluation protocol of a run, as benchmarks/quality.py records its ``protocol``: what a
    perplexity of another file must share to stand beside it (the machine aside)."""
    s = entry["settings"]
    return {"model": entry.get("model", "smollm2"), "nsamples": s["nsamples"], "seqlen": s["seqlen"],
            "eval_windows": s["eval_windows"], "seed": s.get("seed", 0), **corpus(entry.get("text"))}


def file_protocol(results: dict) -> dict:
    """The protocol of a benchmarks/quality.py results file, in :func:`run_protocol`'s terms."""
    proto = results.get("protocol") or {}
    return {**{k: proto.get(k) for k in ("model", "nsamples", "seqlen", "eval_windows", "seed")},
            **corpus(proto.get("text"))}


def same_run(a: dict | None, b: dict) -> bool:
    """Whether two entries are one run: the same code, settings and machine (rows may then join)."""
    return bool(a) and all(a.get(k) == b.get(k) for k in ("commit", "settings", "machine"))


def merge(results: dict, other: dict) -> None:
    """Add the runs of ``other`` (a results file of another machine): the rows of a run that is the
    same as a stored one join its rows (e.g. masked-adam measured in a later call at the same
    commit); a different run of the same key replaces the stored one."""
    for key, entry in other["runs"].items():
        previous = results["runs"].get(key)
        if same_run(previous, entry):
            previous["rows"].update(entry["rows"])
        else:
            results["runs"][key] = entry


def shared_dense(results: dict, entry: dict) -> dict:
    """The dense perplexity (and layer count) another run at the same protocol, commit and machine
    already measured, so that a second run does not evaluate the dense model again."""
    for other in results["runs"].values():
        if (other.get("dense") is not None and other["commit"] == entry["commit"]
                and other["machine"] == entry["machine"] and run_protocol(other) == run_protocol(entry)):
            return {"dense": other["dense"], "num_layers": other.get("num_layers")}
    return {}


def shared_sparsegpt_row(results: dict, entry: dict) -> dict:
    """The SparseGPT row another run of the same setting, commit and calibration already holds
    (its pruned model is the one cached on disk), so a recipe variant does not prune again."""
    for other in results["runs"].values():
        if (other["setting"] == entry["setting"] and other["commit"] == entry["commit"]
                and "sparsegpt" in other["rows"]
                and all(other["settings"].get(k) == entry["settings"][k] for k in ONE_SHOT_SETTINGS)):
            return {"sparsegpt": other["rows"]["sparsegpt"]}
    return {}


def run_settings(setting: str, args) -> tuple[dict, object]:
    """The PruneConfig fields every row of ``setting`` shares, and the ElsaSettings of ``args``."""
    from sparsellm.config import ElsaSettings

    common = dict(sparsity=setting, nsamples=args.nsamples, seqlen=args.seqlen, seed=0, calib=args.calib,
                  eval=(args.eval,), eval_windows=args.eval_windows, quiet=not args.progress,
                  device="cpu" if args.cpu else None)
    elsa = ElsaSettings(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        admm_lambda=args.admm_lambda, admm_schedule=args.admm_schedule,
                        admm_lambda_start=args.admm_lambda_start, admm_interval=args.admm_interval, score=args.score,
                        train_precision=args.train_precision, compile=args.compile)
    return common, elsa


def check_options(parser: argparse.ArgumentParser, args) -> None:
    """Every row's config as :func:`measure` builds it, checked now: a typo in --settings,
    --methods, --score, --admm-schedule or --train-precision is exit 2, not a traceback after the
    dense evaluation and the SparseGPT prune (or after an earlier setting's training)."""
    import dataclasses

    from sparsellm.config import PruneConfig

    for setting in args.settings.split(","):
        try:
            common, elsa = run_settings(setting, args)
            PruneConfig(method="sparsegpt", **common)
            for method in args.methods.split(","):
                PruneConfig(method=method, elsa=dataclasses.replace(elsa), **common)
        except ValueError as exc:
            parser.error(f"--settings {setting}, --methods {args.methods}: {exc}")


def measure(setting: str, args, results: dict) -> None:
    """Fill the run of ``setting`` (and ``--tag``), saving after each row; the SparseGPT model is
    cached on disk (per setting and commit), so an interrupted benchmark resumes without redoing
    it and a recipe variant starts from the same model."""
    import torch

    from sparsellm import api
    from sparsellm.config import PruneConfig

    common, elsa = run_settings(setting, args)
    entry = {"setting": setting, "tag": args.tag, "rows": {}, "commit": commit(), "init": "sparsegpt",
             "settings": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                          "seqlen": args.seqlen, "lr": args.lr, "admm_lambda": args.admm_lambda,
                          "admm_schedule": args.admm_schedule, "admm_lambda_start": args.admm_lambda_start,
                          "admm_interval": args.admm_interval, "score": args.score, "nsamples": args.nsamples,
                          **({} if args.train_precision == "tf32" else {"train_precision": args.train_precision}),
                          **({"compile": True} if args.compile else {}),
                          "eval_windows": args.eval_windows},
             "machine": machine(args.cpu), **text_sources(args)}
    key = run_key(setting, args.tag)
    previous = results["runs"].get(key)
    if same_run(previous, entry):
        entry["rows"] = previous["rows"]  # the same code, settings and machine: keep the rows already measured
        entry.update({k: previous[k] for k in ("dense", "num_layers") if k in previous})
    rows = entry["rows"]
    if "sparsegpt" not in rows:
        rows.update(shared_sparsegpt_row(results, entry))
    if entry.get("dense") is None:
        entry.update(shared_dense(results, entry))
    model, tokenizer = api.load_model("smollm2")
    if entry.get("dense") is None:  # the caption's dense perplexity, at this run's protocol
        entry["dense"] = api.evaluate(model, tokenizer, PruneConfig(**common))[args.eval]
        entry["num_layers"] = model.config.num_hidden_layers
        results["runs"][key] = entry
        save(results, args.json)
        print(f"{setting} dense: ppl {fmt_ppl(entry['dense'])}", flush=True)
    # the one-shot model depends on its calibration too: runs of other windows must not share it
    cache = os.path.join(args.cache, file_name("sparsegpt", setting, entry["commit"], f"n{args.nsamples}",
                                               f"s{args.seqlen}", os.path.basename(args.calib)) + ".pt")
    if "sparsegpt" in rows and os.path.exists(cache):
        model.load_state_dict(torch.load(cache))
    else:
        start = time.perf_counter()
        api.prune(model, tokenizer, PruneConfig(method="sparsegpt", **common))
        seconds = time.perf_counter() - start
        model.to(api.resolve_device(common["device"]))  # the driver returned each layer to host memory
        rows["sparsegpt"] = {"ppl": api.evaluate(model, tokenizer, PruneConfig(**common))[args.eval],
                             "seconds": seconds}
        os.makedirs(args.cache, exist_ok=True)
        torch.save(model.state_dict(), cache)
        results["runs"][key] = entry
        save(results, args.json)
    print(f"{setting} sparsegpt: ppl {fmt_ppl(rows['sparsegpt']['ppl'])} ({rows['sparsegpt']['seconds']:.0f} s)",
          flush=True)
    pruned = copy.deepcopy(model.state_dict())
    for method in args.methods.split(","):
        if method in rows:
            continue
        model.load_state_dict(pruned)
        checkpoints = {}
        if args.checkpoint_root:  # one folder per run, setting, method and commit: a cut run resumes
            checkpoints = {"checkpoint_dir": os.path.join(args.checkpoint_root, file_name(key, method, entry["commit"])),
                           "checkpoint_every": args.checkpoint_every}
        config = PruneConfig(method=method, elsa=dataclasses.replace(elsa, **checkpoints), **common)
        start = time.perf_counter()
        records, details = api._prune(model, tokenizer, config)
        seconds = time.perf_counter() - start
        resumed = details["resumed_from_step"]
        if resumed:
            # this process trained only the steps after the checkpoint: the training time is the
            # sum of every step's time (the loss curve's, kept in the checkpoint)
            seconds = sum(e["seconds"] for e in details["loss_curve"])
        ppl = api.evaluate(model, tokenizer, config)[args.eval]
        sparsity = achieved_sparsity(records)
        rows[method] = {"ppl": ppl, "seconds": rows["sparsegpt"]["seconds"] + seconds, "train_seconds": seconds,
                        "achieved_sparsity": sparsity, "final_loss": details["loss_curve"][-1]["loss"],
                        "first_loss": details["loss_curve"][0]["loss"], "admm": details["admm"],
                        "tokens": details["tokens_per_step"] * details["steps"],
                        **({"resumed_from_step": resumed, "train_seconds_measure": "sum of step times"}
                           if resumed else {})}
        results["runs"][key] = entry
        save(results, args.json)
        print(f"{setting} {method}: ppl {fmt_ppl(ppl)} ({seconds:.0f} s training, sparsity {sparsity:.4f})",
              flush=True)


def sparsellm_reference(path: str = QUALITY_JSON) -> dict:
    """A benchmarks/quality.py JSON for the sparsellm column (by default the quality table's; a
    relative path is taken from the repository root): its protocol (:func:`file_protocol`), dense
    perplexity, layer count and SparseLLM's one-shot entries over all layers, {setting: entry}."""
    path = path if os.path.isabs(path) else os.path.join(HERE, os.pardir, path)
    results = load(path) if os.path.exists(path) else {"protocol": {}, "dense": None, "runs": {}}
    return {"protocol": file_protocol(results), "dense": results.get("dense"), "num_layers": results.get("num_layers"),
            "runs": {k.split("|")[1]: v for k, v in results["runs"].items()
                     if k.startswith("sparsellm|") and k.endswith("|all")}}


def at_protocol(reference: dict, entry: dict) -> bool:
    """Whether the quality file's numbers were measured at the protocol of the run ``entry``."""
    return reference["protocol"] == run_protocol(entry)


def dense_of(entry: dict, reference: dict) -> tuple[float | None, int | None]:
    """(dense perplexity, decoder layers) at the run's protocol: its own (runs since it was
    recorded), else the quality file's where that was measured at the same protocol."""
    if entry.get("dense") is not None:
        return entry["dense"], entry.get("num_layers")
    if at_protocol(reference, entry):
        return reference["dense"], reference["num_layers"]
    return None, None


def caption(entries: list[dict], reference: dict) -> str:
    """The table's caption: the protocol of the runs and their dense perplexity (per group of runs
    where they differ), and what the columns hold."""
    groups: dict[tuple, list[str]] = {}  # (test windows, calibration, dense) -> the runs
    layers = set()
    for e in entries:
        dense, count = dense_of(e, reference)
        layers.add(count)
        p = run_protocol(e)
        groups.setdefault((f"{p['eval_windows']} x {p['seqlen']} tokens", f"{p['nsamples']} x {p['seqlen']}",
                           fmt_ppl(dense) if dense is not None else "not measured"), []).append(label(e))
    where = f"all {layers.pop()} layers" if len(layers) == 1 and None not in layers else "all layers"
    if len(groups) == 1:
        (tokens, calibration, dense), = groups
        head = (f"Perplexity on the wiki test part ({tokens}; dense {dense}), {where}. SparseGPT: one-shot, "
                f"{calibration} calibration tokens.")
    else:
        head = (f"Perplexity on the wiki test part, {where}, at each run's protocol ("
                + "; ".join(f"{', '.join(runs)}: {tokens}, dense {dense}, {calibration} calibration tokens"
                            for (tokens, calibration, dense), runs in groups.items())
                + "). SparseGPT: one-shot.")
    return (head + " elsa and masked-adam start from that SparseGPT model and train on fresh calibration windows (the "
            "recipe column: below); residual: Elsa's ||w - z|| / ||w|| at its last z-update, before the final "
            "projection; time (min): SparseGPT's prune + masked-adam's training / Elsa's training, wall-clock on the "
            "machine named below.")


def label(entry: dict) -> str:
    """How a run is named in the table: its setting, and its tag if any."""
    return f"{entry['setting']} ({entry['tag']})" if entry.get("tag") else entry["setting"]


def machines(entries: list[dict]) -> dict[str, list[str]]:
    """{machine description: the runs measured on it}."""
    out: dict[str, list[str]] = {}
    for e in entries:
        out.setdefault(e["machine"], []).append(label(e))
    return out


def render(results: dict, reference: dict | None = None) -> str:
    """The table; ``reference``: :func:`sparsellm_reference` (by default of the file the results name)."""
    entries = sorted((e for e in results["runs"].values() if {"sparsegpt", "elsa"} <= set(e["rows"])),
                     key=lambda e: (e["setting"], e["settings"]["steps"], e.get("tag", "")))  # finished runs
    if not entries:
        return "No Elsa results yet.\n"
    if reference is None:
        reference = sparsellm_reference(results.get("sparsellm_json", QUALITY_JSON))
    sparsellm = reference["runs"]
    recipes: list[str] = []  # the distinct training recipes, numbered in the order of the rows
    for e in entries:
        if recipe(e["settings"]) not in recipes:
            recipes.append(recipe(e["settings"]))
    lines = [caption(entries, reference), "",
             "| sparsity | recipe | sparsegpt | sparsellm | masked-adam | elsa | residual | steps x tokens | time (min) "
             "| commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sparsellm_notes, other_protocol = {}, []
    for e in entries:
        r = e["rows"]
        tokens = e["settings"]["steps"] * e["settings"]["batch_size"] * e["settings"]["grad_accum"] * e["settings"]["seqlen"]
        one_shot = sparsellm.get(e["setting"])
        if one_shot and not at_protocol(reference, e):  # measured at another protocol: not comparable
            other_protocol.append(label(e))
            one_shot_cell, one_shot = "-", None
        else:
            one_shot_cell = fmt_ppl(one_shot["ppl"]) if one_shot else "not run"
        if one_shot:
            threads = one_shot.get("threads")
            sparsellm_notes[e["setting"]] = (f"{e['setting']}: {one_shot['prune_seconds'] / 60:.0f} min, "
                                             + (f"{threads} thread{'s' * (threads != 1)}, " if threads else "")
                                             + f"commit {commit_label(one_shot.get('git'))}")
        masked = r.get("masked-adam")
        admm = r["elsa"].get("admm") or [{}]
        residual = f"{admm[-1]['residual']:.3f}" if "residual" in admm[-1] else "-"
        masked_minutes = f"{masked['train_seconds'] / 60:.0f}" if masked else "-"
        minutes = f"{r['sparsegpt']['seconds'] / 60:.0f} + {masked_minutes} / {r['elsa']['train_seconds'] / 60:.0f}"
        lines.append(f"| {e['setting']} | R{recipes.index(recipe(e['settings'])) + 1} | {fmt_ppl(r['sparsegpt']['ppl'])} | "
                     f"{one_shot_cell} | "
                     f"{fmt_ppl(masked['ppl']) if masked else 'not run'} | {fmt_ppl(r['elsa']['ppl'])} | {residual} | "
                     f"{e['settings']['steps']} x {tokens // e['settings']['steps']} | {minutes} | {e['commit']} |")
    lines += ["", "Recipes: " + "; ".join(f"R{i + 1}: {text}" for i, text in enumerate(recipes)) + ".",
              "", "Machine: " + "; ".join(f"{m} ({', '.join(runs)})" for m, runs in machines(entries).items()) + "."]
    if sparsellm_notes:
        lines += ["", "sparsellm: one-shot SparseLLM over all layers with the same calibration, from "
                  "benchmarks/quality.py (its prune time, threads and commit: " + "; ".join(sparsellm_notes.values()) + ")."]
    if other_protocol:
        lines += ["", "sparsellm -: the SparseLLM entry of that setting was measured at another protocol than the run "
                  f"({', '.join(other_protocol)})."]
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
    p.add_argument("--admm-schedule", default="constant", help="lambda's ramp: constant, linear or cosine")
    p.add_argument("--admm-lambda-start", type=float, default=None, help="where a ramp starts (default lambda / 10)")
    p.add_argument("--admm-interval", type=int, default=20)
    p.add_argument("--tag", default="", help="names a recipe variant, kept beside the setting's other runs")
    p.add_argument("--score", default="fisher")
    p.add_argument("--train-precision", default="tf32",
                   help="tf32 (the CLI's default: TF32 matmuls on a GPU, float32 on the CPU), float32 or bfloat16")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--compile", action="store_true", help="train the torch.compile'd model (Elsa's --compile)")
    p.add_argument("--checkpoint-root", default=None,
                   help="keep each trained run's checkpoints under this folder: a run cut short resumes there")
    p.add_argument("--checkpoint-every", type=int, default=512)
    add_text_options(p)
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--render", action="store_true", help="only render the table from the JSON")
    p.add_argument("--merge", default=None,
                   help="add the runs of another results file (e.g. a GPU machine's elsa_gpu.json) to --json "
                        "(rows of the same run join, a different run of a key replaces it); then render")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--readme", default=None)
    p.add_argument("--sparsellm-json", default=None,
                   help="a benchmarks/quality.py JSON for the sparsellm column (default: the quality table's, "
                        "benchmarks/results/quality.json); remembered in --json")
    args = p.parse_args(argv)
    if not args.merge and not args.render:
        check_options(p, args)  # before anything is written or measured
    results = load(args.json)
    if args.sparsellm_json:
        results["sparsellm_json"] = os.path.relpath(os.path.abspath(args.sparsellm_json), os.path.join(HERE, os.pardir))
        save(results, args.json)
    if args.merge:
        merge(results, load(args.merge))
        save(results, args.json)
    elif not args.render:
        for setting in args.settings.split(","):
            measure(setting, args, results)
    text = render(results)
    if args.readme:
        write_into(args.readme, text, *MARKERS)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
