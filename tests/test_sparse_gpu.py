"""Sparse decode kernels and their export (sparsellm.export.sparse_gpu, kernels/sparse_matmul.py).

- Packing: ``nm24`` (2:4 / 3:4 / emptier groups) and ``sell`` (sliced ELLPACK) round trips on
  fresh random weights, and the layouts' documented bit / slot positions.
- The reference products against ``F.linear`` in float64.
- The Triton kernels against the reference: without CUDA in Triton's interpreter on CPU tensors
  (conftest sets TRITON_INTERPRET=1 before the kernels are imported), on small shapes; with
  CUDA compiled, plus ``gpu`` tests at LLaMA-7B shapes.
- :class:`SparseGPULinear` dispatch below / above its crossover, :func:`to_sparse_gpu`'s
  report, and ``--export sparse-gpu`` in the settings and the CLI.

Errors are relative to the largest float64 reference output (never to zeros); NaN fails
every comparison here.
"""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsellm import ops, reference
from sparsellm.export import ExportError, SparseGPULinear, apply_export, save_pruned, sparse_gpu, to_sparse_gpu

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64; inf for NaN/inf in ``got``."""
    got, want = got.double().cpu(), want.double().cpu()
    assert want.abs().max() > 0, "comparing against an all-zero reference proves nothing"
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max()).item()


def nm_weight(rows, cols, keep=2, seed=0, dtype=torch.float32, empty_groups=True):
    """Random weight keeping ``keep`` random entries of each group of 4 inputs; with
    ``empty_groups`` some groups keep fewer (0 or 1) to exercise the zero padding."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    order = torch.rand(rows, cols // 4, 4, generator=gen).argsort(-1)
    kept = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :keep], True)
    if empty_groups:
        fewer = torch.rand(rows, cols // 4, generator=gen)
        kept[fewer < 0.1] = False                                        # no non-zero
        kept[(fewer >= 0.1) & (fewer < 0.2)] &= order[(fewer >= 0.1) & (fewer < 0.2)].argsort(-1) < 1  # one
    return (w * kept.reshape(rows, cols)).to(dtype)


def sparse_weight(rows, cols, sparsity, seed=0, dtype=torch.float32, uneven=True):
    """Unstructured; ``uneven``: per-row densities vary around the target, row 0 is empty and
    row 2 dense-ish (else every entry is zero with probability ``sparsity``)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    if not uneven:
        return (w * (torch.rand(rows, cols, generator=gen) >= sparsity)).to(dtype)
    density = (1 - sparsity) * (0.25 + 1.5 * torch.rand(rows, 1, generator=gen))
    keep = torch.rand(rows, cols, generator=gen) < density
    keep[0] = False
    if rows > 2:
        keep[2] = torch.rand(cols, generator=gen) < 0.8
    return (w * keep).to(dtype)


# ------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("keep", [2, 1])  # 2:4 and 3:4 (one kept of four)
@pytest.mark.parametrize("shape", [(5, 32), (17, 96), (64, 256)])
def test_nm24_pack_round_trip(shape, keep):
    w = nm_weight(*shape, keep=keep, seed=shape[0])
    values, meta = reference.nm24_pack(w)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == w.dtype
    assert meta.shape == (shape[0], shape[1] // 32) and meta.dtype == torch.int32
    assert torch.equal(reference.nm24_unpack(values, meta, shape[1]), w)
    # positions are distinct inside each group, kept entries in position order
    pos = reference.nm24_positions(meta).reshape(shape[0], -1, 2)
    assert bool((pos[..., 0] < pos[..., 1]).all())
    # values hold exactly the non-zeros (the rest are zero pads)
    assert int((values != 0).sum()) == int((w != 0).sum())


def test_nm24_layout_bits():
    """Group g of a word in bits 4g..4g+3, first position in the low 2 bits."""
    w = torch.zeros(1, 32)
    w[0, 1], w[0, 3] = 1.0, 2.0        # group 0: positions 1, 3 -> code 0b1101
    w[0, 4 * 7 + 2] = 3.0              # group 7: one non-zero at 2 -> padded with position 0: code 0b1000
    values, meta = reference.nm24_pack(w)
    word = int(meta[0, 0]) & 0xFFFFFFFF
    assert word & 0xF == 0b1101
    assert (word >> 28) & 0xF == 0b1000
    assert values[0, :2].tolist() == [1.0, 2.0] and values[0, 14:16].tolist() == [0.0, 3.0]
    for g in range(1, 7):  # empty groups: positions 0 and 1, zero values
        assert (word >> (4 * g)) & 0xF == 0b0100


def test_nm24_pack_rejects():
    with pytest.raises(ValueError, match="% 32"):
        reference.nm24_pack(nm_weight(4, 48))
    w = nm_weight(4, 64)
    w[1, 4:7] = 1.0
    with pytest.raises(ValueError, match="not 2:4"):
        reference.nm24_pack(w)


@pytest.mark.parametrize("sparsity", [0.7, 0.9, 0.95])
@pytest.mark.parametrize("rows,slice_rows", [(70, 32), (33, 16), (8, 8)])
def test_sell_pack_round_trip(sparsity, rows, slice_rows):
    cols = 200
    w = sparse_weight(rows, cols, sparsity, seed=rows)
    values, col16, slice_ptr = reference.sell_pack(w, slice_rows, slot_block=8)
    n_slices = -(-rows // slice_rows)
    assert slice_ptr.shape == (n_slices + 1,) and slice_ptr.dtype == torch.int64 and col16.dtype == torch.int16
    sizes = (slice_ptr[1:] - slice_ptr[:-1]).tolist()
    assert all(s % (slice_rows * 8) == 0 for s in sizes)  # whole slot blocks of whole slices
    assert torch.equal(reference.sell_unpack(values, col16, slice_ptr, rows, cols, slice_rows), w)
    # each slice is as wide as its longest row (rounded up to the slot block)
    counts = (w != 0).sum(1)
    for s in range(n_slices):
        longest = int(counts[s * slice_rows:(s + 1) * slice_rows].max())
        assert sizes[s] // slice_rows == -(-longest // 8) * 8


def test_sell_slot_major_layout_and_wide_columns():
    """Value of row r, slot j at slice_ptr[s] + j*S + r; columns >= 32768 read back via & 0xFFFF."""
    w = torch.zeros(3, 40000)
    w[0, 5], w[0, 39999] = 1.0, 2.0
    w[2, 33000] = 3.0
    values, col16, slice_ptr = reference.sell_pack(w, slice_rows=4, slot_block=2)
    assert slice_ptr.tolist() == [0, 8]
    assert values.tolist() == [1.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0, 0.0]
    assert (col16.to(torch.int64) & 0xFFFF).tolist() == [5, 0, 33000, 0, 39999, 0, 0, 0]
    assert torch.equal(reference.sell_unpack(values, col16, slice_ptr, 3, 40000, 4), w)
    with pytest.raises(ValueError, match="65536"):
        reference.sell_pack(torch.zeros(2, 70000))


# ------------------------------------------------------------------------------------- reference products

@pytest.mark.parametrize("bias", [False, True])
def test_reference_linears_match_dense_float64(bias):
    gen = torch.Generator().manual_seed(1)
    w24 = nm_weight(24, 96, seed=3, dtype=torch.float64)
    wsp = sparse_weight(24, 96, 0.9, seed=4, dtype=torch.float64)
    b = torch.randn(24, generator=gen, dtype=torch.float64) if bias else None
    x = torch.randn(2, 5, 96, generator=gen, dtype=torch.float64)
    values, meta = reference.nm24_pack(w24)
    got = reference.nm24_linear(x, values, meta, 96, b)
    assert got.shape == (2, 5, 24) and rel_err(got, F.linear(x, w24, b)) < 1e-14
    values, col16, slice_ptr = reference.sell_pack(wsp, 16)
    got = reference.sell_linear(x, values, col16, slice_ptr, 24, 96, 16, b)
    assert rel_err(got, F.linear(x, wsp, b)) < 1e-14
    # half inputs: fp32 accumulation, result in the input dtype
    got = reference.nm24_linear(x.half(), values_h := reference.nm24_pack(w24.half())[0],
                                reference.nm24_pack(w24.half())[1], 96, None if b is None else b.half())
    assert got.dtype == torch.float16 and values_h.dtype == torch.float16
    want = F.linear(x.half().double(), w24.half().double(), None if b is None else b.half().double())
    assert rel_err(got, want) < 2e-3


# ------------------------------------------------------------------------------------- Triton kernels

# Without Triton (it publishes Linux wheels only) the kernel tests skip, one by one; the packing,
# reference-product and export tests above and below still run (a module-level importorskip here
# skipped the whole file, the only CPU coverage of the nm24/sell layouts included).
try:
    import triton
    import triton.language as tl
except ImportError as exc:
    triton = tl = sparse_matmul = None
    NO_TRITON = f"Triton unavailable: {exc}"
else:  # with Triton installed, a backend that fails to import is an error, never a skip
    import sparsellm._triton_backend  # noqa: F401  (registers the kernels with ops)
    from sparsellm.kernels import sparse_matmul
    NO_TRITON = None
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=str(NO_TRITON))

KERNEL_DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # vs float64, output rounding included


def _inputs(tokens, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, k, generator=gen).to(dtype).to(DEV)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16, 33])
def test_nm24_kernel_matches_reference(tokens, dtype):
    n, k = 40, 128  # 40: not a multiple of any row block
    w = nm_weight(n, k, keep=2, seed=tokens, dtype=dtype)
    values, meta = (t.to(DEV) for t in reference.nm24_pack(w))
    bias = torch.randn(n).to(dtype).to(DEV)
    x = _inputs(tokens, k, dtype, seed=tokens + 1)
    want = reference.nm24_linear(x.double().cpu(), values.double().cpu(), meta.cpu(), k, bias.double().cpu())
    for split in (None, 3, None):  # 3: the fp32 atomic split-K path; None again: the cached config
        got = sparse_matmul.nm24_linear(x, values, meta, k, bias, split_k=split)
        assert got.shape == (tokens, n) and got.dtype == dtype
        assert rel_err(got, want) < TOL[dtype], split
    got = sparse_matmul.nm24_linear(x.reshape(1, tokens, k), values, meta, k)  # no bias, 3-D input
    assert got.shape == (1, tokens, n)
    assert rel_err(got[0], want - bias.double().cpu()) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("keep", [1, 2])  # 1: groups padded with a zero value (3:4 and sparser)
@pytest.mark.parametrize("x_mode", sparse_matmul.NM24_X_MODES if sparse_matmul else [None])
def test_nm24_one_token_x_modes_match_reference(x_mode, keep):
    """The one-token kernel's ways to meet x (``NM24_X_MODES``: gather, register pick, the pick
    with pipelined loads, the pick by byte permute), each forced through ``config``, with and
    without the eviction hints, the atomic split-K path and a third tile in flight (AHEAD 2, the
    hand-prefetched modes: K = 256 is four 64-input tiles, so the prefetch runs past the end
    too). float32, except the permute, which reads 16-bit words (float16 here)."""
    n, k = 40, 256
    dtype = torch.float16 if x_mode in sparse_matmul.NM24_WORD_X_MODES else torch.float32
    w = nm_weight(n, k, keep=keep, seed=7 + keep, dtype=dtype)
    values, meta = (t.to(DEV) for t in reference.nm24_pack(w))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(keep)).to(dtype).to(DEV)
    x = _inputs(1, k, dtype, seed=11)
    want = reference.nm24_linear(x.double().cpu(), values.double().cpu(), meta.cpu(), k, bias.double().cpu())
    assert want.abs().max() > 1  # never compared on zeros
    for split, stream, ahead in ((None, 0, 1), (3, 1, 1), (None, 1, 2), (3, 0, 2)):
        config = {"BLOCK_N": 16, "BLOCK_K": 64, "X_MODE": x_mode, "STREAM": stream, "AHEAD": ahead, "num_warps": 1}
        got = sparse_matmul.nm24_linear(x, values, meta, k, bias, split_k=split, config=config)
        assert got.shape == (1, n) and rel_err(got, want) < TOL[dtype], (split, ahead)


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX ``prmt.b32`` in its default mode (the spec the kernel's permute relies on): bytes
    0-3 of a and 4-7 of b; byte i of the result is the byte numbered by bits 4i..4i+2 of the
    selector, or that byte's sign replicated when bit 4i+3 is set."""
    pool = (a & 0xFFFFFFFF) | (b & 0xFFFFFFFF) << 32
    out = 0
    for i in range(4):
        nib = selector >> (4 * i) & 15
        byte = pool >> (8 * (nib & 7)) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if nib & 8 else byte) << (8 * i)
    return out


