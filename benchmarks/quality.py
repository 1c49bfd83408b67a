"""Quality benchmark: perplexity of each method x sparsity setting on the default model.

The protocol (../shared/PROTOCOL.md, "wiki"): SmolLM2-135M-Instruct in float32, 32 calibration
windows of 512 tokens (seed 0) from the calibration part of the offline Wikipedia text, all
decoder layers (or a --layers range), perplexity on the first 40 non-overlapping 512-token
windows of the test part.

    python benchmarks/quality.py --methods magnitude,wanda,sparsegpt --settings 0.5,0.7,0.8,0.9,2:4,3:4
    python benchmarks/quality.py --methods sparsegpt,sparsellm --settings 0.7,0.8,0.9,3:4 --layers 0:15
    python benchmarks/quality.py --full --jobs 2 --rerun --readme README.md   # the whole table
    python benchmarks/quality.py --render --readme README.md   # only re-render, also into the README

``--full`` measures the whole table in one run: every method at every setting over all layers,
and SparseGPT and SparseLLM also over the first half of the layers (the SparseLLM paper's
setting); entries of other cells are dropped from the JSON, and without ``--rerun`` the cells it
already holds are kept (an interrupted run resumes). ``--jobs N`` runs N cells at a time in worker processes that split the machine's
threads between them; each cell records its thread count and how many jobs shared the machine.

Results accumulate in a JSON file (one entry per method, setting and layer range; existing
entries are skipped unless --rerun), and the Markdown tables are rendered from all of it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "quality.json")
DEFAULT_MD = os.path.join(HERE, "results", "quality.md")
README_START, README_END = "<!-- quality:start -->", "<!-- quality:end -->"
SETTINGS_ORDER = ["0.5", "0.7", "0.8", "0.9", "2:4", "3:4"]


def key(method: str, setting: str, layers: str) -> str:
    return f"{method}|{setting}|{layers}"


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    return {"protocol": {}, "dense": None, "runs": {}}


def save(results: dict, path: str) -> None:
    from sparsellm.report import write_report  # atomic JSON write

    write_report(results, path)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, renamed when complete):
    a table or README cut short by an error or Ctrl-C is never left half-written. The file keeps
    its permissions (a new one: 0644)."""
    import stat
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644
    fd, staged = tempfile.mkstemp(prefix=".staged.", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(staged, mode)
        os.replace(staged, path)
    except BaseException:
        if os.path.exists(staged):
            os.unlink(staged)
        raise


def machine(cpu_only: bool) -> str:
    """The machine a benchmark ran on: the GPU's name where one is used, else the CPU, its
    vector instruction set as torch uses it (machines of the same kind have differed in it, and
    with it in the rounding of the same sums: the README's quick start) and the thread count."""
    import platform

    import torch

    if torch.cuda.is_available() and not cpu_only:
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{platform.machine()} {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def add_text_options(p: argparse.ArgumentParser) -> None:
    """--calib / --eval: the wiki protocol's text, or its splits as .txt files (a machine without
    gensim; ../shared/device/prepare.sh writes them: the same tokens)."""
    p.add_argument("--calib", default="wiki", help="calibration text: wiki, or its calibration split as a .txt file")
    p.add_argument("--eval", default="wiki", help="test text: wiki, or its test split as a .txt file")


def text_sources(args) -> dict:
    """What a results file records about the text: nothing for the wiki source, else the files."""
    return {} if (args.calib, args.eval) == ("wiki", "wiki") else {"text": {"calib": args.calib, "eval": args.eval}}


WIKI_SPLIT_FILES = {"calib": "wiki_calib.txt", "eval": "wiki_test.txt"}  # ../shared/device/prepare.sh's names


def corpus(results_text: dict | None) -> dict:
    """The text a results entry measured on, for comparing protocols: the wiki source and the wiki
    splits that ../shared/device/prepare.sh writes as .txt files (the same tokens, checked there)
    are both "wiki"; any other file is its path."""
    text = results_text or {}
    return {part: "wiki" if text.get(part, "wiki") == "wiki" or os.path.basename(text[part]) == name
            else text[part] for part, name in WIKI_SPLIT_FILES.items()}


def git_state() -> dict:
    """The commit the numbers come from, and whether the tracked files differ from it (the
    results folder aside: the benchmarks write their own results there while they run).
    SPARSELLM_COMMIT names the commit where the checkout has no git history (a GPU machine gets
    a copy of the working tree: pass the commit in the command)."""
    import subprocess

    if os.environ.get("SPARSELLM_COMMIT"):
        return {"commit": os.environ["SPARSELLM_COMMIT"], "dirty": False}

    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)benchmarks/results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}


def commit_label(git: dict | None) -> str:
    """How a table names the code of a stored number (a :func:`git_state`)."""
    if not git or not git.get("commit"):
        return "not recorded"
    return git["commit"][:7] + (" with uncommitted changes" if git.get("dirty") else "")


