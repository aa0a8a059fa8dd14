"""Model-family adapters: where the decoder, the image tokens and the grid are in each family."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlmfix.adapters.base import Adapter, ImageLayout, VlmfixInputError
from vlmfix.adapters.gemma3 import Gemma3Adapter
from vlmfix.adapters.generic import GenericAdapter
from vlmfix.adapters.idefics3 import Idefics3Adapter
from vlmfix.adapters.internvl import InternVLAdapter
from vlmfix.adapters.llava import LlavaAdapter
from vlmfix.adapters.llava_next import LlavaNextAdapter
from vlmfix.adapters.llava_onevision import LlavaOnevisionAdapter
from vlmfix.adapters.mistral3 import Mistral3Adapter
from vlmfix.adapters.qwen2_vl import Qwen2VLAdapter
from vlmfix.adapters.qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen3VLAdapter,
                                       Mistral3Adapter, Gemma3Adapter, LlavaOnevisionAdapter,
                                       InternVLAdapter, Idefics3Adapter)
#: the model classes that have a family adapter
MODEL_CLASSES: frozenset[str] = frozenset(c for a in ADAPTERS for c in a.model_classes)


def supported_families() -> str:
    return ", ".join(f"{a.family} ({' / '.join(a.model_classes)})" for a in ADAPTERS)


def get_adapter(model: nn.Module, processor: Any | None = None) -> Adapter:
    """The adapter for `model`'s family; for another model whose config names an image token id, the
    generic fallback (with a warning); a VlmfixInputError naming the supported families otherwise."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model, processor)
    if GenericAdapter.applies(model):
        return GenericAdapter(model, processor)
    raise VlmfixInputError(
        f"vlmfix does not support {name}: it has no family adapter and its config names no image token id "
        f"(image_token_id / image_token_index). Supported families: {supported_families()}."
    )


__all__ = ["ADAPTERS", "MODEL_CLASSES", "Adapter", "GenericAdapter", "ImageLayout", "VlmfixInputError", "get_adapter",
           "supported_families"]