if triton is not None:
    @triton.jit
    def _selector_kernel(code_ptr, out_ptr):
        i = tl.arange(0, 16)
        tl.store(out_ptr + i, sparse_matmul.permute_selector(tl.load(code_ptr + i)))


@needs_triton
def test_permute_selector_picks_both_inputs_of_every_code():
    """The selector the permute pick computes from a group's code, run through the spec of
    prmt: for every pair of positions p0 < p1 (and every other code a pad could hold) the
    result's low half is input p0 and its high half input p1."""
    codes = torch.arange(16, dtype=torch.int32).to(DEV)
    sel = torch.empty_like(codes)
    _selector_kernel[(1,)](codes, sel)
    halves = [0x1234, 0xABCD, 0x8765, 0x0F0F]  # x0..x3, distinct, two with the sign bit set
    xlo, xhi = halves[0] | halves[1] << 16, halves[2] | halves[3] << 16
    for code, selector in zip(codes.tolist(), sel.tolist()):
        p0, p1 = code & 3, code >> 2
        got = _prmt(xlo, xhi, selector)
        assert (got & 0xFFFF, got >> 16) == (halves[p0], halves[p1]), (code, hex(selector))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nm24_permute_pick_dtypes_token_blocks_and_views(dtype):
    """The permute pick (``X_MODE`` 4) in both 16-bit dtypes, with and without pipelined loads,
    at 1, 3 and 11 tokens (blocks of 1, 4 and 8 tokens, the last two blocks with pad rows), with
    the atomic K split and a bias, on an x view that starts at an odd element (read as 32-bit
    words, so copied); refused for float32."""
    n, k = 24, 192
    w = nm_weight(n, k, keep=2, seed=3, dtype=dtype)
    values, meta = (t.to(DEV) for t in reference.nm24_pack(w))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEV)
    for tokens in (1, 3, 11):
        x_wide = _inputs(tokens, k + 1, dtype, seed=4 + tokens)
        x = x_wide[:, 1:]  # data pointer 2 bytes past an allocation's start
        assert x.data_ptr() % 4
        want = reference.nm24_linear(x.double().cpu(), values.double().cpu(), meta.cpu(), k, bias.double().cpu())
        for stages, split in ((1, None), (3, 2)):
            config = {"BLOCK_N": 8, "BLOCK_K": 64, "X_MODE": 4, "STREAM": 1, "STAGES": stages, "num_warps": 1}
            got = sparse_matmul.nm24_linear(x, values, meta, k, bias, split_k=split, config=config)
            assert got.shape == (tokens, n) and got.dtype == dtype
            assert rel_err(got, want) < TOL[dtype], (tokens, stages, split)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        sparse_matmul.nm24_linear(x.float(), values.float(), meta, k, config=config)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16, 33])
