"""Pruning methods, one module each; :func:`get_method` builds one from the settings.

How a method plugs in: see :mod:`sparsellm.methods.base` (and :mod:`sparsellm.plan`)."""
from __future__ import annotations

from .base import LayerwiseMethod, LocalMethod, PruningMethod
from .elsa import Elsa, MaskedAdam
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .sparsellm import SparseLLM
from .structprune import StructPrune
from .wanda import Wanda

METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (Magnitude, Wanda, SparseGPT, SparseLLM, StructPrune, Elsa, MaskedAdam)}
# the methods that run distributed under torchrun (and take --fsdp)
WHOLE_MODEL_METHODS: list[str] = sorted(name for name, cls in METHODS.items() if cls.whole_model)


def get_method(config) -> PruningMethod:
    try:
        cls = METHODS[config.method]
    except KeyError:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(sorted(METHODS))}") from None
    return cls(config)


__all__ = ["PruningMethod", "LayerwiseMethod", "LocalMethod", "METHODS", "WHOLE_MODEL_METHODS", "get_method"]
