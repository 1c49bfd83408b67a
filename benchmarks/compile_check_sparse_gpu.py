"""Compile the sparse decode kernels (kernels/sparse_matmul.py) for a CUDA target without a GPU.

Triton lowers a kernel to PTX and runs ptxas (shipped in the triton wheel) for a chosen
``GPUTarget`` without touching a driver, so compile errors, register counts and spills of
every autotune config can be checked on a CPU-only machine before GPU time is spent:

    python benchmarks/compile_check_sparse_gpu.py            # sm_90 (H100), fp16/bf16/fp32
    python benchmarks/compile_check_sparse_gpu.py --arch 80  # sm_80 (A100)
    python benchmarks/compile_check_sparse_gpu.py --sweep    # also every one-token config of
                                                             # benchmarks/sparse_gpu_sweep.py (fp16)

Each line also gives the SASS instruction count of the variant's main loop body (nvdisasm, also
in the triton wheel): one step's work, which a change to the loop's arithmetic moves.

Registers, spills and instruction counts depend on the Triton version. The GPU machine has
3.6.0, the CPU venv a newer one; to check with the GPU's version (as in
benchmarks/results/compile_check_sm90_triton3.6.0.txt):

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy
    PYTHONPATH=. /tmp/t36/bin/python benchmarks/compile_check_sparse_gpu.py --sweep

Exit status 1 if any variant fails to compile or spills registers.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter never compiles")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sparsellm.export.sparse_gpu import SELL_SLICE_ROWS as SELL_S  # noqa: E402
from sparsellm.kernels import sparse_matmul as sm  # noqa: E402

DT = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
# pointer and stride arguments are 16-aligned for the packed tensors (the launcher would see the same)
DIV16 = [["tt.divisibility", 16]]


def _attrs(fn, names):
    return {(fn.arg_names.index(n),): DIV16 for n in names}


def _compile(fn, signature, constexprs, attrs, num_warps, num_stages, arch):
    sig = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    # meta-parameters a config leaves out take their defaults, as in a launch
    defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    constexprs = {**{k: v for k, v in defaults.items() if sig.get(k) == "constexpr"}, **constexprs}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas_usage(kernel, arch) -> str:
    """Run the bundled ptxas -v on the kernel's PTX for its register and spill report."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        sm_arch = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (f"regs={regs.group(1) if regs else '?'} spill stores/loads="
            f"{spill.group(1) + '/' + spill.group(2) if spill else '?'}"), (int(spill.group(1)) if spill else 0)


