"""End-to-end prune benchmark on a random LLaMA-2-7B-shaped model: time and peak memory per
method and backend (issue 12: SparseLLM's time against SparseGPT's at 7B shapes).

The model has LLaMA-2-7B's layer shapes (hidden 4096, FFN 11008, 32 heads) and ``--layers``
decoder layers of random float16 weights; the calibration text is real (any .txt file, e.g.
the offline wiki text that ``../shared/device/prepare.sh`` writes). Each run is a separate
``sparsellm-prune`` process, so its peak memory and its one-off costs (Triton compiling its
kernels, CUDA context) are its own; the table gives both the whole prune time and the
steady-state time per layer (median over the layers after the first, which pays the compiles).

    python benchmarks/prune_7b.py --tokenizer .device-data/tok --calib .device-data/wiki_calib.txt \\
        --runs sparsegpt:0.7:auto,sparsellm:0.7:auto --layers 3 --out $OUT/prune_7b.json

``--tiny`` swaps the 7B shapes for a toy model (hidden 64), for a CPU smoke run of the script,
and lowers the calibration to ``--nsamples 8 --seqlen 128`` unless given (``--device cpu`` is
still needed on a machine without CUDA):

    python benchmarks/prune_7b.py --tiny --device cpu --tokenizer .device-data/tok --calib .device-data/wiki_calib.txt

``--shape`` names another shape (``smollm2-135m``: the default model's; ``--shape tiny`` is ``--tiny``).
``--profile DIR`` runs each prune under torch.profiler instead (``profile_prune.py``: where the
time goes, by named part of the prune and by operator or kernel), into DIR/<run>.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quality import git_state, machine, save  # noqa: E402


# The random models' shapes: (name in the tables, LlamaConfig fields); the vocabulary is the tokenizer's
SHAPES = {
    "llama2-7b": ("LLaMA-2-7B", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                     num_key_value_heads=32)),
    # the default model's (a small model: its steps are many small kernels, so launch-bound on a GPU)
    "smollm2-135m": ("SmolLM2-135M", dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                          num_key_value_heads=3, tie_word_embeddings=True)),
    "tiny": ("toy (hidden 64)", dict(hidden_size=64, intermediate_size=172, num_attention_heads=4,
                                     num_key_value_heads=4)),
}


def build_model(tokenizer_dir: str, out: str, layers: int, shape: str, device: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(num_hidden_layers=layers, vocab_size=len(tok), max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[shape][1])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def run_one(model_dir: str, method: str, sparsity: str, backend: str, extra: list[str], args) -> dict:
    tag = "_".join([method, sparsity.replace(":", "_"), backend] + [e.replace("=", "-") for e in extra])
    report = os.path.join(args.workdir, f"{tag}.json")
    program = ["-m", "sparsellm.cli"]
    if args.profile:  # the same command under torch.profiler (benchmarks/profile_prune.py)
        stem = os.path.join(args.profile, tag)
        program = [os.path.join(HERE, "profile_prune.py"), "--out", f"{stem}.json", "--table", f"{stem}.md",
                   "--title", tag, "--"]
    cmd = [sys.executable, *program, "--model", model_dir, "--method", method, "--sparsity", sparsity,
           "--backend", backend, "--calib", args.calib, "--eval", "none", "--no-dense-eval",
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--dtype", "float16",
           "--device", args.device, "--quiet", "--report", report]
    for option in extra:  # NAME=VALUE -> --NAME VALUE
        name, _, value = option.partition("=")
        cmd += [f"--{name}"] + ([value] if value else [])
    start = time.perf_counter()
    row = {"method": method, "sparsity": sparsity, "backend": backend, "options": extra}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:  # one hung run must not sink the others (as in elsa_7b.py)
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return dict(row, rc="timeout", error=f"killed after {args.timeout} s: {err[-2000:]}")
    wall = time.perf_counter() - start
    row.update(rc=proc.returncode, process_seconds=round(wall, 2))
    if proc.returncode or not os.path.exists(report):
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
        return row
    with open(report) as handle:
        rep = json.load(handle)
    layer_seconds = [e["seconds"] for e in rep["layer_errors"]]
    row.update(prune_seconds=round(rep["prune_seconds"], 2), layer_seconds=[round(s, 2) for s in layer_seconds],
               # moving each layer to the GPU and back, outside its seconds; the rest of prune_seconds
               # is paid once (the calibration windows, the capture of the first layer's inputs)
               placement_seconds=[round(e.get("placement_seconds", 0.0), 3) for e in rep["layer_errors"]],
               steady_layer_seconds=round(statistics.median(layer_seconds[1:]), 2) if len(layer_seconds) > 1 else None,
               peak_memory_bytes=rep.get("peak_memory_bytes"), aux_buffer_bytes=rep.get("aux_buffer_bytes"),
               backend_usage=rep.get("backend_usage"), backend_fallbacks=rep.get("backend_fallbacks"),
               ffn_rel_error=[round(e["ffn_rel_error"], 5) for e in rep["layer_errors"]],
               aux_device=[(e.get("diagnostics") or {}).get("aux_device") for e in rep["layer_errors"]])
    return row


def new_result(device: str, settings: dict) -> dict:
    """The results file of a 7B-shaped benchmark: commit (see quality.git_state), device, torch,
    the settings, and no runs yet."""
    import torch

    return {"git": git_state(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "machine": machine(not device.startswith("cuda")),
            "torch": torch.__version__, "settings": settings, "runs": []}


def add_run(result: dict, row: dict, out: str | None, unprinted: tuple[str, ...] = ()) -> None:
    """Keep ``row``, print it (its error in full on stderr) and rewrite ``out``: a benchmark cut
    short keeps the runs it finished."""
    result["runs"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("error", *unprinted)}), flush=True)
    if "error" in row:
        print(row["error"], file=sys.stderr)
    if out:
        save(result, out)  # atomic: a run killed while writing keeps the runs written before


def shape_text(result: dict) -> str:
    s = result["settings"]
    shape = s.get("shape") or ("tiny" if s.get("tiny") else "llama2-7b")  # results from before --shape
    return f"{s['layers']} decoder layers of {SHAPES[shape][0]} shape"


def origin_text(result: dict) -> str:
    return (f"{result['device']}, torch {result['torch']}; commit {result['git']['commit'][:7]}"
            f"{' (dirty)' if result['git']['dirty'] else ''}")


def tiny_text(tiny_defaults: dict) -> str:
    """The options ``--tiny`` lowers, as command-line flags."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in tiny_defaults.items())