def test_sell_kernel_matches_reference(tokens, dtype):
    n, k, s = 45, 160, 16
    w = sparse_weight(n, k, 0.9, seed=tokens, dtype=dtype)
    values, col16, slice_ptr = (t.to(DEV) for t in reference.sell_pack(w, s, slot_block=4))
    bias = torch.randn(n).to(dtype).to(DEV)
    x = _inputs(tokens, k, dtype, seed=tokens + 2)
    want = reference.sell_linear(x.double().cpu(), values.double().cpu(), col16.cpu(), slice_ptr.cpu(), n, k, s,
                                 bias.double().cpu())
    for split in (None, 1, 3, 3):  # 1: direct store; 3: the fp32 atomic split path (again: cached config)
        got = sparse_matmul.sell_linear(x, values, col16, slice_ptr, n, k, s, bias, split=split)
        assert got.shape == (tokens, n) and got.dtype == dtype
        assert rel_err(got, want) < TOL[dtype], split
    got = sparse_matmul.sell_linear(x, values, col16, slice_ptr, n, k, s, bias, config={"BLOCK_J": 8, "STREAM": 1})
    assert rel_err(got, want) < TOL[dtype]  # the eviction hints


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_sell_one_token_modes_match_reference(dtype):
    """The one-token sell configs: x gathered from global memory or from shared memory
    (``X_SHARED``, through ``tl.gather``; K = 200 is not a power of two, so the staged input is
    padded), the next slot block prefetched by hand or the loads pipelined (``STAGES``), each
    with and without the atomic split."""
    n, k, s = 37, 200, 8
    w = sparse_weight(n, k, 0.85, seed=5, dtype=dtype)
    values, col16, slice_ptr = (t.to(DEV) for t in reference.sell_pack(w, s, slot_block=4))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(6)).to(dtype).to(DEV)
    x = _inputs(1, k, dtype, seed=9)
    want = reference.sell_linear(x.double().cpu(), values.double().cpu(), col16.cpu(), slice_ptr.cpu(), n, k, s,
                                 bias.double().cpu())
    assert want.abs().max() > 1  # never compared on zeros
    for x_shared, stages, split in itertools.product((0, 1), (1, 3), (1, 2)):
        config = {"BLOCK_J": 4, "STREAM": 1, "X_SHARED": x_shared, "STAGES": stages, "num_warps": 1}
        got = sparse_matmul.sell_linear(x, values, col16, slice_ptr, n, k, s, bias, split=split, config=config)
        assert got.shape == (1, n) and rel_err(got, want) < TOL[dtype], (x_shared, stages, split)
    with pytest.raises(ValueError, match="one-token"):
        sparse_matmul.sell_linear(x.expand(2, k), values, col16, slice_ptr, n, k, s, config={"BLOCK_J": 4, "X_SHARED": 1})


@needs_triton
def test_kernels_decline_and_check():
    w = nm_weight(8, 64)
    values, meta = (t.to(DEV) for t in reference.nm24_pack(w))
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ops.Decline, match="float64"):
        sparse_matmul.nm24_linear(x.double(), values.double(), meta, 64)
    with pytest.raises(ops.Decline, match="weight dtype"):
        sparse_matmul.nm24_linear(x.half(), values, meta, 64)
    with pytest.raises(ops.Decline, match="% 32"):
        sparse_matmul.nm24_linear(x[:, :48], values[:, :24], meta[:, :1], 48)
    sv, sc, sp = (t.to(DEV) for t in reference.sell_pack(sparse_weight(8, 64, 0.9), 8))
    with pytest.raises(ops.Decline, match="power of two"):
        sparse_matmul.sell_linear(x, sv, sc, sp, 8, 64, 6)
    with pytest.raises(ops.Decline, match="index dtypes"):
        sparse_matmul.sell_linear(x, sv, sc.to(torch.int32), sp, 8, 64, 8)


