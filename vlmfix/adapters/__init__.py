"""Model-family adapters: where the decoder, the image tokens and the grid are in each family."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, ImageLayout, VlmfixInputError
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter)


def supported_families() -> str:
    return ", ".join(f"{a.family} ({' / '.join(a.model_classes)})" for a in ADAPTERS)


def get_adapter(model: nn.Module, processor: Any | None = None) -> Adapter:
    """The adapter for `model`'s family; a VlmfixInputError naming the supported families otherwise."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model, processor)
    raise VlmfixInputError(f"vlmfix does not support {name}. Supported families: {supported_families()}.")


__all__ = ["ADAPTERS", "Adapter", "ImageLayout", "VlmfixInputError", "get_adapter", "supported_families"]
