"""The progress bars of the libraries under the package: transformers draws its own (loading,
converting and writing weights), switched process-wide. A quiet run turns them off for its
own duration and gives the caller's setting back after."""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        with _gguf_bar_off():
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _gguf_bar_off() -> Iterator[None]:
    """transformers' GGUF loader draws its "Converting and de-quantizing" bar with plain
    ``tqdm.auto.tqdm``, which its progress-bar switch does not reach: swap that module's name for
    a disabled bar while quiet, and put the original back after."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without the GGUF loader draws no such bar
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
