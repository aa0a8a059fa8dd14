"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one square grid of patch tokens per image.

The vision tower sees the image resized (and, in llava-hf's "pad" mode, padded) to a square; each
image becomes (H / patch) x (W / patch) tokens, plus the CLS token first with the "full" feature
strategy.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from vlmfix.core.state import ImageSegment
from vlmfix.adapters.base import Adapter, ImageLayout, VlmfixInputError, encoded_images


class LlavaAdapter(Adapter):
    family = "LLaVA-1.5"
    model_classes = ("LlavaForConditionalGeneration",)
    processor_classes = ("LlavaProcessor",)

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        strategy = inputs.get("vision_feature_select_strategy") or getattr(
            self.config, "vision_feature_select_strategy", "default"
        )
        cls = 1 if strategy == "full" else 0
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            if pixel_values.ndim != 4:
                raise VlmfixInputError(
                    f"LLaVA expects pixel_values of shape (images, channels, height, width), got {tuple(pixel_values.shape)}"
                )
            patch = int(self.config.vision_config.patch_size)
            grids = [(pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)] * pixel_values.shape[0]
        else:
            grids = []
            for features in encoded_images(inputs):
                side = math.isqrt(features.shape[0] - cls)
                grids.append((side, (features.shape[0] - cls) // max(side, 1)))
        return [ImageLayout(segments=(ImageSegment(start=cls, rows=r, cols=c),), length=cls + r * c,
                            extra=(0,) * cls) for r, c in grids]
