"""Sparse x dense products for small token counts (decode): y[T, N] = x[T, K] @ W^T (+ bias).

Decode is memory-bound: a step reads every weight once and does two flops per weight, so a
format that stores fewer bytes per weight is faster as long as the kernel keeps the memory
system busy. Both kernels read their packed weight once per token block with wide contiguous
loads, decompress in registers, and accumulate in fp32. Formats (packing and the plain-PyTorch
oracle: :mod:`sparsellm.reference`):

``nm24`` (at most 2 non-zeros per group of 4 consecutive inputs; K % 32 == 0)
    ``values`` [N, K/2] (the two kept entries of each group, in position order, a zero pad
    where a group keeps fewer) and ``meta`` int32 [N, K/32] (two 2-bit positions per group, 8
    groups per word; group g of a word in bits 4g..4g+3, first position in the low 2 bits).
    Value slot v of a word (16 slots per word) therefore has its position in bits 2v..2v+1.

    Grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(T, BLOCK_T)); a program owns BLOCK_N output rows of
    one token block and one K range, stepping BLOCK_K inputs (BLOCK_K/2 values and BLOCK_K/32
    meta words per row, contiguous 16-byte vector loads). One token (``USE_DOT`` off; BLOCK_N x
    BLOCK_K = 8 x 1024, 4 warps): the tile's x is read once, contiguously, and each group's two
    kept values pick their inputs from its four in registers; the packed weight is marked
    evict-first and x evict-last (``STREAM``), products accumulate per group and are reduced
    once at the end. How the tiles are brought in (``X_MODE``): 3, the default, leaves the
    loads to Triton's software pipeliner (``STAGES`` = 3 tiles in flight through shared memory,
    asynchronous copies); 1 prefetches the next tile's values and meta into registers by hand
    before this tile's x (``AHEAD`` 2: the one after next too); 0 is 1 with each value gathering
    x at its column. On an H200 3 was 7-11% faster than 1 at each 7B shape's best config, 0 7-13%
    slower than 1, AHEAD 2 slower at every shape (benchmarks/RESULTS.md, runs 3, 4 and 6). 4
    (float16/bfloat16 only) is 3 with the pick done by one byte permute per group on 32-bit
    words (``_PICK_FMA_FP16``): a fifth fewer instructions per loop step, not yet timed; it
    also takes a block of up to 8 tokens (each group decoded once for all of them), a candidate
    for 2 to 16 tokens, where the tensor-core path below loses to dense. Two or more tokens
    (``USE_DOT`` on, BLOCK_T = 16..64 tokens, pad rows masked; BLOCK_N x BLOCK_K = 64 x 128,
    fp32 32 x 64 with BLOCK_T <= 32): the dense [BLOCK_N, BLOCK_K] tile is rebuilt
    with ``tl.where`` on the decoded positions and fed to ``tl.dot`` (fp32 inputs as TF32x3:
    three TF32 products, about fp32 accuracy).

``sell`` (sliced ELLPACK, unstructured)
    Rows in slices of S rows (S a power of two); a slice is padded to its longest row (rounded
    up to a slot block) and stored slot-major: value of row r, slot j at
    ``slice_ptr[s] + j * S + r``, so neighbouring rows read neighbouring addresses. Column
    indices are int16 read as ``& 0xFFFF`` (K up to 65536); ``slice_ptr`` int64 [n_slices + 1].

    Grid (n_slices, SPLIT, cdiv(T, BLOCK_T)); a program owns one slice and every SPLIT-th
    block of BLOCK_J slots (one token: 128, eviction hints as for nm24; up to BLOCK_T = 8
    tokens: 16), loads [BLOCK_J, S] values and columns (one contiguous run; the next block's
    before this one's gathers, or ``STAGES`` > 1 blocks in flight through Triton's pipeliner),
    gathers x[t, col], accumulates element-wise and reduces over the slots at the end. The
    gather reads global memory (L1/L2-resident x), or, one token with ``X_SHARED``, a copy of
    the token's whole input in shared memory (``tl.gather``; not yet timed).

Block sizes: the measured table of :mod:`sparse_configs` where it has an entry for the call
(format, dtype, token count, shape; written by ``benchmarks/sparse_gpu_sweep.py --pick`` from a
GPU sweep), else one fixed config per path, the one-token ones chosen by that sweep on an H200
(not autotuned at run time: see the comment at ``_nm24_gemv``), a smaller one under the
interpreter; ``config=`` forces another (tests, the sweep). Fewer programs than SMs (few output rows): the K range
(nm24) or the slots (sell) is split over SPLIT programs that add fp32 partial sums atomically
into a zeroed buffer, cast to the output dtype afterwards (two more launches, so only when the
grid is small). Otherwise the kernel stores the result in the output dtype directly, bias
included: one launch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparsellm.ops import Decline

from . import sparse_configs
from ._common import check_device, configs, interpreting, next_pow2

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# How the one-token nm24 kernel meets x: 0 gathers x at each kept value's column; 1 reads the
# tile's x contiguously and picks each kept value's input in registers (2 products, 3 selects).
# (Rebuilding each group dense and taking 4 products was a third way: 1.7-2.3x slower than the
# pick on an H200, benchmarks/sparse_gpu_sweep.py, so it is gone.)
# 3 is 1's pick with the loads left to Triton's software pipeliner instead of the hand-written
# prefetch into registers: STAGES tiles in flight, copied asynchronously (cp.async on sm_80+)
# into shared memory, from which each tile is read in the layout its arithmetic wants. On an
# H200 (benchmarks/RESULTS.md, "GPU sparse decode", run 6) it beat 1 at every 7B shape by 7-11%
# at each shape's best config. (0's gather on a [rows, meta words, 16 slots] tile, which needs no
# layout moves, was slower than 1 at every shape there: 1.26-1.33x dense against 1.37-1.43x.)
# 4 is 3 with each group's two inputs fetched by one byte permute of 32-bit words (16-bit dtypes
# only; _PICK_FMA_FP16): fewer instructions per group, not yet timed on a GPU; it runs token
# blocks of up to NM24_PICK_BLOCK_T_MAX tokens too (a forced config: the tensor-core path is the
# default for more than one token).
NM24_X_MODES = (0, 1, 3, 4)
NM24_WORD_X_MODES = sparse_configs.NM24_WORD_X_MODES  # the modes that read 16-bit values and x as 32-bit words
NM24_PICK_BLOCK_T_MAX = 8  # tokens per program of X_MODE 4 (its accumulators grow with them)
MAX_SPLIT_K_BLOCK = 1024  # the largest BLOCK_K of the nm24 tuned configs: split ranges are multiples of it,
# so every tile starts at a multiple of its BLOCK_K (the kernel's tl.multiple_of hints)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: small, so that small test shapes exercise the split path


# ------------------------------------------------------------------------------------- nm24

@triton.jit
def _nm24_groups(vals, words, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr):
    """A tile's groups: the first and second kept values [BLOCK_N, BLOCK_G] and their input
    positions p0 < p1 (0..3) from the meta words (one 4-bit code per group, word w covering
    groups 8w..8w+7)."""
    code = _nm24_codes(words, BLOCK_N, BLOCK_W, BLOCK_G)
    first, second = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_G, 2)))
    return first, second, code & 3, (code >> 2) & 3


@triton.jit
def _nm24_codes(words, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr):
    """Each group's 4-bit code [BLOCK_N, BLOCK_G] (p0 | p1 << 2) from the meta words [BLOCK_N,
    BLOCK_W] (word w covering groups 8w..8w+7)."""
    gg = tl.arange(0, BLOCK_G)
    code = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, BLOCK_W, 8)), (BLOCK_N, BLOCK_G))
    return (code >> ((gg % 8) * 4)[None, :]) & 15


@triton.jit
def _nm24_dense_groups(first, second, p0, p1):
    """The groups rebuilt dense: [BLOCK_N, BLOCK_G, 4], each kept value at its position."""
    lane = tl.arange(0, 4)[None, None, :]
    return tl.where(lane == p0[:, :, None], first[:, :, None],
                    tl.where(lane == p1[:, :, None], second[:, :, None], tl.zeros_like(first)[:, :, None]))


@triton.jit
def _nm24_pick(vals, words, x4, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr):
    """A tile's products per group [BLOCK_N, BLOCK_G] (fp32): its x read contiguously as
    [BLOCK_G, 4], each group's two kept values picking their inputs in registers (positions
    p0 < p1, so p0 <= 2 and p1 >= 1)."""
    first, second, p0, p1 = _nm24_groups(vals, words, BLOCK_N, BLOCK_W, BLOCK_G)
    xa, xb = tl.split(tl.reshape(x4.to(tl.float32), (BLOCK_G, 2, 2)))  # (x0, x2), (x1, x3)
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    pick0 = tl.where(p0 == 0, x0[None, :], tl.where(p0 == 1, x1[None, :], x2[None, :]))
    pick1 = tl.where(p1 == 3, x3[None, :], tl.where(p1 == 2, x2[None, :], x1[None, :]))
    return first.to(tl.float32) * pick0 + second.to(tl.float32) * pick1


# X_MODE 4 (16-bit dtypes): a group's kept pair is one 32-bit word (v0 | v1 << 16), its four
# inputs two words, xlo = x0 | x1 << 16 and xhi = x2 | x3 << 16. One byte permute (PTX prmt,
# bytes 0-3 from xlo and 4-7 from xhi, result byte i chosen by the selector's nibble i) fetches
# both inputs at once: input p is bytes 2p and 2p+1, so the selector for positions (p0, p1) has
# nibbles (2p0, 2p0+1, 2p1, 2p1+1). From the group's code c = p0 | p1 << 2: (c * 65) & 0x303
# moves p1 to bit 8 (p0 | p1 << 8); times 34 plus 0x1010 gives the four nibbles. Per group: 5
# integer ops and 2 conversions of the pair, then per token 1 permute, 2 conversions and 2 fma,
# against X_MODE 3's compares and selects: one step of the 8x1024 loop (4 warps, fp16, sm_90,
# Triton 3.6) is about 310 SASS instructions against X_MODE 3's 398, in 72 registers against 96
# (benchmarks/compile_check_sparse_gpu.py). For a block of tokens the pair's conversion is its
# own snippet, so that each pair is converted once.
# _PAIR_F32_*: $0, $1 = the pair word $2's two halves in fp32.
_PAIR_F32_FP16 = tl.constexpr("""{
    .reg .b16 v0, v1;
    mov.b32 {v0, v1}, $2;
    cvt.f32.f16 $0, v0;
    cvt.f32.f16 $1, v1;
}""")
# _PICK_FMA_*: $0 = $1 + $2 * x[p0] + $3 * x[p1], the inputs permuted out of $4 (xlo), $5 (xhi)
# by the selector $6.
_PICK_FMA_FP16 = tl.constexpr("""{
    .reg .b32 xp;
    .reg .b16 a, b;
    .reg .f32 fa, fb;
    prmt.b32 xp, $4, $5, $6;
    mov.b32 {a, b}, xp;
    cvt.f32.f16 fa, a;
    cvt.f32.f16 fb, b;
    fma.rn.f32 $0, $2, fa, $1;
    fma.rn.f32 $0, $3, fb, $0;
}""")
# _PAIR_PICK_FMA_*: one token's pick with the pair's conversion inside ($2 the pair word, $3 xlo,
# $4 xhi, $5 the selector): at one token nothing is shared, and keeping the converted pair out of
# the registers between the two snippets keeps the 8x1024 step in 72 registers instead of 108.
_PAIR_PICK_FMA_FP16 = tl.constexpr("""{
    .reg .b32 xp;
    .reg .b16 a, b, v0, v1;
    .reg .f32 fa, fb, f0, f1;
    prmt.b32 xp, $3, $4, $5;
    mov.b32 {a, b}, xp;
    mov.b32 {v0, v1}, $2;
    cvt.f32.f16 fa, a;
    cvt.f32.f16 fb, b;
    cvt.f32.f16 f0, v0;
    cvt.f32.f16 f1, v1;
    fma.rn.f32 $0, f0, fa, $1;
    fma.rn.f32 $0, f1, fb, $0;
}""")
_PAIR_F32_BF16 = tl.constexpr(_PAIR_F32_FP16.value.replace("cvt.f32.f16", "cvt.f32.bf16"))
_PICK_FMA_BF16 = tl.constexpr(_PICK_FMA_FP16.value.replace("cvt.f32.f16", "cvt.f32.bf16"))
_PAIR_PICK_FMA_BF16 = tl.constexpr(_PAIR_PICK_FMA_FP16.value.replace("cvt.f32.f16", "cvt.f32.bf16"))
# the interpreter runs no PTX: it takes the same permute written in integer ops
_PICK_IN_ASM = tl.constexpr(not interpreting())


@triton.jit
def _half_to_f32(word, DTYPE: tl.constexpr):
    """The low 16 bits of an int32 word, read as a DTYPE (float16 / bfloat16) number, in fp32."""
    return (word & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)


@triton.jit
def permute_selector(code):
    """The byte-permute selector of each group code c = p0 | p1 << 2: nibbles (2 p0, 2 p0 + 1,
    2 p1, 2 p1 + 1), so that the permute's low half is input p0 and its high half input p1."""
    return ((code * 65) & 0x303) * 34 + 0x1010


