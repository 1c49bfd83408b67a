"""Elsa's cost per training step on a random LLaMA-2-7B-shaped model: seconds and tokens/s per
step, peak memory, bytes per prunable weight, for the ordinary run and FSDP2 (issue 10: "the
throughput and memory per step of a 7B-shaped random model, FSDP2 on one GPU at least").

The model is that of ``prune_7b.py`` (LLaMA-2-7B's layer shapes, ``--layers`` decoder layers of
random weights, saved in float16 and trained in ``--dtype``); the windows are real text (any .txt,
e.g. the offline wiki text of ``../shared/device/prepare.sh``). Each run is its own
``sparsellm-prune --method elsa`` process, started plainly or, for ``fsdp``, by
``torchrun --nproc-per-node N ... --fsdp`` (one process included: FSDP2 over one device), so
its peak memory is its own. Elsa starts from the dense weights (no ``--init``), every
``--admm-interval`` steps a z/u update (the projection), which the mean step time carries.

    python benchmarks/elsa_7b.py --tokenizer .device-data/tok --calib .device-data/wiki_calib.txt \\
        --runs plain:float32,fsdp:float32,fsdp:bfloat16 --layers 4 --out $OUT/elsa_7b.json

A run is MODE:STATE_DTYPE[:PROCESSES[:PRECISION[:compile]]] with MODE plain or fsdp, PRECISION the
training passes' arithmetic (``--train-precision``: tf32, the default, float32 or bfloat16) and
``compile`` for ``--compile`` (the step times then exclude the first steps, which compile);
``--shape smollm2-135m --layers 30`` is the default model's shape, whose step is many small kernels;
``--tiny`` swaps the 7B shapes for a toy model (hidden 64), for a CPU smoke run of the script
(gloo there), and lowers the defaults not given to ``--steps 4 --seqlen 128 --runs
plain:float32,fsdp:bfloat16`` (``--device cpu`` is still needed on a machine without CUDA):

    python benchmarks/elsa_7b.py --tiny --device cpu --tokenizer .device-data/tok --calib .device-data/wiki_calib.txt
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from prune_7b import (add_run, base_parser, build_model, new_result, origin_text, parse_args,  # noqa: E402
                      require_device, shape_text)

MODES = ("plain", "fsdp")
WARMUP_STEPS = 2  # the first steps pay allocator growth and kernel selection


def parse_run(spec: str) -> dict:
    parts = spec.split(":")
    usage = (f"--runs: {spec!r} is not MODE:STATE_DTYPE[:PROCESSES[:PRECISION[:compile]]] with MODE one of "
             f"{', '.join(MODES)}")
    if len(parts) not in (2, 3, 4, 5) or parts[0] not in MODES or (len(parts) == 5 and parts[4] != "compile") \
            or (len(parts) >= 3 and not parts[2].isdigit()):
        raise ValueError(usage)
    processes = int(parts[2]) if len(parts) >= 3 else 1
    if parts[0] == "plain" and processes != 1:
        raise ValueError(f"--runs: {spec!r}: a plain run is one process")
    return {"mode": parts[0], "state_dtype": parts[1], "processes": processes,
            "precision": parts[3] if len(parts) >= 4 else "tf32", "compile": len(parts) == 5}


def command(model_dir: str, run: dict, report: str, args) -> list[str]:
    cli = ["-m", "sparsellm.cli", "--model", model_dir, "--method", "elsa", "--sparsity", args.sparsity,
           "--calib", args.calib, "--eval", "none", "--no-dense-eval", "--nsamples", "1",
           "--seqlen", str(args.seqlen), "--dtype", args.dtype, "--device", args.device, "--quiet",
           "--report", report, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--admm-interval", str(args.admm_interval), "--state-dtype", run["state_dtype"],
           "--train-precision", run["precision"]] + (["--compile"] if run["compile"] else [])
    if run["mode"] == "plain":
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={run['processes']}", *cli, "--fsdp"]


def run_one(model_dir: str, run: dict, args) -> dict:
    tag = f"{run['mode']}_{run['state_dtype']}_{run['processes']}_{run['precision']}{'_compile' if run['compile'] else ''}"
    report = os.path.join(args.workdir, f"{tag}.json")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command(model_dir, run, report, args), capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired as e:  # a hung run (e.g. a stuck rendezvous) must not sink the rest
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return dict(run, rc="timeout", error=f"killed after {args.timeout} s: {err[-2000:]}")
    row = dict(run, rc=proc.returncode, process_seconds=round(time.perf_counter() - start, 2))
    if proc.returncode or not os.path.exists(report):
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
        return row
    with open(report) as handle:
        rep = json.load(handle)
    d = rep["method_details"]
    steps = [e["seconds"] for e in d["loss_curve"]]
    steady = steps[WARMUP_STEPS:] or steps
    row.update(fsdp=d.get("fsdp"), tokens_per_step=d["tokens_per_step"], prunable_parameters=d["prunable_parameters"],
               first_step_seconds=round(steps[0], 3), median_step_seconds=round(statistics.median(steady), 4),
               mean_step_seconds=round(statistics.fmean(steady), 4),
               tokens_per_second=round(d["tokens_per_step"] / statistics.fmean(steady), 1),
               train_seconds=round(d["train_seconds"], 2), prune_seconds=round(rep["prune_seconds"], 2),
               peak_memory_bytes=rep["peak_memory_bytes"], peak_memory=rep["peak_memory"],
               peak_bytes_per_prunable_weight=round(rep["peak_memory_bytes"] / d["prunable_parameters"], 2),
               state_bytes_per_param=d["state_bytes_per_param"],
               state_bytes_per_param_per_process=d.get("state_bytes_per_param_per_process"),
               last_loss=d["loss_curve"][-1]["loss"], last_residual=(d["admm"] or [{}])[-1].get("residual"))
    return row


def render(result: dict) -> str:
    lines = ["| run | state dtype | processes | precision | step s (median) | step s (mean, with z-updates) | tokens/s "
             "| first step s | peak memory GB | peak B / prunable weight | state B / prunable weight (per process) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        head = (f"| {r['mode']} | {r['state_dtype']} | {r['processes']} | {r.get('precision', 'float32')}"
                f"{', compiled' if r.get('compile') else ''} ")
        if "median_step_seconds" not in r:
            lines.append(head + f"| failed (rc {r['rc']}) | | | | | | |")
            continue
        per_process = r["state_bytes_per_param_per_process"]
        lines.append(head + f"| {r['median_step_seconds']} | {r['mean_step_seconds']} | {r['tokens_per_second']:.0f} "
                     f"| {r['first_step_seconds']} | {r['peak_memory_bytes'] / 1e9:.2f} "
                     f"| {r['peak_bytes_per_prunable_weight']} | {r['state_bytes_per_param']}"
                     f"{f' ({per_process:.2f})' if per_process is not None else ''} |")
    s = result["settings"]
    lines += ["", f"Elsa at {s['sparsity']} from the dense weights, {shape_text(result)} "
              f"({result['runs'][0].get('prunable_parameters', '?')} prunable weights), trained in {s['dtype']}; "
              f"{s['steps']} steps of {s['batch_size']} x {s['seqlen']} tokens, a z-update every "
              f"{s['admm_interval']} steps, times over the steps after the first {WARMUP_STEPS}; {origin_text(result)}."]
    return "\n".join(lines)


# --tiny: a CPU smoke run in well under two minutes (each run is a process that takes ~25 s to
# start on 2 shared cores, so two runs: plain, and fsdp with the bfloat16 state, cover both modes
# and both state dtypes)
TINY_DEFAULTS = {"steps": 4, "seqlen": 128, "runs": "plain:float32,fsdp:bfloat16"}


def main(argv=None) -> int:
    ap = base_parser(__doc__, TINY_DEFAULTS)
    ap.add_argument("--runs", default="plain:float32,fsdp:float32,fsdp:bfloat16",
                    help="comma-separated MODE:STATE_DTYPE[:PROCESSES[:PRECISION[:compile]]], MODE plain or fsdp")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sparsity", default="0.9")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per step and process")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--admm-interval", type=int, default=4)
    ap.add_argument("--dtype", default="float32", help="the dtype the weights train in")
    args = parse_args(ap, argv)
    require_device(ap, args.device)
    try:
        runs = [parse_run(spec) for spec in args.runs.split(",")]
    except ValueError as exc:
        ap.error(str(exc))  # exit 2, before the model is built
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="elsa7b-")
    model_dir = os.path.join(args.workdir, "model")
    build_model(args.tokenizer, model_dir, args.layers, args.shape, args.device)
    result = new_result(args.device, {k: getattr(args, k) for k in ("layers", "sparsity", "steps", "batch_size",
                                                                    "seqlen", "admm_interval", "dtype", "shape")})
    for run in runs:
        add_run(result, run_one(model_dir, run, args), args.out, unprinted=("peak_memory",))
    print(render(result))
    return 0 if all("median_step_seconds" in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
