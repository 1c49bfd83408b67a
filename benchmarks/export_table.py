"""Markdown table for the "Sparse export" section of benchmarks/RESULTS.md.

1. CPU: dense ``F.linear`` vs float32 CSR (:class:`sparsellm.export.CSRLinear`) on a
   4096x4096 linear at several sparsities and token batches -- the measurement behind
   ``sparsellm.export.CSR_MIN_SPARSITY``.
2. Checkpoint size: ``save_pruned(save_format="dense")`` vs ``"compressed"`` (sparse-bitmask)
   for a small random LLaMA pruned to 50/70/90% (random masks; size depends only on the count
   of non-zeros), in float32 and bfloat16, with the load round trip checked bit for bit.

    python benchmarks/export_table.py [--out table.md] [--json results.json] [--quick] [--smollm-shape]

The table names the commit it measured (``quality.git_state``); ``--json`` also stores its rows
with the commit, the command, the machine and the date.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from quality import commit_label, git_state, save, write_text
from torch import nn


def _time_ms(fn, min_time=0.3, max_reps=200) -> float:
    """Median wall time in ms: a warm-up call, then repeats until ``min_time`` has passed
    (the median resists the noise of a shared machine)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def csr_rows(size=4096, sparsities=(0.5, 0.7, 0.8, 0.9, 0.95), tokens=(1, 16, 128), min_time=0.3):
    from sparsellm.export import CSRLinear

    rows = []
    gen = torch.Generator().manual_seed(0)
    for sparsity in sparsities:
        lin = nn.Linear(size, size, bias=True)
        with torch.no_grad():
            lin.weight.masked_fill_(torch.rand(lin.weight.shape, generator=gen) < sparsity, 0)
        csr = CSRLinear(lin)
        for t in tokens:
            x = torch.randn(t, size, generator=gen)
            with torch.no_grad():
                torch.testing.assert_close(csr(x), lin(x), rtol=1e-4, atol=1e-4)
                dense_ms = _time_ms(lambda: F.linear(x, lin.weight, lin.bias), min_time)
                csr_ms = _time_ms(lambda: csr(x), min_time)
            rows.append((sparsity, t, dense_ms, csr_ms))
    return rows


def _random_llama(dtype, shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()


SMALL_LLAMA = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=2048)
# SmolLM2-135M's shape (the project's default model), random weights
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def size_rows(shape, dtypes=(torch.float32, torch.bfloat16), sparsities=(0.5, 0.7, 0.9)):
    from sparsellm.export import load_pruned, save_pruned

    rows = []
    for dtype in dtypes:
        base = _random_llama(dtype, shape)
        for sparsity in sparsities:
            model = _random_llama(dtype, shape)
            model.load_state_dict(base.state_dict())
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, mod in model.named_modules():
                    if isinstance(mod, nn.Linear) and ".layers." in name:
                        mod.weight.masked_fill_(torch.rand(mod.weight.shape, generator=gen) < sparsity, 0)
            sizes, secs = {}, {}
            with tempfile.TemporaryDirectory() as tmp:
                for fmt in ("dense", "compressed"):
                    t0 = time.perf_counter()
                    out = save_pruned(model, None, Path(tmp) / fmt, sparsity_structure="unstructured", save_format=fmt)
                    t1 = time.perf_counter()
                    loaded, _ = load_pruned(out)
                    t2 = time.perf_counter()
                    a, b = model.state_dict(), loaded.state_dict()
                    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a), "round trip"
                    sizes[fmt] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
                    secs[fmt] = (t1 - t0, t2 - t1)
            rows.append((str(dtype).replace("torch.", ""), sparsity, sizes["dense"], sizes["compressed"], secs))
    return rows


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # the machine may be shared: say how busy it was
        load = ", load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = ""
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()} {platform.machine()}{load}")


def render(csr, sizes_by_model, command, size=4096, git=None, machine_text=None) -> str:
    out = [f"Command: `{command}`  ", f"Commit: {commit_label(git)}  ", f"Machine: {machine_text or machine()}", ""]
    out += [f"CPU, {size}x{size} linear with bias, float32, median ms per call (dense `F.linear` vs `CSRLinear`):", "",
            "| sparsity | tokens | dense ms | CSR ms | CSR speedup |", "|---:|---:|---:|---:|---:|"]
    for sparsity, t, d, c in csr:
        out.append(f"| {sparsity:.0%} | {t} | {d:.2f} | {c:.2f} | {d / c:.2f}x |")
    for label, rows in sizes_by_model:
        out += ["", f"Checkpoint size, {label} (targeted = decoder-layer linears; embeddings/lm_head dense):", "",
                "| dtype | sparsity | dense MB | compressed MB | dense / compressed | save s (dense / compr.) "
                "| load s (dense / compr.) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for dtype, sparsity, dense, comp, secs in rows:
            out.append(f"| {dtype} | {sparsity:.0%} | {dense / 1e6:.2f} | {comp / 1e6:.2f} | {dense / comp:.2f}x "
                       f"| {secs['dense'][0]:.2f} / {secs['compressed'][0]:.2f} "
                       f"| {secs['dense'][1]:.2f} / {secs['compressed'][1]:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--json", help="also store the rows here, with the commit, command, machine and date")
    parser.add_argument("--quick", action="store_true", help="short timings, fewer points (smoke run)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads, at least 1 (default: torch's choice)")
    parser.add_argument("--smollm-shape", action="store_true",
                        help="add checkpoint sizes for a random model of SmolLM2-135M's shape")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = 1024 if args.quick else 4096
    if args.quick:
        csr = csr_rows(size=size, sparsities=(0.5, 0.9), tokens=(1, 16), min_time=0.02)
    else:
        csr = csr_rows()
    sizes = [("small random LLaMA (hidden 512, 4 layers, vocab 2048, 14.7M params)", size_rows(SMALL_LLAMA))]
    if args.smollm_shape:
        sizes.append(("random LLaMA of SmolLM2-135M's shape (tied embeddings, 134.5M params)",
                      size_rows(SMOLLM2_135M, dtypes=(torch.float32,), sparsities=(0.5, 0.9))))
    command = "python benchmarks/export_table.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    git, machine_text = git_state(), machine()
    table = render(csr, sizes, command.strip(), size, git, machine_text)
    print(table)
    if args.out:
        write_text(args.out, table)  # atomic
    if args.json:
        save({"git": git, "command": command.strip(), "machine": machine_text, "measured": time.strftime("%Y-%m-%d"),
              "linear_size": size,
              "csr": [dict(zip(("sparsity", "tokens", "dense_ms", "csr_ms"), row)) for row in csr],
              "checkpoint_sizes": [{"model": label, "rows": [
                  {"dtype": dtype, "sparsity": sparsity, "dense_bytes": dense, "compressed_bytes": comp,
                   "save_seconds": {fmt: s[0] for fmt, s in secs.items()},
                   "load_seconds": {fmt: s[1] for fmt, s in secs.items()}}
                  for dtype, sparsity, dense, comp, secs in rows]} for label, rows in sizes]}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
