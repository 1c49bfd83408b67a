"""The two errors of :mod:`sparsellm.export` (both ``ValueError``, so the CLI reports them
with one message and exit code 2)."""
from __future__ import annotations


class ExportError(ValueError):
    """The model or the request cannot be exported as asked."""


class CheckpointError(ValueError):
    """A saved checkpoint is malformed or disagrees with its own config."""