def _loop_sass(kernel) -> str:
    """The SASS instruction count of the kernel's largest loop body (from the target of a
    backward branch to the branch, nvdisasm on the cubin): the work of one step of the K or
    slot loop, the number a change to the loop's arithmetic moves."""
    import subprocess
    import tempfile

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
    if out.returncode:
        return "loop=?"
    lines = out.stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [re.match(r"\s*(\.L_x_\d+):", line)] if m}
    is_ins = [bool(re.search(r"/\*[0-9a-f]{4,}\*/", line)) for line in lines]
    best = 0
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            best = max(best, sum(is_ins[labels[m.group(1)]:i + 1]))
    return f"loop={best} SASS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--sweep", action="store_true", help="also the sweep's one-token configs (fp16)")
    args = ap.parse_args()
    unknown = [d for d in args.dtypes.split(",") if d not in DT]
    if unknown:
        ap.error(f"unknown --dtypes {', '.join(unknown)}; choose from {', '.join(DT)}")
    failures = _sweep_configs(args.arch) if args.sweep else 0
    for dname in args.dtypes.split(","):
        dt = DT[dname]
        # nm24: both autotuned variants, with and without bias / atomics
        fn = sm._nm24_kernel
        sig = {"x_ptr": f"*{dt}", "v_ptr": f"*{dt}", "m_ptr": "*i32", "b_ptr": f"*{dt}", "T": "i32", "N": "i32",
               "K": "i32", "v_per_split": "i32", "stride_v": "i32", "stride_m": "i32", "stride_xt": "i32",
               "stride_ot": "i32"}
        gemm = sm._nm24_gemm_f32 if dname == "fp32" else sm._nm24_gemm
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dname]
        t_max = sm.NM24_BLOCK_T_MAX.get(torch_dtype, 64)
        for tuner, use_dot in ((sm._nm24_gemv, False), (gemm, True)):
            for cfg in tuner.configs:
                cases = ((False, 1), (True, 1)) if not use_dot else ((False, 16), (True, 16), (False, t_max))
                for atomic, block_t in cases:
                    s = dict(sig, out_ptr="*fp32" if atomic else f"*{dt}")
                    const = dict(cfg.kwargs, HAS_BIAS=True, ATOMIC=atomic, USE_DOT=use_dot,
                                 DOT_PREC="tf32x3" if dname == "fp32" else "tf32", BLOCK_T=block_t)
                    label = (f"nm24 {dname} {'dot' if use_dot else 'gemv'} {cfg.kwargs} BLOCK_T={block_t} "
                             f"warps={cfg.num_warps} atomic={atomic}")
                    failures += _one(fn, s, const, ["x_ptr", "v_ptr", "m_ptr", "b_ptr", "out_ptr", "K", "v_per_split",
                                                       "stride_v", "stride_xt"],
                                     cfg, label, args.arch)
        fn = sm._sell_kernel
        sig = {"x_ptr": f"*{dt}", "v_ptr": f"*{dt}", "c_ptr": "*i16", "sp_ptr": "*i64", "b_ptr": f"*{dt}",
               "T": "i32", "N": "i32", "K": "i32", "n_split": "i32", "stride_xt": "i32", "stride_ot": "i32"}
        for tuner, block_t in ((sm._sell_gemv, 1), (sm._sell_multi, sm.SELL_BLOCK_T_MAX)):
            for cfg in tuner.configs:
                for atomic in (False, True):
                    s = dict(sig, out_ptr="*fp32" if atomic else f"*{dt}")
                    const = dict(cfg.kwargs, HAS_BIAS=True, ATOMIC=atomic, S=SELL_S, BLOCK_T=block_t)
                    label = f"sell {dname} {cfg.kwargs} BLOCK_T={block_t} warps={cfg.num_warps} atomic={atomic}"
                    failures += _one(fn, s, const, ["x_ptr", "v_ptr", "c_ptr", "sp_ptr", "b_ptr", "out_ptr"],
                                     cfg, label, args.arch)
    print("FAILED" if failures else "all variants compiled without spills", f"({failures} problems)")
    return 1 if failures else 0