@triton.jit
def _nm24_pair_f32(vw, DTYPE: tl.constexpr):
    """A kept-pair word's two values (``vw`` = v0 | v1 << 16) in fp32."""
    if _PICK_IN_ASM:
        if DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_PAIR_F32_BF16, "=f,=f,r", [vw], dtype=(tl.float32, tl.float32),
                                             is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_PAIR_F32_FP16, "=f,=f,r", [vw], dtype=(tl.float32, tl.float32),
                                         is_pure=True, pack=1)
    return _half_to_f32(vw, DTYPE), _half_to_f32(vw >> 16, DTYPE)


@triton.jit
def _nm24_pair_permute_pick(acc, vw, xlo, xhi, sel, DTYPE: tl.constexpr):
    """One token's :func:`_nm24_permute_pick` from the kept-pair words ``vw`` (converted inside
    the same snippet)."""
    if _PICK_IN_ASM:
        if DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_PAIR_PICK_FMA_BF16, "=f,f,r,r,r,r", [acc, vw, xlo, xhi, sel],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_PAIR_PICK_FMA_FP16, "=f,f,r,r,r,r", [acc, vw, xlo, xhi, sel],
                                         dtype=tl.float32, is_pure=True, pack=1)
    f0, f1 = _nm24_pair_f32(vw, DTYPE)
    return _nm24_permute_pick(acc, f0, f1, xlo, xhi, sel, DTYPE)