@needs_triton
def test_kernels_refuse_operands_that_do_not_fit_the_weight():
    """x's features and the bias's length are checked against the weight, as F.linear checks
    them: the kernels index both by the weight's sizes (a wrong x was reshaped into other
    tokens, a short bias read past its end, silently)."""
    w, ws = nm_weight(8, 64, seed=7), sparse_weight(8, 64, 0.9, seed=7)
    values, meta = (t.to(DEV) for t in reference.nm24_pack(w))
    sv, sc, sp = (t.to(DEV) for t in reference.sell_pack(ws, 8))
    x = torch.randn(3, 64, device=DEV)
    calls = {"nm24": lambda x, b=None: sparse_matmul.nm24_linear(x, values, meta, 64, b),
             "sell": lambda x, b=None: sparse_matmul.sell_linear(x, sv, sc, sp, 8, 64, 8, b)}
    for call in calls.values():
        for bad in (x[:, :32], torch.randn(2, 128, device=DEV), torch.randn(128, device=DEV)):
            with pytest.raises(ValueError, match="input features"):
                call(bad)
        with pytest.raises(ValueError, match="bias"):
            call(x, torch.randn(5, device=DEV))
        with pytest.raises(ValueError, match="bias"):
            call(x, torch.randn(16, device=DEV))
        b = torch.randn(8, device=DEV)
        assert rel_err(call(x, b), F.linear(x.double(), w.double() if call is calls["nm24"] else ws.double(),
                                            b.double())) < 1e-5
    with pytest.raises(ValueError, match="flat array"):
        sparse_matmul.sell_linear(x, sv, sc[:-1], sp, 8, 64, 8)
    if sp.device.type == "cpu":  # checked only where slice_ptr costs no device read
        with pytest.raises(ValueError, match="slice_ptr ends at"):  # the kernel would read past values
            sparse_matmul.sell_linear(x, sv[:-8], sc[:-8], sp, 8, 64, 8)


@needs_triton
def test_kernels_take_an_empty_batch_and_a_linear_without_outputs():
    """No tokens (an empty batch), or no output rows, give an empty result as F.linear does:
    the launchers' choice of a split divided by the number of programs, 0 there
    (ZeroDivisionError before the launch that ``if t and n`` skips); through SparseGPULinear
    too, where no tokens is under any crossover."""
    for n, tokens in ((8, 0), (0, 1), (0, 0)):
        w = nm_weight(n, 64, seed=3)
        values, meta = (t.to(DEV) for t in reference.nm24_pack(w))
        sv, sc, sp = (t.to(DEV) for t in reference.sell_pack(sparse_weight(n, 64, 0.9, seed=3, uneven=False), 8))
        x = torch.randn(2, tokens, 64, device=DEV)
        bias = torch.randn(n, device=DEV)
        for got in (sparse_matmul.nm24_linear(x, values, meta, 64, bias),
                    sparse_matmul.sell_linear(x, sv, sc, sp, n, 64, 8, bias)):
            assert got.shape == (2, tokens, n) and got.dtype == x.dtype
            if got.numel():
                assert torch.equal(got, F.linear(x, torch.zeros(n, 64, device=DEV), bias))
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight.copy_(nm_weight(8, 64, seed=4))
    with ops.backend_scope("triton"):
        assert SparseGPULinear(lin.to(DEV))(torch.randn(0, 64, device=DEV)).shape == (0, 8)


@needs_triton
def test_ops_dispatch_falls_back_for_float64():
    """float64 is declined by the kernels and computed by the reference (forced triton)."""
    w = nm_weight(8, 64, dtype=torch.float64)
    values, meta = (t.to(DEV) for t in reference.nm24_pack(w))
    x = torch.randn(3, 64, dtype=torch.float64, device=DEV)
    ops.reset_usage()
    with ops.backend_scope("triton"):
        got = ops.nm24_linear(x, values, meta, 64)
        ops.nm24_linear(x.float(), values.float(), meta, 64)
    assert ops.usage()["nm24_linear"] == {"reference": 1, "triton": 1}
    assert rel_err(got, F.linear(x, w.to(DEV))) < 1e-14


@needs_triton
def test_ops_never_load_the_cuda_extension_for_the_decode_products(monkeypatch):
    """Only Triton implements them: on CUDA tensors the extension (compiled on first use where
    a toolkit exists) must not be loaded on their account."""
    asked = []
    real = ops.available
    monkeypatch.setattr(ops, "available", lambda name, device=None: asked.append(name) or real(name, device))
    names = [name for name, _ in ops._candidates("sell_linear", torch.device("cuda"))]
    assert names == ["triton", "reference"] and "cuda" not in asked


# ------------------------------------------------------------------------------------- SparseGPULinear

def _linear_with(weight, bias=True):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


@pytest.mark.parametrize("fmt", ["nm24", "sell"])
def test_sparse_gpu_linear_dispatch(fmt):
    w = nm_weight(48, 64, seed=5) if fmt == "nm24" else sparse_weight(48, 64, 0.9, seed=5, uneven=False)
    lin = _linear_with(w)
    mod = SparseGPULinear(lin, max_sparse_tokens=4)
    assert mod.format == fmt and mod.max_sparse_tokens == 4 and mod.weight.shape == (48, 64)
    assert mod.packed_bytes() < mod.dense_bytes()
    ops.reset_usage()
    for shape in ((1, 64), (2, 2, 64), (5, 64), (2, 3, 64)):  # 1, 4 tokens: sparse; 5, 6: dense
        x = torch.randn(*shape)
        want = F.linear(x.double(), w.double(), lin.bias.double())
        got = mod(x)
        assert got.shape == (*shape[:-1], 48)
        assert rel_err(got, want) < 1e-5
    assert sum(ops.usage()[f"{fmt}_linear"].values()) == 2
    assert SparseGPULinear(lin).max_sparse_tokens == sparse_gpu.MAX_SPARSE_TOKENS[fmt]