def protocol_differences(stored: dict, protocol: dict) -> list[str]:
    """The settings (machine aside) in which two results files' ``protocol`` records differ."""
    return sorted(k for k in set(stored) | set(protocol) if k != "machine" and stored.get(k) != protocol.get(k))


def refuse_other_protocol(parser: argparse.ArgumentParser, results: dict, protocol: dict) -> None:
    """Exit 2 where ``results`` holds runs measured under another protocol (windows, calibration,
    text, dtype) than ``protocol``: one caption and one dense perplexity speak for every row of a
    file, and a run of other settings would relabel them. The machine may differ (a row records
    its own commit)."""
    stored = results.get("protocol") or {}
    differ = protocol_differences(stored, protocol)
    if results.get("runs") and stored and differ:
        parser.error("the results file holds runs of another protocol (" + ", ".join(
            f"{k}: {stored.get(k)!r} there, {protocol.get(k)!r} now" for k in differ) + "); give another --json")


def achieved_sparsity(records) -> float:
    """Zeros over all pruned weights of a run's layer records."""
    zeros = sum(round(m["sparsity"] * m["numel"]) for r in records for m in r.matrices.values())
    total = sum(m["numel"] for r in records for m in r.matrices.values())
    return zeros / total


FULL_METHODS = ("magnitude", "wanda", "sparsegpt", "sparsellm")
FULL_HALF_METHODS = ("sparsegpt", "sparsellm")  # also measured over the first half of the layers


