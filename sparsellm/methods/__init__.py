"""Pruning methods, one module each; :func:`get_method` builds one from the settings."""
from __future__ import annotations

from .base import InputStats, PruningMethod
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[PruningMethod]] = {cls.name: cls for cls in (Magnitude, Wanda, SparseGPT)}

try:  # SparseLLM joins the registry when its module is present
    from .sparsellm import SparseLLM
    METHODS[SparseLLM.name] = SparseLLM
except ImportError:  # pragma: no cover
    pass


def get_method(config) -> PruningMethod:
    try:
        cls = METHODS[config.method]
    except KeyError:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(sorted(METHODS))}") from None
    return cls(config)


__all__ = ["InputStats", "PruningMethod", "METHODS", "get_method"]