@pytest.mark.parametrize("fmt", ["nm24", "sell"])
def test_a_changed_weight_is_repacked_before_a_sparse_call(fmt, monkeypatch):
    """The module computes with its dense weight: changed in place, or loaded alone from a state
    dict, it is repacked before the next call at or below the crossover (the packed copy was
    stale: one token multiplied the old weight, more tokens the new one); moved or cast, it is
    not (the packed buffers were converted with it); one that no longer fits nm24 is refused."""
    w = nm_weight(48, 64, seed=8) if fmt == "nm24" else sparse_weight(48, 64, 0.9, seed=8, uneven=False)
    mod = SparseGPULinear(_linear_with(w), fmt, max_sparse_tokens=2)
    x = torch.randn(1, 64)
    with torch.no_grad():
        mod.weight.mul_(2)
    assert rel_err(mod(x), F.linear(x.double(), 2 * w.double(), mod.bias.double())) < 1e-5
    w3 = nm_weight(48, 64, seed=9) if fmt == "nm24" else sparse_weight(48, 64, 0.8, seed=9, uneven=False)
    mod.load_state_dict({"weight": w3, "bias": mod.bias.detach()}, strict=False)
    for shape in ((1, 64), (2, 64), (3, 64)):  # sparse, sparse, dense: the same weight
        x = torch.randn(*shape)
        assert rel_err(mod(x), F.linear(x.double(), w3.double(), mod.bias.double())) < 1e-5
    assert mod.sparsity == pytest.approx(float((w3 == 0).double().mean()))
    packs = []
    real = reference.nm24_pack if fmt == "nm24" else reference.sell_pack
    monkeypatch.setattr(reference, real.__name__, lambda *a, **k: packs.append(1) or real(*a, **k))
    half = copy.deepcopy(mod).to(torch.float64)  # converted with its buffers: nothing to repack
    x = torch.randn(1, 64, dtype=torch.float64)
    assert rel_err(half(x), F.linear(x, w3.double(), mod.bias.double())) < 1e-12 and not packs
    if fmt == "nm24":
        with torch.no_grad():
            mod.weight.fill_(1.0)
        with pytest.raises(ValueError, match="no longer fits nm24"):
            mod(x.float())


@pytest.mark.parametrize("fmt", ["nm24", "sell"])
def test_a_linear_made_under_inference_mode_exports_and_runs(fmt):
    """Weights made under torch.inference_mode track no version counter (reading it raises): the
    module built from them packs and runs, inside inference mode and out."""
    w = nm_weight(48, 64, seed=10) if fmt == "nm24" else sparse_weight(48, 64, 0.9, seed=10, uneven=False)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        mod = SparseGPULinear(_linear_with(w.clone()), fmt)
        assert mod.weight.is_inference()
        inside = mod(x)
    assert rel_err(inside, F.linear(x.double(), w.double(), mod.bias.double())) < 1e-5
    assert torch.equal(mod(x), inside)


def test_choose_format_reasons():
    assert sparse_gpu.choose_format(_linear_with(nm_weight(8, 64, keep=1)))[0] == "nm24"  # 3:4
    fmt, why, _ = sparse_gpu.choose_format(_linear_with(nm_weight(8, 48)))  # 2:4, K % 32 != 0, 50%-ish sparse
    assert fmt is None and "% 32" in why and "sparsity" in why
    fmt, why, _ = sparse_gpu.choose_format(_linear_with(nm_weight(8, 48, keep=1)))  # 3:4 but K=48: sell at ~80%
    assert fmt == "sell" and "% 32" in why
    fmt, why, _ = sparse_gpu.choose_format(_linear_with(sparse_weight(8, 64, 0.5)))
    assert fmt is None and "< 0.7" in why
    assert sparse_gpu.choose_format(nn.Conv1d(2, 2, 1))[0] is None
    with pytest.raises(ValueError, match="not convertible"):
        SparseGPULinear(_linear_with(sparse_weight(8, 64, 0.3)))


# ------------------------------------------------------------------------------------- to_sparse_gpu

transformers = pytest.importorskip("transformers")


def tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_to_sparse_gpu_report_and_outputs():
    model = tiny_llama()
    with torch.no_grad():
        layers = model.model.layers
        for name, lin in model.named_modules():
            if isinstance(lin, nn.Linear) and ".layers." in name:
                w = lin.weight
                if ".layers.0." in name:  # 2:4
                    lin.weight.copy_(nm_weight(*w.shape, seed=len(name), empty_groups=False))
                else:                     # 90% unstructured
                    lin.weight.copy_(sparse_weight(*w.shape, 0.9, seed=len(name)))
        layers[1].mlp.down_proj.weight.normal_()  # dense: stays
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        want_prefill = model(ids).logits
        want_decode = model(ids[:, :1]).logits
    report = to_sparse_gpu(model, max_sparse_tokens={"sell": 2})
    json.dumps(report)
    assert report["kind"] == "sparse-gpu" and report["n_converted"] == 13 and report["n_dense"] == 1
    assert report["formats"] == {"nm24": 7, "sell": 6}
    assert "< 0.7" in report["dense"]["model.layers.1.mlp.down_proj"]
    entry = report["converted"]["model.layers.0.self_attn.q_proj"]
    assert entry["format"] == "nm24" and entry["bytes_ratio"] == pytest.approx((0.5 * 4 + 4 / 32 / 4 * 4) / 4)
    assert report["converted"]["model.layers.1.mlp.up_proj"]["max_sparse_tokens"] == 2
    assert report["max_sparse_tokens"] == {"nm24": sparse_gpu.NM24_MAX_TOKENS, "sell": 2}
    if DEV == "cpu":
        assert report["available"] is False and "need a CUDA GPU" in report["note"]
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseGPULinear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, SparseGPULinear)
    with torch.no_grad():
        assert rel_err(model(ids).logits, want_prefill) < 1e-5      # 16 tokens: dense above the crossovers
        assert rel_err(model(ids[:, :1]).logits, want_decode) < 1e-5  # 2 tokens: sparse products
    with pytest.raises(ExportError, match="before apply_export"):  # save the dense-masked model instead
        save_pruned(model, None, "/nonexistent/never-written", sparsity_structure="unstructured")
    with pytest.raises(ExportError, match="unknown formats"):
        to_sparse_gpu(tiny_llama(), max_sparse_tokens={"coo": 3})