def cells(args, num_layers: int) -> list[tuple[str, str, tuple[int, int] | None]]:
    """The (method, setting, layer range) cells this run measures."""
    settings = args.settings.split(",")
    if args.full:
        half = (0, num_layers // 2)
        return ([(m, s, None) for m in FULL_METHODS for s in settings]
                + [(m, s, half) for m in FULL_HALF_METHODS for s in settings])
    layers = tuple(int(x) for x in args.layers.split(":")) if args.layers else None
    return [(m, s, layers) for m in args.methods.split(",") for s in settings]


def check_cell_options(parser: argparse.ArgumentParser, args) -> None:
    """--methods, --settings and --layers as the cells read them: a typo is exit 2 now, not a
    traceback after the model (and the dense value) are loaded."""
    from sparsellm.methods import METHODS
    from sparsellm.sparsity import SparsityError, SparsityPattern

    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
    for setting in args.settings.split(","):
        try:
            SparsityPattern.parse(setting)
        except (SparsityError, ValueError) as err:
            parser.error(f"--settings {setting!r}: {err}")
    if args.layers:
        try:
            start, stop = (int(x) for x in args.layers.split(":"))
        except ValueError:
            parser.error(f"--layers expects START:STOP, got {args.layers!r}")
        if not 0 <= start < stop:
            parser.error(f"--layers {args.layers}: expected 0 <= START < STOP")


def cell_key(method: str, setting: str, layers: tuple[int, int] | None, args) -> str:
    k = key(method, setting, f"{layers[0]}:{layers[1]}" if layers else "all")
    k += "|non-sequential" if args.no_sequential else ""
    k += "|float64" if args.float64 else ""
    return k + (f"|{args.product_precision}" if method == "sparsellm" and args.product_precision else "")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_one(method: str, setting: str, layers: tuple[int, int] | None, args) -> dict:
    import torch

    from sparsellm import api
    from sparsellm.config import PruneConfig, SparseLLMSettings

    extra = {}
    if method == "sparsellm" and args.product_precision:
        extra["sparsellm"] = SparseLLMSettings(product_precision=args.product_precision)
    config = PruneConfig(method=method, sparsity=setting, layers=layers, nsamples=args.nsamples,
                         seqlen=args.seqlen, seed=0, calib=args.calib, eval=(args.eval,),
                         eval_windows=args.eval_windows, quiet=not args.progress, device="cpu" if args.cpu else None,
                         sequential=not args.no_sequential, **extra)
    model, tokenizer = load_model(config, args)
    start = time.perf_counter()
    records = api.prune(model, tokenizer, config)
    seconds = time.perf_counter() - start
    ppl = api.evaluate(model, tokenizer, config)[args.eval]
    return {"method": method, "setting": setting, "layers": list(layers) if layers else "all", "ppl": ppl,
            "sequential": config.sequential, **({"product_precision": args.product_precision} if extra else {}),
            **({"dtype": "float64"} if args.float64 else {}),
            "git": git_state(), "measured": time.strftime("%Y-%m-%d"),
            "threads": torch.get_num_threads(), "jobs": args.jobs,
            "prune_seconds": seconds, "achieved_sparsity": achieved_sparsity(records),
            "ffn_rel_error": [r.ffn_rel_error for r in records],
            "output_rel_error": [r.output_rel_error for r in records]}


def load_model(config, args):
    """The model and tokenizer of ``config``, the model in float64 with ``--float64`` (the local
    methods then compute in float64 too: ``sparsellm.precision.solve_dtype``)."""
    from sparsellm import api

    model, tokenizer = api.load_model(config.model)
    return (model.double() if args.float64 else model), tokenizer


def dense_ppl(args) -> tuple[float, int]:
    """The dense model's perplexity on ``args.eval`` at the protocol of ``args``, and its decoder layers."""
    from sparsellm import api
    from sparsellm.config import PruneConfig

    config = PruneConfig(nsamples=args.nsamples, seqlen=args.seqlen, eval=(args.eval,),
                         eval_windows=args.eval_windows, quiet=not args.progress, device="cpu" if args.cpu else None)
    model, tokenizer = load_model(config, args)
    return api.evaluate(model, tokenizer, config)[args.eval], model.config.num_hidden_layers


def measure(todo: list, args):
    """Yield (method, setting, layers, entry) for each cell of ``todo``: in this process, or in
    ``args.jobs`` worker processes, the longest cells first, as they finish."""
    if args.jobs == 1:
        for cell in todo:
            yield (*cell, run_one(*cell, args))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    threads = max(1, torch.get_num_threads() // args.jobs)
    cost = {"sparsellm": 0, "sparsegpt": 1, "wanda": 2, "magnitude": 3}
    todo = sorted(todo, key=lambda c: (cost.get(c[0], 9), c[2] is not None))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(run_one, *cell, args): cell for cell in todo}
        for future in as_completed(futures):
            yield (*futures[future], future.result())


def fmt_ppl(value) -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{value:.4g}" if value < 1e5 else f"{value:.3g}"


# the wiki protocol: what a results file older than the record of its protocol was measured at
PROTOCOL_DEFAULTS = {"eval_windows": 40, "seqlen": 512, "nsamples": 32, "seed": 0}


def protocol_caption(proto: dict) -> str:
    """The start of a perplexity table's caption: the test windows, the calibration and the seed
    of a results file's ``protocol`` (the wiki protocol's values where one is not recorded)."""
    p = {**PROTOCOL_DEFAULTS, **{k: v for k, v in proto.items() if v is not None}}
    return (f"Perplexity on the wiki test part ({p['eval_windows']} windows of {p['seqlen']} tokens), "
            f"calibration {p['nsamples']} x {p['seqlen']} tokens, seed {p['seed']}")


def render(results: dict) -> str:
    runs = list(results["runs"].values())
    rows: dict[tuple[str, str], dict] = {}
    for run in runs:
        label = run["method"] if run["layers"] == "all" else f"{run['method']} (layers {run['layers'][0]}:{run['layers'][1]})"
        if not run.get("sequential", True):
            label += " (non-sequential)"
        if run.get("product_precision"):
            label += f" ({run['product_precision']} products)"
        rows.setdefault((label, str(run["layers"])), {})[run["setting"]] = run
    settings = [s for s in SETTINGS_ORDER if any(s in r for r in rows.values())]
    settings += sorted({s for r in rows.values() for s in r} - set(settings))
    proto = results.get("protocol", {})
    lines = [f"{protocol_caption(proto)}. N:M = N pruned of every M. Dense: {fmt_ppl(results.get('dense'))}.", ""]
    header = "| method | " + " | ".join(settings) + " |"
    lines += [header, "|" + "---|" * (len(settings) + 1)]
    order = {"magnitude": 0, "wanda": 1, "sparsegpt": 2, "sparsellm": 3}
    sorted_rows = sorted(rows.items(), key=lambda kv: (kv[0][1] != "all", order.get(kv[0][0].split()[0], 9), kv[0][0]))
    for (label, _), cells in sorted_rows:
        lines.append(f"| {label} | " + " | ".join(fmt_ppl(cells[s]["ppl"]) if s in cells else "" for s in settings) + " |")
    lines += ["", "Prune time in seconds (this machine):", "", header, "|" + "---|" * (len(settings) + 1)]
    for (label, _), cells in sorted_rows:
        lines.append(f"| {label} | " + " | ".join(f"{cells[s]['prune_seconds']:.0f}" if s in cells else ""
                                                  for s in settings) + " |")
    by_commit: dict[str, list[str]] = {}
    for (label, _), cells in sorted_rows:
        for setting in settings:
            if setting in cells:
                commit = commit_label(cells[setting].get("git"))
                if commit == "not recorded":
                    commit += " (code older than the recording)"
                by_commit.setdefault(commit, []).append(f"{label} {setting}")
    sharing = {(cell.get("threads"), cell.get("jobs")) for row in rows.values() for cell in row.values()}
    if len(sharing) == 1 and None not in next(iter(sharing)):
        threads, jobs = next(iter(sharing))
        timing = (f"Times are wall-clock, each cell on {threads} thread{'s' * (threads > 1)}"
                  + (f" with {jobs} cells measured at a time." if jobs > 1 else ", one cell at a time."))
    else:
        timing = "Times are wall-clock, some with other jobs sharing the two cores."
    if len(by_commit) == 1 and not next(iter(by_commit)).startswith("not"):
        code = f"Code of every cell: commit {next(iter(by_commit))}"
    else:
        code = "Code of each cell: " + "; ".join(f"commit {c}: {', '.join(cells)}" if not c.startswith("not")
                                                 else f"{c}: {', '.join(cells)}" for c, cells in by_commit.items())
    lines += ["", code + ". " + timing]
    machine = proto.get("machine")
    if machine:
        lines += ["", f"Machine: {machine}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--settings", default=",".join(SETTINGS_ORDER))
    p.add_argument("--layers", default=None, help="START:STOP range (default: all layers)")
    p.add_argument("--full", action="store_true",
                   help="the whole table: every method at every setting over all layers, and SparseGPT and "
                        "SparseLLM over the first half of the layers (--methods and --layers are ignored)")
    p.add_argument("--jobs", type=int, default=1, help="cells measured at a time, in worker processes")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--markdown", default=DEFAULT_MD)
    p.add_argument("--rerun", action="store_true", help="recompute entries already in the JSON")
    p.add_argument("--render", action="store_true", help="only render the Markdown from the JSON")
    p.add_argument("--no-sequential", action="store_true",
                   help="gather each layer's statistics from the dense layer, as the reference code does")
    p.add_argument("--cpu", action="store_true", help="force the CPU even where CUDA is present")
    p.add_argument("--float64", action="store_true",
                   help="model, statistics and the local methods' solves in float64 (rounding-free comparisons; "
                        "SparseLLM's FFN solver stays float32); separate cells")
    add_text_options(p)
    p.add_argument("--product-precision", default=None, choices=("tf32", "float32", "bfloat16"),
                   help="SparseLLM's product precision (default: the method's; a separate row)")
    p.add_argument("--progress", action="store_true", help="show per-layer progress bars")
    p.add_argument("--readme", default=None,
                   help=f"also put the tables into this Markdown file between {README_START} and {README_END}")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    check_cell_options(p, args)

    results = load(args.json)
    if not args.render:
        protocol = {"model": "smollm2", "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "eval_windows": args.eval_windows, "seed": 0, **({"dtype": "float64"} if args.float64 else {}),
                    "machine": machine(args.cpu) + (f" shared by {args.jobs} jobs" if args.jobs > 1 else ""),
                    **text_sources(args)}
        refuse_other_protocol(p, results, protocol)
        # a file without runs may still hold the dense value of another protocol (its cells were
        # dropped, or failed): measured again, not captioned with this protocol
        stale = bool(protocol_differences(results.get("protocol") or {}, protocol))
        results["protocol"] = protocol
        if results.get("dense") is None or results.get("num_layers") is None or args.rerun or stale:
            results["dense"], results["num_layers"] = dense_ppl(args)
            save(results, args.json)
            print(f"dense: {results['dense']:.4f}", flush=True)
        planned = cells(args, results["num_layers"])
        if args.full:  # the table is this run's cells only (kept ones resume an interrupted run)
            keys = {cell_key(*c, args) for c in planned}
            results["runs"] = {k: v for k, v in results["runs"].items() if k in keys}
            save(results, args.json)
        todo = [c for c in planned if args.rerun or cell_key(*c, args) not in results["runs"]]
        for method, setting, layers, entry in measure(todo, args):
            results["runs"][cell_key(method, setting, layers, args)] = entry
            save(results, args.json)
            print(f"{method} {setting} layers={'%d:%d' % layers if layers else 'all'}: ppl {fmt_ppl(entry['ppl'])}, "
                  f"prune {entry['prune_seconds']:.1f}s, sparsity {entry['achieved_sparsity']:.4f}", flush=True)
    text = render(results)
    write_text(args.markdown, text)
    if args.readme:
        write_into(args.readme, text)
    print(text)
    return 0


def write_into(path: str, text: str, start_marker: str = README_START, end_marker: str = README_END) -> None:
    """Replace what lies between the two markers of a Markdown file with ``text``."""
    with open(path) as handle:
        doc = handle.read()
    start, end = doc.find(start_marker), doc.find(end_marker)
    if start < 0 or end < start:
        raise SystemExit(f"{path} lacks the markers {start_marker} ... {end_marker}")
    write_text(path, doc[:start + len(start_marker)] + "\n" + text + doc[end:])


if __name__ == "__main__":
    sys.exit(main())
