"""Qwen2-VL / Qwen2.5-VL: dynamic resolution, no padding.

An image of t x h x w vision patches becomes t * (h / m) * (w / m) tokens, m being the spatial
merge size (2), laid out frame by frame as (h / m) rows x (w / m) cols, framed by vision start/end
tokens. From pre-encoded features (what `generate` passes) the grid is read off the 3-D rotary
position ids (temporal, height, width), which index exactly that grid.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from ..state import ImageSegment
from .base import Adapter, ImageLayout, VlmfixInputError, encoded_images


class Qwen2VLAdapter(Adapter):
    family = "Qwen2-VL"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    processor_classes = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")

    @staticmethod
    def _layout(t: int, rows: int, cols: int) -> ImageLayout:
        segs = tuple(ImageSegment(start=k * rows * cols, rows=rows, cols=cols, name=f"frame{k}") for k in range(t))
        return ImageLayout(segments=segs, length=t * rows * cols)

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            m = int(self.config.vision_config.spatial_merge_size)
            return [self._layout(t, h // m, w // m) for t, h, w in grid.tolist()]
        features = encoded_images(inputs)
        position_ids = inputs.get("position_ids")
        if position_ids is None or position_ids.ndim != 3:
            raise VlmfixInputError("Qwen2-VL needs image_grid_thw (or 3-D position ids) with its images")
        thw = position_ids[-3:]  # (3, B, N): temporal, height, width indices
        is_image = inputs["input_ids"] == self.image_token_id
        layouts: list[ImageLayout] = []
        queue = list(features)
        for b in range(is_image.shape[0]):
            positions = is_image[b].nonzero().flatten()
            cursor = 0
            while cursor < len(positions) and queue:
                n = queue.pop(0).shape[0]
                span = positions[cursor : cursor + n]
                t, h, w = (int(thw[c, b, span].max() - thw[c, b, span].min()) + 1 for c in range(3))
                if t * h * w != n:  # text-only rotary positions (no mm_token_type_ids): grid unknown
                    warnings.warn(
                        "Qwen2-VL inputs without mm_token_type_ids: the image grid is unknown, so vlmfix treats each "
                        "image as one row of tokens. Build inputs with the model's processor.",
                        stacklevel=2,
                    )
                    t, h, w = 1, 1, n
                layouts.append(self._layout(t, h, w))
                cursor += n
        return layouts + [ImageLayout((), f.shape[0]) for f in queue]