def test_a_bad_slice_height_is_refused_before_any_linear_is_replaced():
    """slice_rows is read only by sell linears: it was checked at the first one, after the 2:4
    linears before it had been replaced (a half-converted model), and never on a 2:4 model."""
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].a = _linear_with(nm_weight(16, 64))
    model.layers[0].b = _linear_with(sparse_weight(16, 64, 0.9))
    for rows in (6, 1, 0):
        with pytest.raises(ExportError, match="power of two"):
            to_sparse_gpu(model, slice_rows=rows)
        assert all(type(m) is nn.Linear for m in model.layers[0].children())


def test_apply_export_and_settings_accept_sparse_gpu():
    from sparsellm import config
    from sparsellm.cli import build_parser, config_from_args

    assert "sparse-gpu" in config.EXPORT_KINDS
    model = tiny_llama()
    report = apply_export(model, "sparse-gpu")  # random dense weights: nothing converts, all explained
    assert report["kind"] == "sparse-gpu" and report["n_converted"] == 0 and report["n_dense"] == 14
    assert report["available"] is False
    args = build_parser().parse_args(["--export", "sparse-gpu"])
    assert args.export == "sparse-gpu"
    assert config_from_args(args).export == "sparse-gpu"
    assert config.PruneConfig(export="sparse-gpu").export == "sparse-gpu"
    with pytest.raises(ValueError, match="unknown export"):
        config.PruneConfig(export="sparse-cpu")


# ------------------------------------------------------------------------------------- the config table

def _spy_launches(monkeypatch):
    """Record each sparse kernel launch's (key, forced config) and launch it."""
    seen = []
    real = sparse_matmul._launch

    def spy(tuner, grid, key, *args, config=None, **kwargs):
        seen.append((key, None if config is None else dict(config)))
        return real(tuner, grid, key, *args, config=config, **kwargs)

    monkeypatch.setattr(sparse_matmul, "_launch", spy)
    return seen


@needs_triton
def test_the_launchers_run_the_config_tables_entry(monkeypatch):
    """A call the active table has an entry for launches that config, with its split (nm24:
    one token at this shape in float32; three tokens in float16 on the permute pick, through
    bfloat16's fallback too; sell at its slice height), correct against the reference; calls
    without an entry (another shape, another slice height, a forced config) do not use it."""
    from sparsellm.kernels import sparse_configs

    n, k = 40, 128
    one = {"BLOCK_N": 4, "BLOCK_K": 64, "X_MODE": 3, "STREAM": 1, "STAGES": 2, "num_warps": 1}
    pick = {"BLOCK_N": 4, "BLOCK_K": 64, "X_MODE": 4, "STREAM": 1, "STAGES": 3, "num_warps": 1}
    slab = {"S": 8, "BLOCK_J": 16, "STREAM": 1, "num_warps": 1}
    table = {"version": 1, "entries": [
        {"format": "nm24", "dtype": "float32", "tokens": [1, 1], "shape": [k, n], "config": {**one, "split_k": 2}},
        {"format": "nm24", "dtype": "float16", "tokens": [2, 4], "shape": None, "config": pick},
        {"format": "sell", "dtype": "float32", "tokens": [1, 1], "shape": None, "config": {**slab, "split": 3}},
    ]}
    seen = _spy_launches(monkeypatch)
    with sparse_configs.use(table):
        for dtype, tokens, want_config, split in ((torch.float32, 1, one, 2), (torch.float16, 3, pick, 1),
                                                  (torch.bfloat16, 3, pick, 1)):
            w = nm_weight(n, k, seed=tokens, dtype=dtype)
            values, meta = (t.to(DEV) for t in reference.nm24_pack(w))
            x = _inputs(tokens, k, dtype, seed=7)
            want = F.linear(x.double().cpu(), w.double())
            got = sparse_matmul.nm24_linear(x, values, meta, k)
            assert seen[-1][1] == want_config and seen[-1][0][4] == split  # key: (n, k, t, dtype, split, bias)
            assert rel_err(got, want) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype])
        sparse_matmul.nm24_linear(_inputs(1, 64, torch.float32, 1), *(t.to(DEV) for t in reference.nm24_pack(
            nm_weight(n, 64, seed=1))), 64)  # another shape: no entry
        assert seen[-1][1] is None
        sparse_matmul.nm24_linear(x, values, meta, k, config={**one, "BLOCK_N": 8})  # forced wins
        assert seen[-1][1]["BLOCK_N"] == 8
        w = sparse_weight(n, k, 0.9, seed=3)
        x = _inputs(1, k, torch.float32, seed=4)
        for rows, want_config, split in ((8, {"BLOCK_J": 16, "STREAM": 1, "num_warps": 1}, 3), (16, None, None)):
            v, c, ptr = (t.to(DEV) for t in reference.sell_pack(w, rows, 16))
            got = sparse_matmul.sell_linear(x, v, c, ptr, n, k, rows)
            assert seen[-1][1] == want_config and (split is None or seen[-1][0][5] == split)  # (n, k, s, t, dtype, split, bias)
            assert rel_err(got, F.linear(x.double().cpu(), w.double())) < 1e-5
    # a table's X_SHARED config stages x in shared memory only up to SELL_X_SHARED_MAX_BYTES
    staged = {"version": 1, "entries": [{"format": "sell", "dtype": "float32", "tokens": [1, 1], "shape": None,
                                         "config": {**slab, "X_SHARED": 1}}]}
    v, c, ptr = (t.to(DEV) for t in reference.sell_pack(w, 8, 16))
    with sparse_configs.use(staged):
        sparse_matmul.sell_linear(x, v, c, ptr, n, k, 8)
        assert seen[-1][1]["X_SHARED"] == 1
        monkeypatch.setattr(sparse_matmul, "SELL_X_SHARED_MAX_BYTES", k * 4 - 1)
        got = sparse_matmul.sell_linear(x, v, c, ptr, n, k, 8)
        assert seen[-1][1]["X_SHARED"] == 0
    assert rel_err(got, F.linear(x.double().cpu(), w.double())) < 1e-5