def _sweep_configs(arch) -> int:
    """Compile each config benchmarks/sparse_gpu_sweep.py will time (fp16; one token without
    atomics, the 7B shapes need no split; 4 and 16 tokens with a split's atomics where the
    config splits), so a config that fails or spills is known before the GPU call."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sparse_gpu_sweep as sweep

    failures = 0
    nm24_sig = {"x_ptr": "*fp16", "v_ptr": "*fp16", "m_ptr": "*i32", "b_ptr": "*fp16", "out_ptr": "*fp16",
                "T": "i32", "N": "i32", "K": "i32", "v_per_split": "i32", "stride_v": "i32", "stride_m": "i32",
                "stride_xt": "i32", "stride_ot": "i32"}
    for c in sweep.nm24_configs():
        cfg = triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"])
        const = dict(cfg.kwargs, HAS_BIAS=False, ATOMIC=False, USE_DOT=False, DOT_PREC="tf32", BLOCK_T=1)
        failures += _one(sm._nm24_kernel, nm24_sig, const, ["x_ptr", "v_ptr", "m_ptr", "b_ptr", "out_ptr", "K",
                                                           "v_per_split", "stride_v", "stride_xt"],
                         cfg, f"sweep nm24 {c}", arch)
    sell_sig = {"x_ptr": "*fp16", "v_ptr": "*fp16", "c_ptr": "*i16", "sp_ptr": "*i64", "b_ptr": "*fp16",
                "out_ptr": "*fp16", "T": "i32", "N": "i32", "K": "i32", "n_split": "i32", "stride_xt": "i32",
                "stride_ot": "i32"}
    for c in sweep.sell_configs():
        cfg = triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "S")}, num_warps=c["num_warps"])
        # a config gathering x from shared memory holds the input padded to a power of two: each size
        for kp in sorted({sm.next_pow2(k) for k, _ in sweep.SHAPES}) if c.get("X_SHARED") else [1]:
            const = dict(cfg.kwargs, HAS_BIAS=False, ATOMIC=False, S=c["S"], BLOCK_T=1, KP=kp)
            # K and x's row stride divisible by 16, as the launcher specialises them at 7B shapes
            failures += _one(sm._sell_kernel, sell_sig, const, ["x_ptr", "v_ptr", "c_ptr", "sp_ptr", "b_ptr",
                                                               "out_ptr", "K", "stride_xt"],
                             cfg, f"sweep sell {c} KP={kp}", arch)
    # the multi-token grids: at 4 tokens the permute pick on blocks of 4 (and the tensor-core
    # default), at 16 nm24's tensor-core path at BLOCK_T 16; sell's at 8 tokens a program
    for tokens in (4, 16):
        for c in sweep.configs_for("nm24", tokens):
            kw = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages", "split_k")}
            cfg = triton.Config(kw, num_warps=c["num_warps"], num_stages=c.get("num_stages", 3))
            split = c.get("split_k", 1)
            pick = "X_MODE" in c
            const = dict(kw, HAS_BIAS=False, ATOMIC=split > 1, USE_DOT=not pick, DOT_PREC="tf32",
                         BLOCK_T=min(sm.NM24_PICK_BLOCK_T_MAX, sm.next_pow2(tokens)) if pick else 16)
            sig = dict(nm24_sig, out_ptr="*fp32" if split > 1 else "*fp16")
            failures += _one(sm._nm24_kernel, sig, const, ["x_ptr", "v_ptr", "m_ptr", "b_ptr", "out_ptr", "K",
                                                          "v_per_split", "stride_v", "stride_xt"],
                             cfg, f"sweep nm24 {tokens} tokens {c}", arch)
    for c in sweep.configs_for("sell", 16):
        cfg = triton.Config({"BLOCK_J": c["BLOCK_J"]}, num_warps=c["num_warps"])
        const = dict(cfg.kwargs, HAS_BIAS=False, ATOMIC=c["split"] > 1, S=c["S"], BLOCK_T=sm.SELL_BLOCK_T_MAX)
        sig = dict(sell_sig, out_ptr="*fp32" if c["split"] > 1 else "*fp16")
        failures += _one(sm._sell_kernel, sig, const, ["x_ptr", "v_ptr", "c_ptr", "sp_ptr", "b_ptr", "out_ptr",
                                                      "K", "stride_xt"], cfg, f"sweep sell 16 tokens {c}", arch)
    return failures


def _one(fn, sig, const, aligned, cfg, label, arch) -> int:
    try:
        k = _compile(fn, sig, const, _attrs(fn, aligned), cfg.num_warps, cfg.num_stages, arch)
    except Exception:
        print(f"FAIL  {label}")
        traceback.print_exc()
        return 1
    try:
        usage, spilled = _ptxas_usage(k, arch)
    except Exception as exc:  # the report is a bonus; the compile itself succeeded
        usage, spilled = f"(ptxas -v unavailable: {exc})", 0
    print(f"ok    {label}: shared={k.metadata.shared} B {usage} {_loop_sass(k)}")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
