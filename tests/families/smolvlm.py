"""Tiny random SmolVLM: families.idefics3's model and inputs on SmolVLM's classes (the same tiles, global view
and text layout)."""

from __future__ import annotations

import torch
from families.idefics3 import configs, make_batch
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

NAME = "smolvlm"
VIDEO = False  # SmolVLM takes video frames as single-view images in pixel_values
PRUNE_IN_PLACE = True

__all__ = ["NAME", "PRUNE_IN_PLACE", "VIDEO", "make_batch", "make_model"]


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return SmolVLMForConditionalGeneration(SmolVLMConfig(**configs())).eval()