def test_a_cast_takes_the_crossovers_of_the_new_dtype():
    """The table's crossovers are per dtype: a module exported in float32 and cast to float16
    (or back) takes the new dtype's, where they came from the table; a given one stays."""
    from sparsellm.kernels import sparse_configs

    table = {"version": 1, "entries": [], "crossovers": [
        {"format": "nm24", "dtype": "float32", "shape": None, "max_sparse_tokens": 3},
        {"format": "nm24", "dtype": "float16", "shape": None, "max_sparse_tokens": 0},
    ]}
    lin = _linear_with(nm_weight(48, 64, seed=6))
    with sparse_configs.use(table):
        mod = SparseGPULinear(lin)
        given = SparseGPULinear(lin, max_sparse_tokens=2)
        assert (mod.max_sparse_tokens, mod.crossover_from) == (3, "table")
        mod.half()
        given.half()
        assert (mod.max_sparse_tokens, mod.crossover_from) == (0, "table")
        assert (given.max_sparse_tokens, given.crossover_from) == (2, "argument")
        mod.float()
        assert mod.max_sparse_tokens == 3


def test_the_export_takes_its_crossovers_from_the_config_table(tmp_path, monkeypatch):
    """Each linear's crossover: the caller's, else its shape's measured one, else the format's
    any-shape one, else the constant; the report names the table; a malformed table is refused
    before any linear is replaced."""
    from sparsellm.kernels import sparse_configs

    table = {"version": 1, "source": {"commit": "abc"}, "entries": [], "crossovers": [
        {"format": "nm24", "dtype": "float32", "shape": None, "max_sparse_tokens": 3},
        {"format": "nm24", "dtype": "float32", "shape": [64, 128], "max_sparse_tokens": 5},
    ]}
    lin = _linear_with(nm_weight(48, 64, seed=5))
    with sparse_configs.use(table):
        mod = SparseGPULinear(lin)
        assert (mod.max_sparse_tokens, mod.crossover_from) == (3, "table") and "(table)" in repr(mod)
        assert (SparseGPULinear(lin, max_sparse_tokens=2).crossover_from) == "argument"
        sell = SparseGPULinear(_linear_with(sparse_weight(48, 64, 0.9, seed=5)))
        assert (sell.max_sparse_tokens, sell.crossover_from) == (sparse_gpu.SELL_MAX_TOKENS, "default")
        model = tiny_llama()
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, nn.Linear) and ".layers." in name:
                    m.weight.copy_(nm_weight(*m.weight.shape, seed=len(name)))
        report = to_sparse_gpu(model, max_sparse_tokens={"sell": 2})
        up = report["converted"]["model.layers.0.mlp.up_proj"]     # 64 -> 128: its own
        q = report["converted"]["model.layers.0.self_attn.q_proj"]  # 64 -> 64: the any-shape one
        assert (up["max_sparse_tokens"], up["crossover_from"]) == (5, "table")
        assert (q["max_sparse_tokens"], q["crossover_from"]) == (3, "table")
        assert report["kernel_configs"]["source"] == {"commit": "abc"}
        assert model.model.layers[0].mlp.up_proj.max_sparse_tokens == 5
    with pytest.raises(ExportError, match=">= 0"):
        to_sparse_gpu(tiny_llama(), max_sparse_tokens=-1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "entries": [{"format": "nm24"}]}))
    monkeypatch.setenv(sparse_configs.ENV, str(bad))
    sparse_configs.refresh()
    model = tiny_llama()
    try:
        with pytest.raises(ExportError, match="bad.json"):
            to_sparse_gpu(model)
    finally:
        monkeypatch.delenv(sparse_configs.ENV)
        sparse_configs.refresh()
    assert not any(isinstance(m, SparseGPULinear) for m in model.modules())


class _FakeSparseLt:
    """Stands in for cuSPARSELt's linear on a CPU: x @ W^T in float64, its token counts recorded."""

    def __init__(self, weight):
        self.weight, self.calls = weight.detach().clone(), []

    def __call__(self, x):
        assert x.dim() == 2 and x.is_contiguous()
        self.calls.append(x.shape[0])
        return (x.double() @ self.weight.double().T).to(x.dtype)


def test_prefill_runs_cusparselt_from_its_crossover(monkeypatch):
    """A 2:4 linear with a prefill crossover (the table's, or the caller's) runs the sparse kernel
    up to max_sparse_tokens, dense F.linear below the crossover and cuSPARSELt from it on (built
    once, rebuilt when the weight changes, bias added); the cuSPARSELt linear lives beside the
    module, so it deep-copies; sell linears and prefill=False have none."""
    from sparsellm.kernels import sparse_configs

    built = []
    monkeypatch.setattr(sparse_gpu.cusparselt, "make_linear", lambda w: built.append(_FakeSparseLt(w)) or built[-1])
    monkeypatch.setattr(SparseGPULinear, "prefill_unavailable", lambda self: None)  # as on a GPU
    w = nm_weight(48, 64, seed=5)
    lin = _linear_with(w)
    table = {"version": 1, "prefill": [
        {"format": "nm24", "path": "cusparselt", "dtype": "float32", "shape": [64, 48], "min_tokens": 8}]}
    with sparse_configs.use(table):
        mod = SparseGPULinear(lin)
        assert SparseGPULinear(_linear_with(nm_weight(48, 32, seed=1))).prefill_min_tokens is None  # another shape
        assert SparseGPULinear(lin, prefill=False).prefill_min_tokens is None
        assert SparseGPULinear(lin, prefill_min_tokens=3).prefill_from == "argument"
        assert SparseGPULinear(_linear_with(sparse_weight(48, 64, 0.9, seed=5))).prefill_min_tokens is None
    assert (mod.prefill_min_tokens, mod.prefill_from) == (8, "table") and "cusparselt_from_tokens=8 (table)" in repr(mod)
    ops.reset_usage()
    for shape in ((1, 64), (5, 64), (8, 64), (3, 4, 64)):  # 1: sparse kernel; 5: dense; 8 and 12: cuSPARSELt
        x = torch.randn(*shape)
        got = mod(x)
        assert got.shape == (*shape[:-1], 48)
        assert rel_err(got, F.linear(x.double(), w.double(), lin.bias.double())) < 1e-5
    assert len(built) == 1 and built[0].calls == [8, 12] and sum(ops.usage()["nm24_linear"].values()) == 1
    twin = copy.deepcopy(mod)  # the cuSPARSELt linear is not among the module's attributes
    with torch.no_grad():
        mod.weight.mul_(2)  # a modified weight gets a new cuSPARSELt copy
    mod(torch.randn(9, 64))
    assert len(built) == 2 and built[1].calls == [9] and torch.equal(built[1].weight, 2 * w)
    twin(torch.randn(8, 64))
    assert len(built) == 3  # the copy builds its own