def base_parser(doc: str, tiny_defaults: dict) -> argparse.ArgumentParser:
    """The options every 7B-shaped benchmark takes; each adds ``--runs`` and its own, and parses
    with :func:`parse_args`, where ``--tiny`` (or ``--shape tiny``) also sets ``tiny_defaults``
    for the options not given."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder holding the tokenizer files")
    ap.add_argument("--calib", required=True, help="calibration text (.txt)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES), help="the decoder layers' shape")
    ap.add_argument("--tiny", dest="shape", action="store_const", const="tiny",
                    help=f"toy shapes, for a CPU smoke run (--shape tiny); also lowers the defaults of the options "
                         f"not given to {tiny_text(tiny_defaults)}")
    ap.set_defaults(tiny_defaults=tiny_defaults)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--out", default=None, help="JSON results (the table is printed)")
    ap.add_argument("--workdir", default=None)
    return ap


def parse_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse; with the toy shape, again with the parser's ``tiny_defaults`` as the defaults (an
    option given on the command line keeps its value)."""
    args = ap.parse_args(argv)
    if args.shape == "tiny":
        ap.set_defaults(**args.tiny_defaults)
        args = ap.parse_args(argv)
    del args.tiny_defaults
    return args


def require_device(ap: argparse.ArgumentParser, device: str) -> None:
    """A CUDA --device on a machine without one: exit 2 now, with the way out (torch's own error
    is a traceback after the model is built)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {device}: no CUDA device here; use --tiny --device cpu for a CPU check")


def render(result: dict) -> str:
    rows = result["runs"]
    base = {(r["sparsity"], r["backend"]): r for r in rows
            if r["method"] == "sparsegpt" and "prune_seconds" in r and not r.get("options")}
    lines = ["| method | sparsity | backend | options | prune s | per layer s (steady) | x SparseGPT (steady) "
             "| peak memory GB | FFN buffers GB | FFN rel. error per layer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "prune_seconds" not in r:
            lines.append(f"| {r['method']} | {r['sparsity']} | {r['backend']} | {' '.join(r.get('options', []))} "
                         f"| failed (rc {r['rc']}) | | | | | |")
            continue
        ref = base.get((r["sparsity"], r["backend"])) or base.get((r["sparsity"], "auto"))
        ratio = ""
        if ref and r["steady_layer_seconds"] and ref["steady_layer_seconds"]:
            ratio = f"{r['steady_layer_seconds'] / ref['steady_layer_seconds']:.2f}"
        gb = lambda b: f"{b / 1e9:.1f}" if b else ""  # noqa: E731
        errors = " ".join(f"{e:.4f}" for e in r["ffn_rel_error"])
        places = sorted({d for d in r.get("aux_device") or () if d})  # where the FFN buffers lived
        where = f" ({', '.join('host' if d == 'cpu' else d for d in places)})" if places else ""
        lines.append(f"| {r['method']} | {r['sparsity']} | {r['backend']} | {' '.join(r.get('options', []))} | "
                     f"{r['prune_seconds']} | {r['steady_layer_seconds']} | {ratio} | {gb(r['peak_memory_bytes'])} | "
                     f"{gb(r['aux_buffer_bytes'])}{where} | {errors} |")
    s = result["settings"]
    lines.append("")
    lines.append(f"{shape_text(result)}, float16, {s['nsamples']} x {s['seqlen']} calibration tokens; "
                 f"{origin_text(result)}{'; under torch.profiler' if s.get('profiled') else ''}.")
    return "\n".join(lines)


TINY_DEFAULTS = {"nsamples": 8, "seqlen": 128}  # --tiny: a CPU smoke run in well under two minutes


def parse_run(ap: argparse.ArgumentParser, spec: str) -> tuple[str, str, str, list[str]]:
    """(method, sparsity, backend, options) of a --runs entry METHOD:SPARSITY:BACKEND[:OPTION=VALUE...];
    a malformed one is exit 2 (it was a traceback after the model was built)."""
    from sparsellm.methods import METHODS
    from sparsellm.sparsity import SparsityPattern

    parts = spec.split(":")
    method, sparsity, backend, *extra = parts + [""] * (3 - len(parts))  # a short one: refused below
    try:
        if len(parts) < 3:
            raise ValueError("too few fields")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
        if not backend:
            raise ValueError("no backend")
        SparsityPattern.parse(sparsity.replace("-", ":"))
    except ValueError as exc:
        ap.error(f"--runs: {spec!r} is not METHOD:SPARSITY:BACKEND[:OPTION=VALUE...] ({exc})")
    return method, sparsity.replace("-", ":"), backend, extra


def main(argv=None) -> int:
    ap = base_parser(__doc__, TINY_DEFAULTS)
    ap.add_argument("--runs", default="sparsegpt:0.7:auto,sparsellm:0.7:auto",
                    help="comma-separated METHOD:SPARSITY:BACKEND[:OPTION=VALUE...] (an N:M sparsity as 2-4; "
                         "options are CLI flags without the dashes, e.g. product-precision=float32)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="run every prune under torch.profiler (benchmarks/profile_prune.py) and write its tables "
                         "to DIR/<run>.md and .json; the times in the table are then the profiled ones")
    args = parse_args(ap, argv)
    require_device(ap, args.device)
    runs = [parse_run(ap, spec) for spec in args.runs.split(",")]  # before the (7B) model is built
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="prune7b-")
    model_dir = os.path.join(args.workdir, "model")
    build_model(args.tokenizer, model_dir, args.layers, args.shape, args.device)
    result = new_result(args.device, {"layers": args.layers, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                      "shape": args.shape, "dtype": "float16", "profiled": bool(args.profile)})
    for method, sparsity, backend, extra in runs:
        add_run(result, run_one(model_dir, method, sparsity, backend, extra, args), args.out)
    print(render(result))
    return 0 if all("prune_seconds" in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
