"""Markdown tables of the GPU sparse kernels' speedups, from a pytest-benchmark JSON of
benchmarks/bench_export.py (for benchmarks/RESULTS.md).

    pytest benchmarks/bench_export.py -m gpu --benchmark-max-time=0.1 --benchmark-json=gpu.json
    python benchmarks/sparse_gpu_table.py gpu.json [more.json ...] [--out table.md]

Per linear shape and token count: the dense time (median, microseconds) and each sparse
implementation's speedup over it (dense time / its time; > 1 is faster), twice: wall time
per call as pytest-benchmark measured it (Python launch path included, weight possibly
L2-resident between calls), and GPU kernel time with L2 flushed (``kernel_us``, from
gpu_timing.kernel_us), which is what a decode step sees when the launch overhead hides
behind the GPU work. End to end: tokens/s
of prefill and decode per implementation and the speedup over dense.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

LINEAR_IMPLS = ("torch-2:4", "ours-2:4", "ours-90%")
E2E_IMPLS = ("dense", "torch-2:4", "sparse-gpu-2:4", "sparse-gpu-90%")


def _median(bench: dict) -> float:
    return bench["stats"]["median"]


def linear_table(benches: list[dict], kernel: bool = False) -> list[str]:
    """Wall-time speedups (``kernel`` False) or GPU kernel-time speedups (``kernel_us``)."""
    times: dict = defaultdict(dict)  # (dtype, in, out, tokens) -> {impl: seconds}
    for b in benches:
        info = b.get("extra_info", {})
        if not b["name"].startswith("test_gpu_linear") or "impl" not in info:
            continue
        if kernel and info.get("kernel_us") is None:
            continue
        in_f, out_f = info["shape"]
        seconds = info["kernel_us"] * 1e-6 if kernel else _median(b)
        times[(info.get("dtype", "fp16"), in_f, out_f, info["tokens"])][info["impl"]] = seconds
    if not times:
        return []
    impls = [i for i in LINEAR_IMPLS if any(i in row for row in times.values())]
    lines = ["| dtype | linear (in->out) | tokens | dense (us) | " + " | ".join(f"{i} speedup" for i in impls) + " |",
             "|---|---|---:|---:|" + "---:|" * len(impls)]
    for (dtype, in_f, out_f, tokens), row in sorted(times.items()):
        dense = row.get("dense")
        cells = []
        for impl in impls:
            t = row.get(impl)
            cells.append("-" if t is None or dense is None else f"{dense / t:.2f}x")
        dense_us = "-" if dense is None else f"{dense * 1e6:.1f}"
        lines.append(f"| {dtype} | {in_f}->{out_f} | {tokens} | {dense_us} | " + " | ".join(cells) + " |")
    return lines


def e2e_table(benches: list[dict]) -> list[str]:
    rows: dict = defaultdict(dict)  # phase -> {impl: (tokens/s, seconds)}
    for b in benches:
        info = b.get("extra_info", {})
        if not b["name"].startswith("test_gpu_llama7b") or "impl" not in info:
            continue
        # a decode step that could not be captured as a CUDA graph ran eagerly: say so per row
        mode = f" ({info['decode_mode']})" if info.get("decode_mode") else ""
        if info.get("phase") == "prefill" and info.get("cusparselt_linears"):  # 2:4 prefill on cuSPARSELt
            mode = f" (cuSPARSELt in {info['cusparselt_linears']} linears)"
        rows[info["phase"]][info["impl"] + mode] = info["tokens"] / _median(b)
    if not rows:
        return []
    lines = ["| phase | impl | tokens/s | speedup vs dense |", "|---|---|---:|---:|"]
    for phase in sorted(rows, key=lambda p: p != "decode"):
        dense = next((v for k, v in rows[phase].items() if k == "dense" or k.startswith("dense (")), None)
        for impl in [i for i in E2E_IMPLS if i in rows[phase]] + sorted(set(rows[phase]) - set(E2E_IMPLS)):
            tps = rows[phase][impl]
            speed = "-" if dense is None else f"{tps / dense:.2f}x"
            lines.append(f"| {phase} | {impl} | {tps:.1f} | {speed} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    ap.add_argument("--out", default=None, help="also write the tables here")
    args = ap.parse_args(argv)
    benches = []
    for path in args.json:
        with open(path) as f:
            benches += json.load(f).get("benchmarks", [])
    devices = sorted({b.get("extra_info", {}).get("device") for b in benches} - {None})
    gpu = ", ".join(devices)
    out = []
    linear = linear_table(benches)
    if linear:
        out += ["Linear layers, wall time per call (pytest-benchmark median; speedup = dense / sparse):", ""]
        out += linear + [""]
    kernel = linear_table(benches, kernel=True)
    if kernel:
        out += ["Linear layers, GPU kernel time with L2 flushed (gpu_timing.kernel_us, median):", ""]
        out += kernel + [""]
    e2e = e2e_table(benches)
    if e2e:
        out += ["Random LLaMA-7B-shaped model, batch 1 (prefill 2048 tokens, decode 64 steps after 128):", ""] + e2e
    if not out:
        print("no GPU benchmark rows in this file (run with -m gpu on a CUDA machine)", file=sys.stderr)
        return 1
    # the kernels' config table each row ran with (kernels/sparse_configs.py; None: the fixed defaults)
    tables = sorted({json.dumps(b.get("extra_info", {}).get("kernel_configs")) for b in benches
                     if "kernel_configs" in b.get("extra_info", {})})
    if tables:
        out = [f"Kernel config table: {' / '.join(tables)}", ""] + out
    if gpu:
        out = [f"Device: {gpu}", ""] + out
    text = "\n".join(out) + "\n"
    print(text, end="")
    if args.out:  # atomic: a staged file renamed into place
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from quality import write_text

        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