def test_a_call_cusparselt_refuses_warns_once_and_stays_dense(monkeypatch):
    """cuSPARSELt built, but a call it refuses (e.g. a token count without a plan): dense from
    then on, said once, not an error out of the model's forward."""
    import warnings

    class Refusing(_FakeSparseLt):
        def __call__(self, x):
            super().__call__(x)
            raise RuntimeError("no plan for this token count")

    built = []
    monkeypatch.setattr(sparse_gpu.cusparselt, "make_linear", lambda w: built.append(Refusing(w)) or built[-1])
    monkeypatch.setattr(SparseGPULinear, "prefill_unavailable", lambda self: None)  # as on a GPU
    w = nm_weight(48, 64, seed=7)
    mod = SparseGPULinear(_linear_with(w), prefill_min_tokens=4)
    x = torch.randn(6, 64)
    with pytest.warns(RuntimeWarning, match="cuSPARSELt failed on a 6-token call.*no plan"):
        got = mod(x)
    assert rel_err(got, F.linear(x.double(), w.double(), mod.bias.double())) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = mod(x)
    assert torch.equal(again, got) and built[0].calls == [6]  # not tried again


def test_prefill_that_cannot_run_warns_once_and_stays_dense():
    """On a CPU (or without cuSPARSELt) a prefill call warns once, says why, and runs dense."""
    import warnings

    w = nm_weight(48, 64, seed=6)
    mod = SparseGPULinear(_linear_with(w), prefill_min_tokens=4)
    x = torch.randn(6, 64)
    with pytest.warns(RuntimeWarning, match="weights on cpu"):
        got = mod(x)
    assert "weights on cpu" in mod.prefill_error
    assert rel_err(got, F.linear(x.double(), w.double(), mod.bias.double())) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(x)


def test_the_export_reports_each_linears_prefill():
    from sparsellm.kernels import sparse_configs

    model = tiny_llama()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                m.weight.copy_(nm_weight(*m.weight.shape, seed=len(name)) if ".layers.0." in name
                               else sparse_weight(*m.weight.shape, 0.9, seed=len(name)))
    table = {"version": 1, "prefill": [
        {"format": "nm24", "path": "cusparselt", "dtype": "float32", "shape": None, "min_tokens": 256}]}
    with sparse_configs.use(table):
        report = to_sparse_gpu(copy.deepcopy(model))
        assert report["kernel_configs"]["prefill"] == 1
        off = to_sparse_gpu(copy.deepcopy(model), prefill=False)
        with pytest.raises(ExportError, match="prefill_min_tokens"):
            to_sparse_gpu(copy.deepcopy(model), prefill_min_tokens=0)
    q = report["converted"]["model.layers.0.self_attn.q_proj"]
    assert q["prefill"] == {"path": "cusparselt", "min_tokens": 256, "from": "table",
                            "note": "weights on cpu: cuSPARSELt is built at the first prefill call on a GPU"}
    assert report["converted"]["model.layers.1.self_attn.q_proj"]["prefill"] is None  # sell
    assert all(v["prefill"] is None for v in off["converted"].values())


# ------------------------------------------------------------------------------------- GPU (compiled)

GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out) of LLaMA-2-7B's linears
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_triton
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 7])  # (16..2048 tokens: benchmarks/bench_export.py checks them)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_gpu_kernels_at_7b_shapes(shape, tokens):
    in_f, out_f = shape
    torch.manual_seed(0)
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
    bias = torch.randn(out_f, device="cuda", dtype=torch.float16)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
    groups = w.abs().reshape(out_f, -1, 4)
    drop = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.argsort(-1)[..., :2], True)
    w24 = w.masked_fill(drop.reshape(out_f, in_f), 0)
    values, meta = reference.nm24_pack(w24)
    want = F.linear(x.float(), w24.float(), bias.float())
    assert rel_err(sparse_matmul.nm24_linear(x, values, meta, in_f, bias), want) < 1e-2
    if tokens == 1:  # every way of meeting x, compiled (the autotuner picks among them)
        for x_mode in sparse_matmul.NM24_X_MODES:
            for stream, ahead in ((0, 1), (1, 1), (1, 2)):
                got = sparse_matmul.nm24_linear(x, values, meta, in_f, bias, config={
                    "BLOCK_N": 8, "BLOCK_K": 512, "X_MODE": x_mode, "STREAM": stream, "AHEAD": ahead})
                assert rel_err(got, want) < 1e-2, (x_mode, stream, ahead)
    else:  # the permute pick on a block of 8 tokens (7 real), against the tensor-core default above
        got = sparse_matmul.nm24_linear(x, values, meta, in_f, bias, config={
            "BLOCK_N": 4, "BLOCK_K": 256, "X_MODE": 4, "STREAM": 1, "STAGES": 3})
        assert rel_err(got, want) < 1e-2
    w90 = w.masked_fill(torch.rand_like(w, dtype=torch.float32) < 0.9, 0)
    sv, sc, sp = reference.sell_pack(w90, 32, sparse_gpu.SELL_SLOT_BLOCK)
    want = F.linear(x.float(), w90.float(), bias.float())
    assert rel_err(sparse_matmul.sell_linear(x, sv, sc, sp, out_f, in_f, 32, bias), want) < 1e-2
    if tokens == 1:  # x gathered from shared memory (11008 inputs: a copy padded to 16384), pipelined loads
        for x_shared, stages in itertools.product((0, 1), (1, 3)):
            got = sparse_matmul.sell_linear(x, sv, sc, sp, out_f, in_f, 32, bias, config={
                "BLOCK_J": 64, "STREAM": 1, "X_SHARED": x_shared, "STAGES": stages, "num_warps": 8})
            assert rel_err(got, want) < 1e-2, (x_shared, stages)


@needs_triton
@pytest.mark.gpu
@needs_cuda
def test_gpu_bfloat16_and_ops_pick_triton():
    torch.manual_seed(0)
    w = nm_weight(256, 512, dtype=torch.bfloat16).cuda()
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    lin = _linear_with(w.cpu()).to("cuda", torch.bfloat16)
    mod = SparseGPULinear(lin, max_sparse_tokens=3)  # 3 tokens: the multi-token (tl.dot) path
    ops.reset_usage()
    got = mod(x)
    assert ops.usage()["nm24_linear"] == {"triton": 1}
    assert rel_err(got, F.linear(x.double(), w.double(), lin.bias.double())) < 2e-2
