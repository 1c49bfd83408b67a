"""Sweep the decode configs of the sparse kernels on a GPU, against dense cuBLAS.

For each LLaMA-2-7B linear shape (4096->4096, 4096->11008, 11008->4096), fp16, and each token
count of ``--tokens`` (default 1): the kernel time of dense ``F.linear`` and of every candidate
config of

* ``nm24`` (a 2:4 weight): one token, BLOCK_N x BLOCK_K x X_MODE (how x is met:
  kernels/sparse_matmul.py) x num_warps x STREAM (eviction hints) x STAGES; 2-8 tokens, the
  permute pick on token blocks (X_MODE 4) over small tiles and warps, against the tensor-core
  path's default; more tokens, the tensor-core path, BLOCK_N x BLOCK_K x num_warps x num_stages x
  split_k, and
* ``sell`` (a 90% magnitude-pruned weight, per-row): one token, slice rows S x BLOCK_J x
  num_warps x STREAM x X_SHARED x STAGES; more tokens, S x BLOCK_J x num_warps x split,

each forced through the kernels' ``config`` argument (no autotuner), its output checked against
the dense fp32 product. Kernel time: ``gpu_timing.kernel_us`` (CUDA events, L2 flushed by a
1 GiB write before each call, so the host's launch cost never shows; median of 50 calls). The
kernels' config table (``--pick``), their fixed default configs and ``SELL_SLICE_ROWS`` are
chosen from this sweep; it is the evidence for them.

    python benchmarks/sparse_gpu_sweep.py --out sweep.json --table sweep.md [--tokens 1,16] [--quick]
        [--pick configs.json]
    python benchmarks/sparse_gpu_sweep.py --from sweep.json[,more.json] --pick configs.json

``--pick`` writes the kernels' config table (``kernels/sparse_configs.py``: each shape's fastest
correct config per token count, the best one over all shapes for other shapes, and the token
counts up to which the sparse kernel beats dense by ``--min-speedup``) from this sweep's rows or,
with ``--from``, from stored sweeps. ``SPARSELLM_SPARSE_GPU_CONFIGS=configs.json`` makes the
kernels and the export use it; copied over ``kernels/sparse_configs.json`` it becomes the
package's default.

A smoke run of the script itself on a CPU (Triton's interpreter, small shapes, wall-clock
timing, numbers meaningless): ``TRITON_INTERPRET=1 python benchmarks/sparse_gpu_sweep.py
--device cpu --shapes 128x64 --quick --out /tmp/s.json``; ``--device cpu`` without the
interpreter is refused (exit 2). A sweep where every config failed exits 1, its ``meta`` saying
``"complete": false`` (with ``configs_ok`` and ``configs_failed``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

from gpu_timing import kernel_us
from sparsellm import reference
from sparsellm.kernels import sparse_configs
from sparsellm.kernels import sparse_matmul as sm

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)
# The grids of run 7 (benchmarks/RESULTS.md, "GPU sparse decode"). nm24: the pipelined register
# pick (X_MODE 3, the code's since run 6) at the configs that won a shape in run 6, against the
# pick by byte permute (X_MODE 4: fewer instructions per group and fewer registers, so larger
# tiles and more stages fit), over tiles up to 16 x 1024 / 8 x 2048. Run 6 put the pipelined pick
# against run 5's hand-prefetched one (X_MODE 1: 7-11% slower at each shape's best config); run 4's
# grid went one step past run 3's winners on each axis; the first sweep (825b90a) covered
# BLOCK_N 4-16, BLOCK_K 256-1024, 16- and 32-row slices, slot blocks 32-256, 2-8 warps.
NM24_GRIDS = [
    {"BLOCK_N": (4, 8), "BLOCK_K": (512, 1024), "X_MODE": (3,), "num_warps": (4,), "STREAM": (1,), "STAGES": (3, 4)},
    {"BLOCK_N": (4, 8, 16), "BLOCK_K": (512, 1024, 2048), "X_MODE": (4,), "num_warps": (4, 8), "STREAM": (1,),
     "STAGES": (2, 3, 4)},
]
NM24_MAX_TILE = 16384  # BLOCK_N * BLOCK_K: larger tiles hold too many registers per thread
NM24_MIN_TILE = 2048  # the smallest tiles were the slowest of every sweep
# sell: 8-row slices (the export's since run 4) with x gathered from global memory (the code's:
# the slot blocks of run 4's best configs, and the same with the loads pipelined) against x
# gathered from shared memory (X_SHARED: a warp's 32 random columns cost one shared-memory access
# with few bank conflicts instead of up to 32 cache-line lookups), where 16-row slices share each
# program's copy of x over twice the rows, and 512-slot blocks cover a whole 90% row of 4096
# inputs (about 460 slots) in one step: one copy of x and one round trip to memory per program
SELL_GRIDS = [
    {"S": (8,), "BLOCK_J": (128, 256), "num_warps": (4, 8), "STREAM": (1,), "STAGES": (1, 3)},
    {"S": (8, 16), "BLOCK_J": (64, 128, 256, 512), "num_warps": (4, 8), "STREAM": (1,), "X_SHARED": (1,),
     "STAGES": (1, 3)},
]
SELL_SLOT_BLOCK = 16
# More than one token (the export runs dense there since run 1: the one config of each path lost to
# dense at 16 tokens, 0.38-0.47x for nm24 in run 3): the nm24 tensor-core path has 172 programs of
# 64 rows at 11008 outputs, about one per SM, so smaller row blocks, K splits and deeper pipelines
# are its candidates; sell's multi-token path over its slot block, warps and splits.
NM24_DOT_GRID = {"BLOCK_N": (32, 64), "BLOCK_K": (64, 128, 256), "num_warps": (4, 8), "num_stages": (2, 4),
                 "split_k": (1, 2)}
# up to 8 tokens, also the permute pick on token blocks (X_MODE 4: each group decoded once for the
# block; its accumulators grow with the tokens, so small tiles), against the tensor-core default
NM24_PICK_MULTI_GRID = {"BLOCK_N": (2, 4, 8), "BLOCK_K": (256, 512), "X_MODE": (4,), "num_warps": (4, 8),
                        "STREAM": (1,), "STAGES": (3,)}
NM24_PICK_MULTI_MAX_TILE = 2048
NM24_DOT_DEFAULT = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "split_k": 1}
SELL_MULTI_GRID = {"S": (8,), "BLOCK_J": (8, 16, 32), "num_warps": (4, 8), "split": (1, 2)}


def _grid(spec: dict) -> list[dict]:
    return [dict(zip(spec, values)) for values in itertools.product(*spec.values())]


def nm24_configs() -> list[dict]:
    # the largest tiles on 4 warps, or at 4 stages, spill registers on sm_90 (Triton 3.6,
    # compile_check_sparse_gpu.py --sweep)
    return [c for grid in NM24_GRIDS for c in _grid(grid)
            if NM24_MIN_TILE <= c["BLOCK_N"] * c["BLOCK_K"] <= NM24_MAX_TILE * c["num_warps"] // 8
            and c["BLOCK_N"] * c["BLOCK_K"] * c.get("STAGES", 3) <= 3 * NM24_MAX_TILE]


def sell_configs() -> list[dict]:
    # 256-slot blocks on 2 warps spill registers on sm_90 (compile_check_sparse_gpu.py --sweep)
    return [c for grid in SELL_GRIDS for c in _grid(grid) if c["BLOCK_J"] * c["S"] < 2048 * c["num_warps"]]


def sell_slice_rows() -> list[int]:
    return sorted({c["S"] for c in sell_configs() + _grid(SELL_MULTI_GRID)})


def configs_for(fmt: str, tokens: int) -> list[dict]:
    """The candidate configs of a format at a token count (one token: the decode grids)."""
    if fmt == "nm24":
        if tokens == 1:
            return nm24_configs()
        if tokens <= sm.NM24_PICK_BLOCK_T_MAX:
            return [c for c in _grid(NM24_PICK_MULTI_GRID)
                    if c["BLOCK_N"] * c["BLOCK_K"] <= NM24_PICK_MULTI_MAX_TILE] + [dict(NM24_DOT_DEFAULT)]
        return _grid(NM24_DOT_GRID)
    return sell_configs() if tokens == 1 else _grid(SELL_MULTI_GRID)


def _two_four(out_f, in_f, gen, dtype):
    """A random weight, magnitude-pruned 2:4 (the project's N:M mask)."""
    w = torch.randn(out_f, in_f, device=gen.device, generator=gen).to(dtype)
    return w.masked_fill(reference.nm_prune_mask(w.abs().float(), 2, 4), 0)


def _ninety(out_f, in_f, gen, dtype):
    """A random weight, magnitude-pruned to 90% in every row (the project's row mask)."""
    w = torch.randn(out_f, in_f, device=gen.device, generator=gen).to(dtype)
    return w.masked_fill(reference.row_prune_mask(w.abs().float(), int(in_f * 0.9)), 0)


def _time_us(fn, reps: int) -> float:
    if not torch.cuda.is_available():  # the CPU smoke run: wall clock of one call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return kernel_us(fn, reps=reps)


def _run(fn, want) -> float:
    got = fn().float()
    return ((got - want).abs().max() / want.abs().max()).item()


def sweep(shapes, device: str, reps: int, quick: bool, save=lambda rows: None,
          formats=("nm24", "sell"), tokens=(1,)) -> list[dict]:
    """Every (shape, token count, format, config) row of ``formats``; ``save(rows)`` after each,
    so a run cut short keeps its rows. A config's ``split_k`` (nm24) or ``split`` (sell) is the
    launcher's argument, the rest the kernel's."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32  # the interpreter is wrong in half
    for in_f, out_f in shapes:
        weights = {fmt: make(out_f, in_f, gen, dtype) for fmt, make in (("nm24", _two_four), ("sell", _ninety))
                   if fmt in formats}
        packs = {"nm24": reference.nm24_pack(weights["nm24"])} if "nm24" in formats else {}
        if "sell" in formats:
            packs.update({("sell", s): reference.sell_pack(weights["sell"], s, SELL_SLOT_BLOCK)
                          for s in sell_slice_rows()})
        for t in tokens:
            x = torch.randn(t, in_f, device=device, generator=gen).to(dtype)
            for fmt in formats:
                w = weights[fmt]
                want = F.linear(x.float(), w.float())
                base = {"shape": [in_f, out_f], "format": fmt, "tokens": t, "dtype": str(dtype).removeprefix("torch.")}
                rows.append({**base, "impl": "dense", "config": None,
                             "us": _time_us(lambda: F.linear(x, w), reps), "err": _run(lambda: F.linear(x, w), want)})
                candidates = []
                for c in configs_for(fmt, t)[:4] if quick else configs_for(fmt, t):
                    if fmt == "nm24":
                        values, meta = packs["nm24"]
                        kernel = {k: val for k, val in c.items() if k != "split_k"}
                        candidates.append((c, lambda kernel=kernel, split=c.get("split_k"): sm.nm24_linear(
                            x, values, meta, in_f, split_k=split, config=kernel)))
                    else:
                        v, col, ptr = packs[("sell", c["S"])]
                        kernel = {k: val for k, val in c.items() if k not in ("S", "split")}
                        candidates.append((c, lambda v=v, col=col, ptr=ptr, s=c["S"], kernel=kernel, split=c.get("split"):
                                           sm.sell_linear(x, v, col, ptr, out_f, in_f, s, split=split, config=kernel)))
                for config, fn in candidates:
                    row = {**base, "impl": fmt, "config": config}
                    try:
                        row["err"] = _run(fn, want)  # compiles
                        row["us"] = _time_us(fn, reps)
                    except Exception as exc:  # a config that does not compile or fit: recorded, not fatal
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    save(rows)
    return rows


_ok = sparse_configs.row_ok


def table(rows: list[dict], shapes, top: int = 5) -> str:
    lines = []
    for (in_f, out_f) in shapes:
        for t, fmt in sorted({(r["tokens"], r["format"]) for r in rows if r["shape"] == [in_f, out_f]}):
            sel = [r for r in rows if r["shape"] == [in_f, out_f] and r["format"] == fmt and r["tokens"] == t]
            dense = next((r["us"] for r in sel if r["impl"] == "dense"), None)
            if dense is None:  # not reached (a run cut short)
                continue
            ok = sorted((r for r in sel if r["impl"] == fmt and _ok(r)), key=lambda r: r["us"])
            bad = [r for r in sel if r["impl"] == fmt and not _ok(r)]
            lines.append(f"\n{in_f}->{out_f} {fmt}, {t} token{'s' * (t > 1)} (dense {dense:.1f} us; {len(ok)} configs ok, "
                         f"{len(bad)} failed):")
            lines.append("| config | us | speedup vs dense |")
            lines.append("|---|---:|---:|")
            for r in ok[:top]:
                lines.append(f"| {r['config']} | {r['us']:.1f} | {dense / r['us']:.2f}x |")
    return "\n".join(lines)


def _commit() -> str | None:
    """The commit measured: $SPARSELLM_COMMIT (a GPU machine's copy has no git), else git's HEAD."""
    if os.environ.get("SPARSELLM_COMMIT"):
        return os.environ["SPARSELLM_COMMIT"]
    try:
        import subprocess
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def write_pick(rows: list[dict], metas: list[dict], sweeps: list[str], path: str, min_speedup: float) -> dict:
    """The config table of ``rows`` (sparse_configs.pick) written to ``path``, its source the
    sweeps' own records (commit, device, versions; a stored sweep that lacks one says None)."""
    keys = ("commit", "device", "torch", "triton")
    source = {}
    for k in keys:  # one value where the sweeps agree, else the list of them
        vals = sorted({m[k] for m in metas if m.get(k) is not None})
        source[k] = vals[0] if len(vals) == 1 else (vals or None)
    source.update(sweeps=[{"path": p, **{k: m.get(k) for k in (*keys, "complete")}} for p, m in zip(sweeps, metas)],
                  complete=all(m.get("complete") for m in metas),
                  picked=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    table = sparse_configs.pick(rows, source=source, min_speedup=min_speedup)
    sparse_configs.save(table, path)
    return table


def _pick(rows: list[dict], metas: list[dict], sweeps: list[str], args) -> int:
    """Write the table (``write_pick``) and print its summary; 2 if it cannot be written."""
    try:
        print(_pick_summary(write_pick(rows, metas, sweeps, args.pick, args.min_speedup)))
    except sparse_configs.ConfigTableError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def _pick_summary(table: dict) -> str:
    lines = [f"config table: {len(table['entries'])} entries; crossovers (max sparse tokens):"]
    for c in table["crossovers"]:
        shape = "any shape" if c["shape"] is None else "{}->{}".format(*c["shape"])
        lines.append(f"  {c['format']}{'' if 'S' not in c else ' S=%d' % c['S']} {c['dtype']} {shape}: "
                     f"{c['max_sparse_tokens']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON of every (shape, format, config) timing (required unless --from)")
    ap.add_argument("--from", dest="sources", help="stored sweep JSONs, comma-separated: no sweep, only --pick")
    ap.add_argument("--pick", help="write the kernels' config table (kernels/sparse_configs.py) here")
    ap.add_argument("--min-speedup", type=float, default=sparse_configs.MIN_SPEEDUP,
                    help="speedup over dense a token count needs to get the sparse kernel (the crossovers)")
    ap.add_argument("--table", help="markdown summary (the fastest configs per shape and format)")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per config (median)")
    ap.add_argument("--quick", action="store_true", help="four configs per format (a smoke run)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (smoke run)")
    ap.add_argument("--formats", default="nm24,sell", help="the formats to sweep, comma-separated (nm24, sell)")
    ap.add_argument("--shapes", help="in x out pairs, comma-separated (default: the three 7B shapes)")
    ap.add_argument("--tokens", default="1", help="token counts, comma-separated (1: the decode grids; more: "
                                                  "the multi-token paths' grids)")
    args = ap.parse_args(argv)
    problem = sparse_configs.pick_options_error(args.min_speedup, args.sources, args.pick)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.sources:
        rows, metas, paths = [], [], args.sources.split(",")
        for path in paths:
            try:
                with open(path) as f:
                    stored = json.load(f)
                rows += stored["rows"]
                metas.append(stored.get("meta", {}))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                print(f"{path}: not a sweep JSON ({type(exc).__name__}: {exc})", file=sys.stderr)
                return 2
        return _pick(rows, metas, paths, args)
    if not args.out:
        print("--out is required (the sweep's JSON), unless --from names stored sweeps", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # without the interpreter every Triton kernel refuses CPU tensors: each config would fail
        print("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 in the environment "
              "(TRITON_INTERPRET=1 python benchmarks/sparse_gpu_sweep.py --device cpu ...)", file=sys.stderr)
        return 2
    try:
        shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        print(f"--shapes takes INxOUT pairs of positive integers, comma-separated, got {args.shapes!r}",
              file=sys.stderr)
        return 2
    t0 = time.time()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    commit = _commit()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality import git_state, save as save_json, write_text

    dirty = git_state()["dirty"]  # whether the tracked files differ from the commit
    settings = {"reps": args.reps, "quick": args.quick, "formats": args.formats, "tokens": args.tokens,
                "shapes": [list(s) for s in shapes]}

    def save(rows, finished=False) -> str:
        kernels = [r for r in rows if r["impl"] != "dense"]
        ok = sum(map(_ok, kernels))
        # complete: every config tried and at least one worked (a sweep where all failed measured nothing)
        meta = {"device": device, "commit": commit, "dirty": dirty, "torch": torch.__version__,
                "triton": triton.__version__, "settings": settings, "seconds": round(time.time() - t0, 1),
                "complete": finished and ok > 0, "configs_ok": ok, "configs_failed": len(kernels) - ok}
        save_json({"meta": meta, "rows": rows}, args.out)  # atomic: a sweep killed mid-write keeps its rows
        text = f"{meta}\n" + table(rows, shapes)
        if args.table:
            write_text(args.table, text + "\n")
        return text

    formats = tuple(f.strip() for f in args.formats.split(","))
    if not formats or set(formats) - {"nm24", "sell"}:
        print(f"--formats takes nm24 and/or sell, got {args.formats!r}", file=sys.stderr)
        return 2
    try:
        tokens = tuple(int(v) for v in args.tokens.split(","))
    except ValueError:
        tokens = ()
    if not tokens or min(tokens) < 1:
        print(f"--tokens takes positive integers, comma-separated, got {args.tokens!r}", file=sys.stderr)
        return 2
    rows = sweep(shapes, args.device, args.reps, args.quick, save, formats, tokens)
    print(save(rows, finished=True))
    if not any(map(_ok, rows)):
        print("every config failed (their errors: the rows of --out)", file=sys.stderr)
        return 1
    if args.pick:
        with open(args.out) as f:
            meta = json.load(f)["meta"]
        return _pick(rows, [meta], [os.path.basename(args.out)], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
