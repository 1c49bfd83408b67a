"""The progress bars of the libraries under the package: transformers draws its own (loading,
converting and writing weights), switched process-wide. A quiet run turns them off for its
own duration and gives the caller's setting back after."""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