@triton.jit
def _nm24_permute_pick(acc, f0, f1, xlo, xhi, sel, DTYPE: tl.constexpr):
    """acc + f0 * x[p0] + f1 * x[p1] (fp32) per element, the inputs picked by a byte permute of
    the input words ``xlo``/``xhi`` with the selector ``sel`` (see _PICK_FMA_FP16)."""
    if _PICK_IN_ASM:
        if DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_PICK_FMA_BF16, "=f,f,f,f,r,r,r", [acc, f0, f1, xlo, xhi, sel],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_PICK_FMA_FP16, "=f,f,f,f,r,r,r", [acc, f0, f1, xlo, xhi, sel],
                                         dtype=tl.float32, is_pure=True, pack=1)
    # the permute in integer ops, read from the selector: nibble 0 is 2 p0, nibble 2 is 2 p1
    p0 = (sel & 15) >> 1
    p1 = ((sel >> 8) & 15) >> 1
    x0 = _half_to_f32(tl.where(p0 < 2, xlo, xhi) >> ((p0 & 1) * 16), DTYPE)
    x1 = _half_to_f32(tl.where(p1 < 2, xlo, xhi) >> ((p1 & 1) * 16), DTYPE)
    return acc + f0 * x0 + f1 * x1


@triton.jit
def _stream_load(ptr, mask, STREAM: tl.constexpr):
    """A load of packed weight data, read once per call: with STREAM, marked evict-first so it
    does not push x (read by every program) out of the caches."""
    if STREAM:
        return tl.load(ptr, mask=mask, other=0, eviction_policy="evict_first")
    return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _x_load(ptr, mask, STREAM: tl.constexpr):
    """A load of x, which every program reads: with STREAM, marked evict-last."""
    if STREAM:
        return tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_last")
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _nm24_kernel(x_ptr, v_ptr, m_ptr, b_ptr, out_ptr, T, N, K, v_per_split, stride_v, stride_m, stride_xt, stride_ot,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_MODE: tl.constexpr = 0,
                 STREAM: tl.constexpr = 0, AHEAD: tl.constexpr = 1, STAGES: tl.constexpr = 3):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    BLOCK_V: tl.constexpr = BLOCK_K // 2
    BLOCK_W: tl.constexpr = BLOCK_K // 32
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    n64 = n.to(tl.int64)
    kv = K // 2
    # the loop runs over value slots (2 per group of 4 inputs); the row strides stride_v = K/2
    # and stride_m = K/32 are arguments, so that their divisibility (specialised by the
    # launcher) makes the value loads wide vector loads
    v_start = pid_s * v_per_split
    v_end = tl.minimum(kv, v_start + v_per_split)
    vv = tl.arange(0, BLOCK_V)
    ww = tl.arange(0, BLOCK_W)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # the token block (the tensor-core path, X_MODE 4)
    t_ok = t < T
    if USE_DOT:
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        kk = tl.arange(0, BLOCK_K)
        for v0 in range(v_start, v_end, BLOCK_V):
            v0 = tl.multiple_of(v0, BLOCK_V)
            k0 = v0 * 2
            v_idx = v0 + vv
            vals = tl.load(v_ptr + n64[:, None] * stride_v + v_idx[None, :],
                           mask=n_ok[:, None] & (v_idx[None, :] < v_end), other=0.0)
            w_idx = v0 // 16 + ww
            words = tl.load(m_ptr + n64[:, None] * stride_m + w_idx[None, :],
                            mask=n_ok[:, None] & (w_idx[None, :] * 16 < v_end), other=0)
            first, second, p0, p1 = _nm24_groups(vals, words, BLOCK_N, BLOCK_W, BLOCK_G)
            w3 = _nm24_dense_groups(first, second, p0, p1)
            w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
            k_idx = k0 + kk
            xt = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_xt + k_idx[None, :],
                         mask=t_ok[:, None] & (k_idx[None, :] < K), other=0.0)
            acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc, input_precision=DOT_PREC)
    elif X_MODE == 3:
        # X_MODE 1's pick with the loads inside the loop, left to Triton's software pipeliner
        # (STAGES tiles in flight, copied asynchronously into shared memory) instead of the
        # hand-written prefetch into registers
        acc_g = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        x_row = x_ptr + pid_t.to(tl.int64) * stride_xt
        v_rows = v_ptr + n64[:, None] * stride_v
        m_rows = m_ptr + n64[:, None] * stride_m
        gg4 = tl.arange(0, BLOCK_G)[:, None] * 4 + tl.arange(0, 4)[None, :]
        for v0 in tl.range(v_start, v_end, BLOCK_V, num_stages=STAGES):
            v0 = tl.multiple_of(v0, BLOCK_V)
            v_idx = v0 + vv
            w_idx = v0 // 16 + ww
            vals = _stream_load(v_rows + v_idx[None, :], n_ok[:, None] & (v_idx[None, :] < v_end), STREAM)
            words = _stream_load(m_rows + w_idx[None, :], n_ok[:, None] & (w_idx[None, :] * 16 < v_end), STREAM)
            k_in = v0 * 2 + gg4
            x4 = _x_load(x_row + k_in, k_in < v_end * 2, STREAM)
            acc_g += _nm24_pick(vals, words, x4, BLOCK_N, BLOCK_W, BLOCK_G)
        acc = tl.sum(acc_g, axis=1)
    elif X_MODE == 4:
        # X_MODE 3 with the pick done by a byte permute on 32-bit words (16-bit dtypes; see
        # _PICK_FMA_FP16), for a block of BLOCK_T tokens: the loop runs over groups, each group's
        # kept pair read as one word and converted once, its four inputs as two words per token
        # (the rows' bases cast from the 16-bit pointers, so that the launcher's divisibility
        # hints on the strides still make 16-byte loads)
        acc3 = tl.zeros([BLOCK_T, BLOCK_N, BLOCK_G], dtype=tl.float32)
        v_rows = (v_ptr + n64[:, None] * stride_v).to(tl.pointer_type(tl.int32))
        m_rows = m_ptr + n64[:, None] * stride_m
        x_rows = (x_ptr + t[:, None].to(tl.int64) * stride_xt).to(tl.pointer_type(tl.int32))  # [BLOCK_T, 1]
        gg = tl.arange(0, BLOCK_G)
        gg2 = tl.arange(0, 2 * BLOCK_G)  # a tile's input words: word i holds inputs 2i, 2i + 1
        g_end = v_end // 2
        for g0 in tl.range(v_start // 2, g_end, BLOCK_G, num_stages=STAGES):
            g0 = tl.multiple_of(g0, BLOCK_G)
            g_idx = g0 + gg
            w_idx = g0 // 8 + ww
            vw = _stream_load(v_rows + g_idx[None, :], n_ok[:, None] & (g_idx[None, :] < g_end), STREAM)
            # (the bound in words, so that the mask is constant over a vector of consecutive words)
            words = _stream_load(m_rows + w_idx[None, :], n_ok[:, None] & (w_idx[None, :] < g_end // 8), STREAM)
            x_idx = 2 * g0 + gg2
            xw = _x_load(x_rows + x_idx[None, :], t_ok[:, None] & (x_idx[None, :] < 2 * g_end), STREAM)
            xlo, xhi = tl.split(tl.reshape(xw, (BLOCK_T, BLOCK_G, 2)))
            sel = permute_selector(_nm24_codes(words, BLOCK_N, BLOCK_W, BLOCK_G))
            if BLOCK_T == 1:
                acc3 = _nm24_pair_permute_pick(acc3, vw[None, :, :], xlo[:, None, :], xhi[:, None, :],
                                               sel[None, :, :], x_ptr.dtype.element_ty)
            else:  # each pair converted once for the token block
                f0, f1 = _nm24_pair_f32(vw, x_ptr.dtype.element_ty)
                acc3 = _nm24_permute_pick(acc3, f0[None, :, :], f1[None, :, :], xlo[:, None, :], xhi[:, None, :],
                                          sel[None, :, :], x_ptr.dtype.element_ty)
        acc = tl.sum(acc3, axis=2)  # [BLOCK_T, BLOCK_N]
    else:
        # products accumulate element-wise; the cross-thread reduction runs once, after the loop
        acc2 = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)  # X_MODE 0: per value slot
        acc_g = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)  # X_MODE 1: per group
        x_row = x_ptr + pid_t.to(tl.int64) * stride_xt
        v_rows = v_ptr + n64[:, None] * stride_v
        m_rows = m_ptr + n64[:, None] * stride_m
        gg4 = tl.arange(0, BLOCK_G)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK_G, 4] inputs of a tile
        # software pipelining by hand: the next tile's values and meta are requested before
        # this tile's x is read, so two tiles per program are in flight
        v_idx = v_start + vv
        w_idx = v_start // 16 + ww
        vals = _stream_load(v_rows + v_idx[None, :], n_ok[:, None] & (v_idx[None, :] < v_end), STREAM)
        words = _stream_load(m_rows + w_idx[None, :], n_ok[:, None] & (w_idx[None, :] * 16 < v_end), STREAM)
        # AHEAD 2: a third tile in flight, the one after next: more bytes requested per thread
        # while the GPU waits on memory (a candidate of benchmarks/sparse_gpu_sweep.py)
        if AHEAD == 2:
            v_idx = v_start + BLOCK_V + vv
            w_idx = (v_start + BLOCK_V) // 16 + ww
            vals1 = _stream_load(v_rows + v_idx[None, :], n_ok[:, None] & (v_idx[None, :] < v_end), STREAM)
            words1 = _stream_load(m_rows + w_idx[None, :], n_ok[:, None] & (w_idx[None, :] * 16 < v_end), STREAM)
        for v0 in range(v_start, v_end, BLOCK_V):
            v0 = tl.multiple_of(v0, BLOCK_V)
            nv_idx = v0 + AHEAD * BLOCK_V + vv
            nw_idx = (v0 + AHEAD * BLOCK_V) // 16 + ww
            vals_next = _stream_load(v_rows + nv_idx[None, :], n_ok[:, None] & (nv_idx[None, :] < v_end), STREAM)
            words_next = _stream_load(m_rows + nw_idx[None, :], n_ok[:, None] & (nw_idx[None, :] * 16 < v_end),
                                      STREAM)
            if X_MODE == 0:
                # gather: value slot v (16 per word) keeps its input position in bits
                # 2(v%16)..2(v%16)+1; each slot loads x at its column (x is L1/L2-resident)
                wv = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, BLOCK_W, 16)), (BLOCK_N, BLOCK_V))
                pos = (wv >> ((vv % 16) * 2)[None, :]) & 3
                col = v0 * 2 + (vv // 2)[None, :] * 4 + pos
                xg = _x_load(x_row + col, n_ok[:, None] & ((v0 + vv)[None, :] < v_end), STREAM)
                acc2 += vals.to(tl.float32) * xg.to(tl.float32)
            else:
                # pick: the tile's x read once, contiguous ([BLOCK_G, 4]); each group's two
                # values pick their inputs in registers (positions p0 < p1, so p0 <= 2, p1 >= 1)
                k_in = v0 * 2 + gg4
                x4 = _x_load(x_row + k_in, k_in < v_end * 2, STREAM)
                acc_g += _nm24_pick(vals, words, x4, BLOCK_N, BLOCK_W, BLOCK_G)
            if AHEAD == 2:
                vals = vals1
                words = words1
                vals1 = vals_next
                words1 = words_next
            else:
                vals = vals_next
                words = words_next
        if X_MODE == 0:
            acc = tl.sum(acc2, axis=1)
        else:
            acc = tl.sum(acc_g, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        bias = bias * (pid_s == 0).to(tl.float32)  # added once, by the first K split
        if USE_DOT or X_MODE == 4:
            acc += bias[None, :]
        else:
            acc += bias
    if USE_DOT or X_MODE == 4:  # [BLOCK_T, BLOCK_N]
        offs = t[:, None].to(tl.int64) * stride_ot + n[None, :]
        ok = t_ok[:, None] & n_ok[None, :]
    else:
        offs = pid_t.to(tl.int64) * stride_ot + n
        ok = n_ok
    if ATOMIC:
        tl.atomic_add(out_ptr + offs, acc, mask=ok)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


_NM24_KEY = ["N", "K", "T"]
# one token: one fixed config, chosen over the three 7B shapes in benchmarks/sparse_gpu_sweep.py
# on an H200 (fp16, commit cfdb96c, benchmarks/RESULTS.md "GPU sparse decode" run 6: 8x1024
# tiles, 4 warps, the pipelined register pick, 3 stages, eviction hints; 12.4 / 24.4 / 22.7 us
# against dense 19.0 / 34.3 / 36.5, within 3% of each shape's best config; run 5's 4x512 pick
# with the hand-written prefetch took 13.2 / 25.6 / 26.6 us in the same sweep). No autotuning
# here: the autotuner times its candidates with do_bench, and on one H200 machine that timing
# was dominated by the host's launch cost (benchmarks/gpu_timing.py), so its pick was random.
_nm24_gemv = triton.autotune(
    configs=configs([{"BLOCK_N": 8, "BLOCK_K": 1024, "X_MODE": 3, "STREAM": 1, "STAGES": 3}],
                    {"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=(4,)),
    key=_NM24_KEY, reset_to_zero=["out_ptr"])(_nm24_kernel)
# two or more tokens: tensor-core tiles, one config (no autotuning: these sizes matter less
# than decode's, and GPU time to tune is scarce). fp32 tiles hold twice the bytes and TF32x3
# splits each operand in two, so they are a quarter of the half-precision ones, on 8 warps: no
# register spills on sm_90 (benchmarks/compile_check_sparse_gpu.py; on 4 warps Triton 3.6, the
# GPU machine's, spilled 64 bytes at 32 tokens, Triton 3.9 none).
_nm24_gemm = triton.autotune(
    configs=configs([{"BLOCK_N": 64, "BLOCK_K": 128}], {"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=(4,)),
    key=_NM24_KEY, reset_to_zero=["out_ptr"])(_nm24_kernel)
_nm24_gemm_f32 = triton.autotune(
    configs=configs([{"BLOCK_N": 32, "BLOCK_K": 64}], {"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=(8,)),
    key=_NM24_KEY, reset_to_zero=["out_ptr"])(_nm24_kernel)
NM24_BLOCK_T_MAX = {torch.float32: 32}  # tokens per program of the dot path (default 64)


_BEST: dict = {}


def _launch(tuner, grid, key, *args, config: dict | None = None, **kwargs):
    """Launch an autotuned kernel: through ``tuner`` (benchmarking its configs) the first time
    for ``key``, then the jitted kernel directly with the chosen config, which skips the
    autotuner's per-call bookkeeping (microseconds, a visible share of a decode-size call).
    ``config`` (block sizes, ``num_warps``, ...) bypasses the tuner: tests and config sweeps."""
    if config is not None:
        tuner.fn[grid](*args, **kwargs, **{"num_warps": 4, **config})
        return
    best = _BEST.get((id(tuner), key))
    if best is None:
        tuner[grid](*args, **kwargs)
        _BEST[(id(tuner), key)] = tuner.best_config.all_kwargs()
    else:
        tuner.fn[grid](*args, **kwargs, **best)


def _check_dtypes(x, *weights):
    if x.dtype not in DTYPES:
        raise Decline(f"dtype {x.dtype} (kernels take float16/bfloat16/float32)")
    for w in weights:
        if w.dtype != x.dtype:
            raise Decline(f"weight dtype {w.dtype} != input dtype {x.dtype}")


def _check_operands(x, bias, in_features: int, out_features: int):
    """x's last dimension and the bias's length must fit the weight, as F.linear (the
    reference) requires: the kernels index x and the bias by the weight's sizes, so a
    mismatch would be reshaped into other tokens, or read past the bias's end. Shapes only
    (host metadata): nothing read from the device, so CUDA graph capture is unaffected."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x of shape {tuple(x.shape)} does not end in the weight's {in_features} input features")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit {out_features} output features")


def _finish(buf, dtype):
    return buf if buf.dtype == dtype else buf.to(dtype)


def nm24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                bias: torch.Tensor | None = None, *, split_k: int | None = None,
                config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for the 2:4-packed ``(values, meta)`` of W [N, in_features]; x of
    shape [..., in_features]. ``split_k`` forces the number of K splits and ``config`` the
    kernel's meta-parameters (``BLOCK_N``, ``BLOCK_K``, ``X_MODE``, ``num_warps``), skipping
    the autotuner (tests, benchmarks/sparse_gpu_sweep.py)."""
    k = int(in_features)
    if k % 32:
        raise Decline(f"in_features {k} % 32 != 0")
    _check_dtypes(x, values, *(() if bias is None else (bias,)))
    if meta.dtype != torch.int32:
        raise Decline(f"meta dtype {meta.dtype} != int32")
    check_device(x, values, meta)
    n = values.shape[0]
    if values.shape != (n, k // 2) or meta.shape != (n, k // 32):
        raise ValueError(f"packed shapes {tuple(values.shape)}, {tuple(meta.shape)} do not fit "
                         f"{n}x{k} (expected values [N, K/2], meta [N, K/32])")
    _check_operands(x, bias, k, n)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    t = x2.shape[0]
    if config is None and split_k is None:
        config = sparse_configs.lookup("nm24", x.dtype, t, k, n)
        if config is not None:
            split_k = config.pop("split_k", None)
    values = values.contiguous()
    meta = meta.contiguous()
    word_pick = config is not None and config.get("X_MODE") in NM24_WORD_X_MODES
    use_dot = t > 1 and not word_pick
    if word_pick:
        if x.dtype == torch.float32:
            raise ValueError(f"X_MODE {config['X_MODE']} reads 16-bit words: float16/bfloat16 only")
        # x and the values read as 32-bit words: a view starting at an odd element is copied
        x2 = x2.clone() if x2.data_ptr() % 4 else x2
        values = values.clone() if values.data_ptr() % 4 else values
        block_t = min(NM24_PICK_BLOCK_T_MAX, next_pow2(t))
    else:
        block_t = min(NM24_BLOCK_T_MAX.get(x.dtype, 64), max(16, next_pow2(t))) if use_dot else 1
    t_blocks = triton.cdiv(t, block_t)
    if split_k is None:
        # enough programs for every SM (row blocks counted at the smallest BLOCK_N of the configs)
        programs = triton.cdiv(n, 8 if not use_dot else 64) * t_blocks
        split_k = 1
        target = _sm_count(x.device)
        if 0 < programs < target:  # 0 programs (no tokens or no rows): nothing is launched
            split_k = min(triton.cdiv(target, programs), triton.cdiv(k, MAX_SPLIT_K_BLOCK))
    split_k = max(1, min(int(split_k), triton.cdiv(k, 32)))
    # split ranges: multiples of the largest BLOCK_K (interpreter: of its own 64), or of a forced
    # config's larger one
    unit = max(64 if interpreting() else MAX_SPLIT_K_BLOCK, (config or {}).get("BLOCK_K", 0))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), unit) * unit
    split_k = triton.cdiv(k, k_per_split)
    atomic = split_k > 1
    out = (torch.zeros if atomic else torch.empty)((t, n), device=x.device,
                                                    dtype=torch.float32 if atomic else x.dtype)
    if t and n:
        kernel = (_nm24_gemm_f32 if x.dtype == torch.float32 else _nm24_gemm) if use_dot else _nm24_gemv
        grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), split_k, t_blocks)  # noqa: E731
        key = (n, k, t, x.dtype, split_k, bias is not None)
        _launch(kernel, grid, key, x2, values, meta, x2 if bias is None else bias.contiguous(), out, t, n, k,
                k_per_split // 2, values.stride(0), meta.stride(0), x2.stride(0), out.stride(0),
                HAS_BIAS=bias is not None, ATOMIC=atomic, USE_DOT=use_dot,
                DOT_PREC="tf32x3" if x.dtype == torch.float32 else "tf32", BLOCK_T=block_t, config=config)
    return _finish(out, x.dtype).reshape(*lead, n)


# ------------------------------------------------------------------------------------- sell

@triton.jit
def _sell_block(v_ptr, c_ptr, start, j, width, r, S: tl.constexpr, STREAM: tl.constexpr):
    """A slice's slot block ``j`` [BLOCK_J]: its values and columns [BLOCK_J, S] (one contiguous
    run, slot-major) and which slots exist [BLOCK_J, 1]."""
    ok = (j < width)[:, None]
    off = start + j[:, None].to(tl.int64) * S + r[None, :]
    return _stream_load(v_ptr + off, ok, STREAM), _stream_load(c_ptr + off, ok, STREAM), ok


@triton.jit
def _sell_gather(x_rows, x_all, c, ok, t_ok, BLOCK_J: tl.constexpr, S: tl.constexpr, X_SHARED: tl.constexpr,
                 STREAM: tl.constexpr):
    """x at a slot block's columns, [BLOCK_T, BLOCK_J, S]: with X_SHARED from ``x_all`` (the
    token's whole input, [KP]) through ``tl.gather``, which Triton lowers to a copy of
    ``x_all`` into shared memory and one shared load per element; else a global load per
    element (L1/L2-resident, but a warp's 32 random columns touch up to 32 cache lines)."""
    col = c.to(tl.int32) & 0xFFFF
    if X_SHARED:
        return tl.reshape(tl.gather(x_all, tl.reshape(col, (BLOCK_J * S,)), 0), (1, BLOCK_J, S))
    return _x_load(x_rows + col[None, :, :], t_ok[:, None, None] & ok[None, :, :], STREAM)


@triton.jit
def _sell_kernel(x_ptr, v_ptr, c_ptr, sp_ptr, b_ptr, out_ptr, T, N, K, n_split, stride_xt, stride_ot,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, S: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, STREAM: tl.constexpr = 0,
                 X_SHARED: tl.constexpr = 0, KP: tl.constexpr = 1, STAGES: tl.constexpr = 1):
    sl = tl.program_id(0)
    pid_sp = tl.program_id(1)
    pid_t = tl.program_id(2)
    start = tl.multiple_of(tl.load(sp_ptr + sl), S)  # every slice holds whole slots of S rows
    width = ((tl.load(sp_ptr + sl + 1) - start) // S).to(tl.int32)
    r = tl.arange(0, S)
    row = sl * S + r
    row_ok = row < N
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    x_rows = x_ptr + t[:, None, None].to(tl.int64) * stride_xt  # [BLOCK_T, 1, 1]
    if X_SHARED:  # one token (BLOCK_T 1): its whole input, KP = next power of two >= K
        kk = tl.arange(0, KP)
        x_all = _x_load(x_ptr + pid_t.to(tl.int64) * stride_xt + kk, kk < K, STREAM)
    else:
        x_all = x_ptr  # unused
    jj = tl.arange(0, BLOCK_J)
    acc3 = tl.zeros([BLOCK_T, BLOCK_J, S], dtype=tl.float32)  # reduced over the slots after the loop
    step = n_split * BLOCK_J
    if STAGES > 1:
        # the loads left to Triton's software pipeliner: STAGES slot blocks in flight
        for j0 in tl.range(pid_sp * BLOCK_J, width, step, num_stages=STAGES):
            v, c, ok = _sell_block(v_ptr, c_ptr, start, j0 + jj, width, r, S, STREAM)
            xg = _sell_gather(x_rows, x_all, c, ok, t_ok, BLOCK_J, S, X_SHARED, STREAM)
            acc3 += xg.to(tl.float32) * v.to(tl.float32)[None, :, :]
    else:
        # software pipelining by hand: the next slot block is requested before this one's gathers
        v, c, ok = _sell_block(v_ptr, c_ptr, start, pid_sp * BLOCK_J + jj, width, r, S, STREAM)
        for j0 in range(pid_sp * BLOCK_J, width, step):
            v_next, c_next, ok_next = _sell_block(v_ptr, c_ptr, start, j0 + step + jj, width, r, S, STREAM)
            xg = _sell_gather(x_rows, x_all, c, ok, t_ok, BLOCK_J, S, X_SHARED, STREAM)
            acc3 += xg.to(tl.float32) * v.to(tl.float32)[None, :, :]
            v = v_next
            c = c_next
            ok = ok_next
    acc = tl.sum(acc3, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + row, mask=row_ok, other=0.0).to(tl.float32)
        acc += (bias * (pid_sp == 0).to(tl.float32))[None, :]
    offs = t[:, None].to(tl.int64) * stride_ot + row[None, :]
    ok_out = t_ok[:, None] & row_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + offs, acc, mask=ok_out)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok_out)


# K only keys the tuning (the kernel does not read it): the slots per row, and so the best slot
# block, grow with the input size, and 4096->4096 and 11008->4096 share N
_SELL_KEY = ["N", "K", "T", "S", "BLOCK_T"]
# one token: one fixed config, the fastest over the three 7B shapes in benchmarks/sparse_gpu_sweep.py
# on an H200 (commit f8def43, 8-row slices: 128-slot blocks, 4 warps, eviction hints; 9.1 / 12.5 /
# 12.8 us against dense 18.9 / 34.7 / 36.7; the best config of each shape was at most 6% faster);
# no autotuning, as for nm24
_sell_gemv = triton.autotune(configs=configs([{"BLOCK_J": 128, "STREAM": 1}], {"BLOCK_J": 8}, num_warps=(4,)),
                             key=_SELL_KEY, reset_to_zero=["out_ptr"])(_sell_kernel)
# several tokens: the [BLOCK_T, BLOCK_J, S] product tile shrinks the slot block (one config)
_sell_multi = triton.autotune(configs=configs([{"BLOCK_J": 16}], {"BLOCK_J": 8}, num_warps=(4,)),
                              key=_SELL_KEY, reset_to_zero=["out_ptr"])(_sell_kernel)

SELL_BLOCK_T_MAX = 8  # tokens per program; more tokens take more programs (each re-reads its slice)
# The largest input a table's X_SHARED config stages in shared memory (padded to a power of two):
# 48 KiB, the shared memory every CUDA GPU since Volta gives a block without opting in (the
# sweep's largest, 11008 fp16 inputs, stage 32 KiB); larger inputs gather from global memory
SELL_X_SHARED_MAX_BYTES = 48 * 1024


def sell_linear(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, slice_ptr: torch.Tensor,
                out_features: int, in_features: int, slice_rows: int, bias: torch.Tensor | None = None,
                *, split: int | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for the sliced-ELLPACK ``(values, cols, slice_ptr)`` of W
    [out_features, in_features]; x of shape [..., in_features]. ``split`` forces the number
    of programs per slice and ``config`` the kernel's meta-parameters (``BLOCK_J``,
    ``num_warps``), skipping the autotuner (tests, benchmarks/sparse_gpu_sweep.py)."""
    n, k, s = int(out_features), int(in_features), int(slice_rows)
    _check_dtypes(x, values, *(() if bias is None else (bias,)))
    if cols.dtype != torch.int16 or slice_ptr.dtype != torch.int64:
        raise Decline(f"index dtypes {cols.dtype}, {slice_ptr.dtype} (need int16 columns, int64 slice_ptr)")
    if s < 2 or s & (s - 1):
        raise Decline(f"slice_rows {s} is not a power of two >= 2")
    if k > 65536:
        raise Decline(f"in_features {k} > 65536 (int16 column indices)")
    check_device(x, values, cols, slice_ptr)
    n_slices = slice_ptr.numel() - 1
    if n_slices != triton.cdiv(n, s):
        raise ValueError(f"{n_slices} slices do not fit {n} rows of slices of {s}")
    if values.dim() != 1 or cols.shape != values.shape:
        raise ValueError(f"sell values {tuple(values.shape)} and cols {tuple(cols.shape)} must be one flat array each")
    # the kernel reads up to slice_ptr[-1]: checked where that costs no device read (a CPU
    # slice_ptr, the interpreter's); on a GPU, reading it would synchronise every decode step,
    # so there the arrays must come from one sell_pack (as SparseGPULinear keeps them)
    if slice_ptr.device.type == "cpu" and values.numel() != int(slice_ptr[-1]):
        raise ValueError(f"slice_ptr ends at {int(slice_ptr[-1])}, values hold {values.numel()} entries")
    _check_operands(x, bias, k, n)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    t = x2.shape[0]
    if config is None and split is None:
        config = sparse_configs.lookup("sell", x.dtype, t, k, n, s)
        if config is not None:
            split = config.pop("split", None)
            config.pop("S")  # the packing's slice height, which the entry was matched on
            if config.get("X_SHARED") and next_pow2(k) * x.element_size() > SELL_X_SHARED_MAX_BYTES:
                config["X_SHARED"] = 0  # an any-shape entry met a larger input than it was measured on
    block_t = min(SELL_BLOCK_T_MAX, next_pow2(t))
    t_blocks = triton.cdiv(t, block_t)
    if config is not None and config.get("X_SHARED") and block_t > 1:
        raise ValueError("X_SHARED (x gathered from shared memory) is a one-token config")
    if split is None:
        # at least one program per SM (a split costs two more launches: zeroing and the cast)
        programs = n_slices * t_blocks
        target = _sm_count(x.device)
        # (0 programs, no tokens or no rows: nothing is launched)
        split = min(8, triton.cdiv(target, programs)) if 0 < programs < target else 1
    split = max(1, int(split))
    atomic = split > 1
    out = (torch.zeros if atomic else torch.empty)((t, n), device=x.device,
                                                    dtype=torch.float32 if atomic else x.dtype)
    if t and n:
        kernel = _sell_gemv if block_t == 1 else _sell_multi
        key = (n, k, s, t, x.dtype, split, bias is not None)
        _launch(kernel, (n_slices, split, t_blocks), key, x2, values.contiguous(), cols.contiguous(),
                slice_ptr.contiguous(), x2 if bias is None else bias.contiguous(), out, t, n, k, split, x2.stride(0),
                out.stride(0), HAS_BIAS=bias is not None, ATOMIC=atomic, S=s, BLOCK_T=block_t,
                # the staged input's padded size, only where a config stages it: the other kernels
                # stay one compiled binary for every K
                KP=next_pow2(k) if config is not None and config.get("X_SHARED") else 1, config=config)
    return _finish(out, x.dtype).reshape(*lead, n)
