"""SparseLLM element-wise z-steps (ReLU, SwiGLU) and the SwiGLU s-step, fused.

The reference spends a dozen full-size temporaries per call (and, for the s-step, per Newton
iteration); here each program loads a chunk of tokens x features once, runs the whole
closed form (or all Newton iterations) in fp32 registers, and stores once. The chunk is a
contiguous run of elements of the flattened [tokens, features] tensors, so a huge
calibration set is streamed in pieces and never needs extra memory.

Formulas and the order of the safeguarded Newton steps mirror
:mod:`sparsellm.reference` (see there for the derivations).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsellm import reference
from sparsellm.ops import Decline

from ._common import check_device

# One fixed launch shape, no autotuning: these kernels are element-wise and memory-bound, where
# any reasonable block streams at the same rate, while autotuning keyed on the element count
# compiled and timed 4 configs of each kernel for every new chunk size (about 16 s of a 7B-layer
# SparseLLM prune on an H200, measured in the profile behind issue 12).
BLOCK_ELEMENTS = 1024
NUM_WARPS = 4


@triton.jit
def _relu_z_kernel(p_ptr, m_ptr, out_ptr, numel, alpha, gamma, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < numel
    p = tl.load(p_ptr + off, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + off, mask=ok, other=0.0).to(tl.float32)
    # NaN propagated, as the reference's clamp_min/clamp_max do (the default returns the other
    # operand: a NaN m came out as a finite 0)
    z_pos = tl.maximum((alpha * m + gamma * p) / (alpha + gamma), 0.0, propagate_nan=tl.PropagateNan.ALL)
    z_neg = tl.minimum(m, 0.0, propagate_nan=tl.PropagateNan.ALL)
    f_pos = alpha * (z_pos - m) * (z_pos - m) + gamma * (p - z_pos) * (p - z_pos)
    f_neg = alpha * (z_neg - m) * (z_neg - m) + gamma * p * p
    z = tl.where(f_pos <= f_neg, z_pos, z_neg)
    tl.store(out_ptr + off, z.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_z_kernel(p_ptr, m_ptr, s_ptr, out_ptr, numel, alpha, gamma, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < numel
    p = tl.load(p_ptr + off, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + off, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
    act = s * tl.sigmoid(s)
    z = (alpha * m + gamma * act * p) / (alpha + gamma * act * act)
    tl.store(out_ptr + off, z.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_s_objective(s, g, p, z, alpha, gamma):
    r = p - s * tl.sigmoid(s) * z
    return alpha * (s - g) * (s - g) + gamma * r * r


@triton.jit
def _swiglu_s_kernel(s_ptr, g_ptr, p_ptr, z_ptr, out_ptr, numel, alpha, gamma, iterations, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < numel
    s = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + off, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)
    f = _swiglu_s_objective(s, g, p, z, alpha, gamma)
    for _ in range(iterations):
        sig = tl.sigmoid(s)
        act = s * sig
        d_act = sig * (1 + s * (1 - sig))
        dd_act = sig * (1 - sig) * (2 + s * (1 - 2 * sig))
        resid = p - act * z
        grad = 2 * alpha * (s - g) - 2 * gamma * z * d_act * resid
        curv = 2 * alpha + 2 * gamma * ((z * d_act) * (z * d_act) - z * dd_act * resid)
        step = grad / tl.maximum(curv, 2 * alpha)
        start = s
        # full step, then a half step from the same start: each kept only if it lowers f
        cand = start - step
        f_cand = _swiglu_s_objective(cand, g, p, z, alpha, gamma)
        better = f_cand < f
        s = tl.where(better, cand, s)
        f = tl.where(better, f_cand, f)
        cand = start - 0.5 * step
        f_cand = _swiglu_s_objective(cand, g, p, z, alpha, gamma)
        better = f_cand < f
        s = tl.where(better, cand, s)
        f = tl.where(better, f_cand, f)
    tl.store(out_ptr + off, s.to(out_ptr.dtype.element_ty), mask=ok)


def _flat(*tensors):
    """Broadcast to one shape (as the reference's element-wise ops do) and flatten."""
    check_device(*tensors)
    shaped = torch.broadcast_tensors(*tensors)
    return shaped[0].shape, [t.contiguous().reshape(-1) for t in shaped]


def _launch(kernel, out_dtype, shape, flats, *scalars):
    out = torch.empty(shape, dtype=out_dtype, device=flats[0].device)
    numel = out.numel()
    if numel:
        kernel[(triton.cdiv(numel, BLOCK_ELEMENTS),)](*flats, out, numel, *scalars, BLOCK=BLOCK_ELEMENTS,
                                                     num_warps=NUM_WARPS)
    return out


def _decline_float64(*tensors):
    # the kernels compute in fp32 registers; a float64 caller asked for more than that
    if any(t.dtype == torch.float64 for t in tensors):
        raise Decline("float64")


def relu_z_step(p, m, alpha, gamma):
    _decline_float64(p, m)
    shape, flats = _flat(p, m)
    return _launch(_relu_z_kernel, reference.promoted_dtype((p, m)), shape, flats, float(alpha), float(gamma))


def swiglu_z_step(p, m, s, alpha, gamma):
    _decline_float64(p, m, s)
    shape, flats = _flat(p, m, s)
    return _launch(_swiglu_z_kernel, reference.promoted_dtype((p, m, s)), shape, flats, float(alpha), float(gamma))


def swiglu_s_step(s, g, p, z, alpha, gamma, iterations=5):
    _decline_float64(s, g, p, z)
    shape, flats = _flat(s, g, p, z)
    # the reference's dtype: s is replaced by candidates computed from all four (a float16 s
    # with float32 targets gives float32, not s's float16)
    return _launch(_swiglu_s_kernel, reference.promoted_dtype((s, g, p, z)), shape, flats, float(alpha), float(gamma),
                   int(iterations))
