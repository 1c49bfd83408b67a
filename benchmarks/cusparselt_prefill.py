"""Does 2:4 prefill beat dense cuBLAS on this GPU once the cuSPARSELt plan is not rebuilt per call?

For each LLaMA-2-7B linear shape (in -> out: 4096->4096, 4096->11008, 11008->4096) and token
count T, fp16 (or --dtype bf16), times with ``triton.testing.do_bench`` (median ms, after its
warm-up, L2 flushed between runs):

* dense:        ``F.linear(x, w)`` (cuBLAS)
* ours:         ``SparseLtLinear`` (sparsellm/export/cusparselt.py), plan built beforehand
* ours+search:  the same after ``search(T)`` (cusparseLtMatmulSearch picked the kernel)
* ours y^T:     ``SparseLtLinear(w, fuse_output=False)``: cuSPARSELt writes y^T, then a copy to
                y (what the default layout, y written directly, saves; default kernel, no search)
* torch 2:4:    ``F.linear(x, to_sparse_semi_structured(w))`` (plan rebuilt on every call)

and checks each result's max error against the dense output. Prints a markdown table
(speedup = dense ms / sparse ms) and, with --out, writes JSON. Meant to take well under a
minute on an H100 plus the one-time JIT compile, whose time is printed.

    PYTHONPATH=$PWD python benchmarks/cusparselt_prefill.py --out cusparselt_prefill.json [--pick table.json]
    python benchmarks/cusparselt_prefill.py --from cusparselt_prefill.json --pick table.json

``--pick`` writes the prefill entries of the kernels' config table (``kernels/sparse_configs.py``:
per shape the token count from which ``ours`` beats dense by ``--min-speedup`` at every measured
count up, and the largest of those for other shapes) into ``table.json``, keeping what else it
holds (the decode sweep's entries); ``--from`` picks from a stored run without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from sparsellm.kernels import sparse_configs

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)
TOKENS = (128, 512, 2048, 4096)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weight_24(out_features, in_features, dtype, seed):
    """Random weight keeping the 2 largest of every group of 4 consecutive inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_features, in_features, device="cuda", generator=g) * 0.02
    groups = w.view(out_features, in_features // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).view(out_features, in_features).to(dtype)


def make_timer(warmup_ms: int, rep_ms: int):
    """Median ms of fn: triton's do_bench when importable, else CUDA events around single calls."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None

    def timed(fn) -> float:
        if do_bench is not None:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        for _ in range(5):
            fn()
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return timed, ("triton.testing.do_bench" if do_bench is not None else "cuda events")


def max_err(y, ref) -> float:
    y = y.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return (y - ref.float()).abs().max().item()


def torch_semi_structured(w):
    """torch's 2:4 weight on the cuSPARSELt backend, or (None, why)."""
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        ws = to_sparse_semi_structured(w)
        return ws, type(ws).__name__
    except Exception as exc:  # recorded in the table, never fatal
        return None, f"{type(exc).__name__}: {str(exc)[:120]}"


def write_pick(result: dict, path: str, min_speedup: float, measured: str) -> dict:
    """Merge the prefill entries of ``result`` (this script's JSON) into the config table at
    ``path`` (a new one if there is none), replacing the prefill entries of its dtype; the
    table's ``source.prefill`` records what measured them. Returns the written table."""
    dtype = str(DTYPES[result["dtype"]]).removeprefix("torch.")
    try:
        with open(path) as f:
            table = json.load(f)
        sparse_configs.ConfigTable(table, path)  # merge only into a table: refuse other JSON whole
    except FileNotFoundError:
        table = {"version": sparse_configs.VERSION, "source": {}, "min_speedup": min_speedup, "entries": [],
                 "crossovers": []}
    kept = [p for p in table.get("prefill", []) if p.get("dtype") != dtype]
    table["prefill"] = kept + sparse_configs.pick_prefill(result["rows"], dtype, min_speedup=min_speedup)
    table.setdefault("source", {})["prefill"] = {
        "commit": result.get("commit"), "device": result.get("device"), "torch": result.get("torch"),
        "cusparselt": result.get("cusparselt_runtime"), "timer": result.get("timer"), "measured": measured,
        "min_speedup": min_speedup, "picked": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    sparse_configs.save(table, path)
    return table


def _pick(result: dict, path: str, min_speedup: float, measured: str) -> int:
    """Merge and write (``write_pick``) and print the summary; 2 if the table there is malformed
    (another format's JSON, say) or cannot be written."""
    try:
        print(_pick_summary(write_pick(result, path, min_speedup, measured)))
    except (ValueError, OSError) as exc:  # ConfigTableError; the file there unreadable or not JSON
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    return 0


def _pick_summary(table: dict) -> str:
    lines = ["prefill through cuSPARSELt (from tokens):"]
    for p in table.get("prefill", []):
        shape = "any shape" if p["shape"] is None else "{}->{}".format(*p["shape"])
        lines.append(f"  {p['format']} {p['dtype']} {shape}: {p['min_tokens']}")
    return "\n".join(lines if len(lines) > 1 else lines + ["  none: dense beat it at the largest measured count"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--pick", help="merge the prefill crossovers into this config table (kernels/sparse_configs.py)")
    parser.add_argument("--from", dest="source", help="a stored result JSON: no benchmark, only --pick")
    parser.add_argument("--min-speedup", type=float, default=None,
                        help="speedup over dense a token count needs (default: the config table's, 1.05)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--warmup-ms", type=int, default=10)
    parser.add_argument("--rep-ms", type=int, default=40)
    parser.add_argument("--no-torch", action="store_true", help="skip torch's to_sparse_semi_structured path")
    # off by default: on an H200 the search failed with an internal error and the process then
    # crashed (tests/test_cusparselt.py, test_search_picks_an_algorithm)
    parser.add_argument("--search", action="store_true", help="also time ours after search(T) (known to fail)")
    args = parser.parse_args(argv)
    min_speedup = sparse_configs.MIN_SPEEDUP if args.min_speedup is None else args.min_speedup
    problem = sparse_configs.pick_options_error(min_speedup, args.source, args.pick)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.source:
        try:
            with open(args.source) as f:
                stored = json.load(f)
            if stored["dtype"] not in DTYPES or not isinstance(stored["rows"], list):
                raise ValueError(f"dtype {stored['dtype']!r}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{args.source}: not a result of this script ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        return _pick(stored, args.pick, min_speedup, args.source)

    from sparsellm.export import cusparselt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality import git_state, save

    git = git_state()  # $SPARSELLM_COMMIT on a GPU machine's copy, else git's HEAD (it was None there)
    result = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "commit": git["commit"], "dirty": git["dirty"], "dtype": args.dtype,
              "settings": {k: getattr(args, k) for k in ("tokens", "warmup_ms", "rep_ms", "no_torch", "search")},
              "rows": []}
    ok, why = cusparselt.available()
    result["available"], result["reason"] = ok, why
    if not ok:
        print(f"cuSPARSELt extension unavailable: {why}", file=sys.stderr)
        if args.out:
            save(result, args.out)
        return 2

    t0 = time.perf_counter()
    ext = cusparselt.load()
    result["compile_s"] = round(time.perf_counter() - t0, 2)
    print(f"extension compile/load: {result['compile_s']:.1f} s ({why})")
    result["device"] = torch.cuda.get_device_name()
    result["cusparselt_runtime"] = ext.runtime_version()
    result["cusparselt_header"] = ext.header_version
    timed, timer_name = make_timer(args.warmup_ms, args.rep_ms)
    result["timer"] = timer_name
    dtype = DTYPES[args.dtype]
    bench_start = time.perf_counter()

    def measure(row, key, fn, ref):
        """{key}_ms and {key}_err, or {key}_error: one failing variant must not lose the others."""
        try:
            row[f"{key}_ms"] = timed(fn)
            row[f"{key}_err"] = max_err(fn(), ref)
        except Exception as exc:
            row[f"{key}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

    def build(fn):
        try:
            return fn(), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"

    for in_f, out_f in SHAPES:
        w = weight_24(out_f, in_f, dtype, seed=in_f * 7 + out_f)
        lin, lin_error = build(lambda: cusparselt.make_linear(w))
        lin_t, lin_t_error = build(lambda: cusparselt.make_linear(w, fuse_output=False))
        ws, torch_kind = (None, "skipped") if args.no_torch else torch_semi_structured(w)
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
            ref = F.linear(x, w)
            row = {"in": in_f, "out": out_f, "tokens": tokens}
            measure(row, "dense", lambda: F.linear(x, w), ref)
            if lin is not None:
                t = time.perf_counter()
                plan_error = build(lambda: lin.prepare(tokens))[1]  # one-time plan build, untimed below
                row["plan_build_ms"] = round((time.perf_counter() - t) * 1e3, 3)
                if plan_error is None:
                    row["fused_output"] = bool(lin.fused_output(tokens))
                    row["ours_alg"] = lin.alg_id(tokens)
                measure(row, "ours", lambda: lin(x), ref)
                if args.search:
                    t = time.perf_counter()
                    row["search_alg"], search_error = build(lambda: lin.search(tokens))
                    row["search_s"] = round(time.perf_counter() - t, 3)
                    if search_error is None:
                        measure(row, "ours_search", lambda: lin(x), ref)
                    else:
                        row["ours_search_error"] = search_error
            else:
                row["ours_error"] = lin_error
            if lin_t is not None:
                build(lambda: lin_t.prepare(tokens))
                measure(row, "ours_yt", lambda: lin_t(x), ref)
            else:
                row["ours_yt_error"] = lin_t_error
            if ws is not None:
                measure(row, "torch", lambda: F.linear(x, ws), ref)
            else:
                row["torch_error"] = torch_kind
            row["ref_max_abs"] = ref.float().abs().max().item()
            for key in ("ours", "ours_search", "ours_yt", "torch"):
                if f"{key}_ms" in row and "dense_ms" in row:
                    row[f"speedup_{key}"] = row["dense_ms"] / row[f"{key}_ms"]
            result["rows"].append(row)
        lin = lin_t = ws = None  # freed before the next shape (not `del`: the closures above name them)
        torch.cuda.empty_cache()
    result["bench_s"] = round(time.perf_counter() - bench_start, 1)

    def fmt(row, key, digits=4):
        value = row.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"\n{result['device']}, torch {torch.__version__}, cuSPARSELt {result['cusparselt_runtime']} "
          f"(header {result['cusparselt_header']}), {args.dtype}, median ms by {timer_name}; "
          f"speedup = dense / sparse\n")
    print("| in -> out | T | dense ms | ours ms | ours+search ms | ours y^T ms | torch 2:4 ms | speedup ours | "
          "speedup ours+search | speedup torch | max err ours / +search / y^T / torch | plan build ms | y direct |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['in']} -> {row['out']} | {row['tokens']} | {fmt(row, 'dense_ms')} | {fmt(row, 'ours_ms')} | "
              f"{fmt(row, 'ours_search_ms')} | {fmt(row, 'ours_yt_ms')} | {fmt(row, 'torch_ms')} | "
              f"{fmt(row, 'speedup_ours', 2)} | "
              f"{fmt(row, 'speedup_ours_search', 2)} | {fmt(row, 'speedup_torch', 2)} | "
              f"{fmt(row, 'ours_err', 3)} / {fmt(row, 'ours_search_err', 3)} / {fmt(row, 'ours_yt_err', 3)} / "
              f"{fmt(row, 'torch_err', 3)} | "
              f"{fmt(row, 'plan_build_ms', 2)} | {row.get('fused_output', '-')} |")
    errors = sorted({f"{key[:-6]}: {value}" for row in result["rows"] for key, value in row.items()
                     if key.endswith("_error") and value})
    if errors:
        print("\nerrors:\n" + "\n".join(f"- {e}" for e in errors))
    print(f"\nbenchmark time {result['bench_s']} s (plus compile {result['compile_s']} s)")
    if args.out:
        save(result, args.out)  # atomic
        print(f"wrote {args.out}")
    if args.pick:
        return _pick(result, args.pick, min_speedup, args.out or "(not stored)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
