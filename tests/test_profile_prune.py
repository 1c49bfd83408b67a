"""benchmarks/profile_prune.py's accounting: a range's device time is its kernels' (CUPTI's
overhead records left out), and the CPU summary names the ranges and ranks the operators."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd.profiler_util import Kernel
from torch.profiler import ProfilerActivity, profile, record_function

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_prune.py"
_spec = importlib.util.spec_from_file_location("profile_prune", _PATH)
profile_prune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_prune)


def event(kernels=(), children=()):
    return SimpleNamespace(kernels=[Kernel(name, 0, us) for name, us in kernels], cpu_children=list(children))


def test_range_device_time_is_its_kernels_without_overhead_records():
    solve = event([("trsm_left_kernel", 1000.0), ("Command Buffer Full", 50_000.0)],
                  [event([("gemm", 2500.0), ("Lazy Function Loading", 700.0)])])
    p_step = event([("elementwise", 500.0)], [solve, event([("Memcpy DtoH (Device -> Pageable)", 250.0)])])
    assert profile_prune._kernel_seconds(p_step) == (1000.0 + 2500.0 + 500.0 + 250.0) / 1e6
    assert profile_prune._kernel_seconds(event([("Command Buffer Full", 9.0)])) == 0.0


def test_cpu_summary_names_the_ranges_and_ranks_operators():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with record_function("sparsellm.p_step"):
                torch.cholesky_solve(a @ b, torch.eye(256))
    summary = profile_prune.summarise(prof, wall=1.0, device=False, top=5)
    (stage,) = summary["stages"]
    assert stage["name"] == "sparsellm.p_step" and stage["calls"] == 3
    assert stage["host_s"] > 0 and stage["device_s"] is None
    names = [row["name"] for row in summary["top_ops"]]
    assert "aten::mm" in names and not any(n.startswith("sparsellm.") for n in names)
    assert summary["self_total_s"] > 0 and all(row["self_share"] <= 1 for row in summary["top_ops"])
    text = profile_prune.render(summary, "cpu")
    assert "| sparsellm.p_step | 3 |" in text and "host time of all ops" in text


def test_product_flops_count_every_product_once_from_shapes():
    """The FLOP table counts mm, addmm, the in-place addmm_ (which the profiler's with_flops
    leaves out) and attention, each from its shapes: here exactly 2 m k n per product."""
    a, b, acc = torch.randn(48, 40), torch.randn(40, 24), torch.zeros(40, 40)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        a @ b                                                     # mm: 2 * 48 * 40 * 24
        torch.nn.functional.linear(a, b.t().contiguous(), torch.zeros(24))  # addmm: the same
        acc.addmm_(a.t(), a)                                      # addmm_: 2 * 40 * 48 * 40
        torch.nn.functional.scaled_dot_product_attention(q, k, v)  # 4 * 2 * 3 * 16 * 16 * 8
        a + 1                                                     # not a product
    rows = {r["name"]: r for r in profile_prune._product_rows(prof)}
    expected = {"aten::mm": 2 * 48 * 40 * 24, "aten::addmm": 2 * 48 * 40 * 24, "aten::addmm_": 2 * 40 * 48 * 40}
    for name, flops in expected.items():
        assert rows[name]["calls"] == 1 and rows[name]["flops"] == flops, name
    attention = [r for name, r in rows.items() if "scaled_dot_product" in name]  # the CPU kernel, not its wrapper
    assert len(attention) == 1 and attention[0]["calls"] == 1
    assert attention[0]["flops"] == 4 * 2 * 3 * 16 * 16 * 8
    assert set(rows) == {"aten::mm", "aten::addmm", "aten::addmm_", attention[0]["name"]}
    assert profile_prune._product_flops("aten::add", [[48, 40], []]) == 0
