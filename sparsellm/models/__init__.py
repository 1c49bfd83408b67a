"""Model-family adapters; :func:`get_adapter` picks one by ``config.model_type``."""
from __future__ import annotations

from .base import FFN, AttentionHeads, ModelAdapter
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, OPTAdapter)


class UnsupportedModel(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def get_adapter(model) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            adapter = cls()
            try:
                adapter.check(model)
            except (ValueError, NotImplementedError) as exc:
                raise UnsupportedModel(f"{model_type} model not supported: {exc}") from None
            return adapter
    raise UnsupportedModel(f"no adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}")


__all__ = ["FFN", "AttentionHeads", "ModelAdapter", "get_adapter", "supported_model_types", "UnsupportedModel"]
