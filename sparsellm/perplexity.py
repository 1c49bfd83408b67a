"""Perplexity over non-overlapping windows: PPL = exp(mean next-token NLL).

Each window of ``seqlen`` tokens is scored on its ``seqlen - 1`` shifted positions, so the
windows are independent (no context carried over), as in the SparseGPT and Wanda code.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

_MAX_EXP = math.log(sys.float_info.max)  # the largest x whose exp(x) is a finite float


@contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode inside the block (no dropout: a model built from a config, or one
    being fine-tuned, is in training mode), each submodule's own mode restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None,
               device: torch.device | str | None = None, quiet: bool = False, desc: str = "perplexity") -> float:
    """``tokens``: [1, T] evaluation stream. Uses ``floor(T / seqlen)`` windows from token 0,
    capped at ``max_windows``."""
    if seqlen < 2:  # a window scores its seqlen - 1 next tokens
        raise ValueError(f"an evaluation window needs at least 2 tokens, got {seqlen}")
    if max_windows is not None and max_windows < 1:  # else "too few tokens", or a mean over no window
        raise ValueError(f"max_windows must be at least 1 (None: every window), got {max_windows}")
    tokens = tokens.reshape(1, -1)
    windows = tokens.shape[1] // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total_nll, count = 0.0, 0
    with eval_mode(model):
        for i in tqdm(range(windows), desc=desc, unit="window", disable=quiet, leave=False):
            ids = tokens[:, i * seqlen:(i + 1) * seqlen].to(device)
            logits = model(ids, use_cache=False).logits
            # half-precision logits are scored in float32; a float64 model's stay float64
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total_nll += float(nll)
            count += seqlen - 1
    mean = total_nll / count
    # exp of a mean above ~709.78 overflows a float (math.exp raises): PPL inf, as an inf loss
    # gives (a NaN mean stays NaN)
    return float("inf") if mean > _MAX_EXP else math.exp(mean)
