"""Run one ``sparsellm-prune`` command under torch.profiler and say where its time went.

    python benchmarks/profile_prune.py --out prof.json --table prof.md -- --method sparsellm ...

Everything after ``--`` is the CLI's own arguments. Two tables come out, three with ``--flops``:

* the named parts of a prune: the driver's passes (``driver.observe``: calibration passes
  gathering statistics, ``driver.solve``: a method's solve, ``driver.final_pass``: errors and
  propagation), the OBS solver (``obs_prune``) and SparseLLM's FFN solver
  (``sparsellm.dense_pass``, ``sparsellm.w_steps``, ``sparsellm.sweep``, and inside the sweeps
  ``sparsellm.p_step`` and ``sparsellm.gram_stats``): the ``record_function`` ranges in the
  code, with host time and, on a GPU, the device time of the kernels they launched;
* on a GPU the kernels and copies with the most device time, on the CPU the operators with the
  most host time of their own;
* with ``--flops``, the floating-point work of the matrix products (``mm``, ``addmm``, the in-place
  ``addmm_`` of the Gram accumulations, ``bmm``) and of attention, from the operators' recorded
  shapes (recording them costs host time per op, so it is off by default).

CUPTI's overhead records ("Command Buffer Full": the host waiting on a full launch queue) are
not device work and are counted nowhere.

Ranges nest (``driver.solve`` holds ``obs_prune``), so their times do not add up to the whole.
The profiler slows a run down (host-side bookkeeping per op): compare the shares, not the
seconds, with an unprofiled run (``benchmarks/prune_7b.py --profile`` runs it next to the timed
runs, not instead of them).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

STAGE_PREFIXES = ("driver.", "sparsellm.", "obs_prune")
# CUPTI's overhead records, which the profiler lists beside the kernels but which are no device
# work: "Command Buffer Full" is the host blocked on a full launch queue, attached to the launch
# that waited. Counted as device time (this script did at commit f8def43) they gave SparseLLM's
# p-step 106 s of "device time" in a 26 s run on an H200.
NOT_DEVICE_WORK = frozenset({"Command Buffer Full", "Lazy Function Loading", "Activity Buffer Request",
                             "CUPTI Resource Creation and Destruction", "Instrumentation", "Runtime Triggered Module Loading"})


def _device_work(name: str) -> bool:
    return name not in NOT_DEVICE_WORK


def _kernel_seconds(event) -> float:
    """The device time of the kernels (and copies) a host-side event and everything under it
    launched, without CUPTI's overhead records."""
    total, stack = 0.0, [event]
    while stack:
        e = stack.pop()
        total += sum(k.duration for k in e.kernels if _device_work(k.name))
        stack.extend(e.cpu_children)
    return total / 1e6


def _op_row(event, total_us: float, device: bool) -> dict:
    own = event.self_device_time_total if device else event.self_cpu_time_total
    return {"name": event.key, "calls": event.count, "self_s": round(own / 1e6, 4),
            "self_share": round(own / total_us, 4) if total_us else None}


def _stage_rows(prof, device: bool) -> list[dict]:
    """The named ranges, from their host-side events: host time, and the device time of the
    kernels launched inside them (on a GPU the profiler also records each range on the device
    timeline under the same name; those copies are left out, so nothing is counted twice)."""
    stages: dict[str, dict] = {}
    for e in prof.events():
        if e.name.startswith(STAGE_PREFIXES) and e.device_type == DeviceType.CPU:
            row = stages.setdefault(e.name, {"name": e.name, "calls": 0, "host_s": 0.0, "device_s": 0.0})
            row["calls"] += 1
            row["host_s"] += e.cpu_time_total / 1e6
            if device:
                row["device_s"] += _kernel_seconds(e)
    rows = sorted(stages.values(), key=lambda r: r["name"])
    for row in rows:
        row["host_s"] = round(row["host_s"], 4)
        row["device_s"] = round(row["device_s"], 4) if device else None
    return rows


def _own_time_rows(prof, device: bool) -> list:
    """What the op table ranks: on a GPU the device-side records (kernels, copies, memsets:
    each once, not again under the operator that launched it) that are device work; on the CPU
    the operators, by their own host time."""
    rows = [e for e in prof.key_averages() if not e.key.startswith(STAGE_PREFIXES)]
    if device:
        rows = [e for e in rows if e.device_type != DeviceType.CPU and _device_work(e.key)]
    return rows


