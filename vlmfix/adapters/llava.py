"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one square grid of patch tokens per image.

The vision tower sees the image resized (and, in llava-hf's "pad" mode, padded) to a square; each
image becomes (H / patch) x (W / patch) tokens, plus the CLS token first with the "full" feature
strategy.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

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

    # -- the vision side: CLIP (CLS first, then the patch grid row-major); one feature per patch --------
    vision_side = True

    @property
    def _strategy(self) -> str:
        return getattr(self.config, "vision_feature_select_strategy", "default")

    @property
    def vision_cls(self) -> bool:
        """CLIP's CLS token is dropped with vision_feature_select_strategy="default" (LLaVA-1.5's); with
        "full" it is kept as the image's first feature."""
        return self._strategy == "default"

    @property
    def vision_feature_layer(self) -> int:
        """The config's `vision_feature_layer` (an index into the tower's hidden states, -2 in LLaVA-1.5) as an
        encoder layer; a list of layers (features concatenated) is refused."""
        k = self.config.vision_feature_layer
        n = len(self.vision_layers)
        layer = (k % (n + 1)) - 1 if isinstance(k, int) else -1
        if layer < 0:
            raise VlmfixInputError(f"vision-side methods need one vision_feature_layer after an encoder layer, "
                                   f"got {k!r}")
        return layer

    def vision_token_map(self, tower_tokens: int) -> torch.Tensor:
        """Identity over the patch grid; the CLS token (tower token 0) feeds nothing ("default") or token 0."""
        if self.vision_cls:
            return torch.arange(-1, tower_tokens - 1)
        return torch.arange(tower_tokens)