def _product_flops(name: str, shapes: list) -> int:
    """Floating-point operations of one matrix product from its recorded input shapes (2 per
    multiply-add), 0 for any other operator. The profiler's own ``with_flops`` leaves out the
    in-place ``addmm_`` (the Gram accumulations) and attention. Attention is counted whole (QK^T
    and PV over all L x S pairs), as the CPU kernel is charged, causal or not."""
    if name == "aten::mm":
        (m, k), (_, n) = shapes[0][-2:], shapes[1][-2:]
        return 2 * m * k * n
    if name in ("aten::addmm", "aten::addmm_"):
        (m, k), (_, n) = shapes[1][-2:], shapes[2][-2:]
        return 2 * m * k * n
    if name in ("aten::bmm", "aten::baddbmm"):
        (b, m, k), (_, _, n) = shapes[-2], shapes[-1]
        return 2 * b * m * k * n
    if name.startswith("aten::_scaled_dot_product") and len(shapes[0]) == 4 and len(shapes[1]) == 4:
        b, h, length, dim = shapes[0]
        return 4 * b * h * length * shapes[1][2] * dim
    return 0


def _product_rows(prof) -> list[dict]:
    """GFLOP of the matrix products and attention, per operator (host-side events)."""
    totals: dict[str, list] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CPU or not e.input_shapes:
            continue
        flops = _product_flops(e.name, e.input_shapes)
        if flops:
            row = totals.setdefault(e.name, [0, 0])
            row[0] += 1
            row[1] += flops
    return [{"name": name, "calls": calls, "flops": flops, "gflop": round(flops / 1e9, 1)}
            for name, (calls, flops) in sorted(totals.items(), key=lambda kv: -kv[1][1])]


def summarise(prof, wall: float, device: bool, top: int, flops: bool = False) -> dict:
    ops = _own_time_rows(prof, device)
    own = (lambda e: e.self_device_time_total) if device else (lambda e: e.self_cpu_time_total)  # noqa: E731
    total = sum(own(e) for e in ops)
    ops.sort(key=own, reverse=True)
    return {"wall_s": round(wall, 2), "timed": "device" if device else "host",
            "self_total_s": round(total / 1e6, 3), "stages": _stage_rows(prof, device),
            "top_ops": [_op_row(e, total, device) for e in ops[:top]],
            **({"products": _product_rows(prof)} if flops else {})}


def render(summary: dict, title: str) -> str:
    device = summary["timed"] == "device"
    lines = [f"### {title}", "",
             f"wall {summary['wall_s']} s under the profiler; {summary['timed']} time of all "
             f"{'kernels and copies' if device else 'ops'} {summary['self_total_s']} s", "",
             "| range | calls | host s | device s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['calls']} | {r['host_s']} | {r['device_s'] if device else ''} |"
              for r in summary["stages"]]
    lines += ["", f"| op or kernel | calls | own {summary['timed']} s | share |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name'][:90]} | {r['calls']} | {r['self_s']} | {100 * (r['self_share'] or 0):.1f}% |"
              for r in summary["top_ops"]]
    if summary.get("products"):
        lines += ["", "| matrix product | calls | GFLOP |", "|---|---:|---:|"]
        lines += [f"| {r['name']} | {r['calls']} | {r['gflop']} |" for r in summary["products"]]
        lines += [f"| all | {sum(r['calls'] for r in summary['products'])} | "
                  f"{round(sum(r['gflop'] for r in summary['products']), 1)} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own_args = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON of both tables")
    ap.add_argument("--table", help="markdown of both tables")
    ap.add_argument("--title", default="profile", help="the tables' heading")
    ap.add_argument("--top", type=int, default=30, help="rows of the op table")
    ap.add_argument("--flops", action="store_true", help="also the matrix products' floating-point work "
                                                          "(records every op's input shapes)")
    args = ap.parse_args(own_args)
    if not cli_args:
        ap.error("give the sparsellm-prune arguments after --")
    from sparsellm import cli
    from sparsellm.driver import resolve_device

    # the commit and machine every stored number names (imported before the run: not a failure after it)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality import git_state, machine, save, write_text

    device = resolve_device(cli.build_parser().parse_args(cli_args).device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=args.flops) as prof:  # shapes: the products' FLOPs
        rc = cli.main(cli_args)
    wall = time.perf_counter() - start

    summary = {"cli_args": cli_args, "rc": rc, "git": git_state(), "machine": machine(not device),
               "measured": time.strftime("%Y-%m-%d"), **summarise(prof, wall, device, args.top, args.flops)}
    text = render(summary, args.title)
    print(text)
    if args.out:  # atomic, as the tables
        save(summary, args.out)
    if args.table:
        write_text(args.table, text)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
