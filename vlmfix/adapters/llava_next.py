"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): "anyres" images.

Each image is a base view (a grid of the vision tower's size) followed by the crops of its best-fit
resolution, stitched into one grid, unpadded back to the image's aspect ratio, with one newline
token closing every grid row. With a single view, the base grid is followed by one newline token.
From raw inputs the geometry comes from transformers' own LLaVA-NeXT helpers and `image_sizes`;
from pre-encoded features (what `generate` passes) the newline tokens are found exactly, as the
model inserts its `image_newline` vector verbatim.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vlmfix.core.state import ImageSegment
from vlmfix.adapters.base import Adapter, ImageLayout, VlmfixInputError, encoded_images


class LlavaNextAdapter(Adapter):
    family = "LLaVA-NeXT"
    model_classes = ("LlavaNextForConditionalGeneration",)
    processor_classes = ("LlavaNextProcessor",)

    def _side(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        strategy = inputs.get("vision_feature_select_strategy") or getattr(
            self.config, "vision_feature_select_strategy", "default"
        )
        if strategy == "full":
            raise VlmfixInputError("vlmfix supports LLaVA-NeXT with vision_feature_select_strategy='default' only")
        if inputs.get("pixel_values") is not None:
            return self._from_sizes(inputs)
        return [self._from_features(f) for f in encoded_images(inputs)]

    def _layout(self, crop_rows: int | None, crop_cols: int | None) -> ImageLayout:
        side = self._side()
        base = ImageSegment(start=0, rows=side, cols=side, name="base")
        if crop_rows is None:
            return ImageLayout(segments=(base,), length=side * side + 1, newlines=(side * side,))
        crops = ImageSegment(start=side * side, rows=crop_rows, cols=crop_cols, newline=True, name="crops")
        return ImageLayout(segments=(base, crops), length=side * side + crops.length)

    def _from_sizes(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise VlmfixInputError("LLaVA-NeXT needs image_sizes with pixel_values; use the model's processor")
        size_px = int(self.config.vision_config.image_size)
        side = self._side()
        pinpoints = self.config.image_grid_pinpoints
        layouts = []
        for size in image_sizes.tolist():
            if image_size_to_num_patches(size, pinpoints, size_px) > 1:
                ph, pw = get_anyres_image_grid_shape(size, pinpoints, size_px)
                h, w = unpad_image(torch.empty(1, ph * side, pw * side), torch.tensor(size)).shape[-2:]
                layouts.append(self._layout(int(h), int(w)))
            else:
                layouts.append(self._layout(None, None))
        return layouts

    def _from_features(self, features: torch.Tensor) -> ImageLayout:
        side = self._side()
        newline = self.model.model.image_newline.to(features)
        crops = features[side * side :]
        is_newline = (crops == newline).all(-1).nonzero().flatten()
        if len(crops) == 1 and len(is_newline) == 1:
            return self._layout(None, None)
        rows = len(is_newline)
        if rows == 0 or len(crops) % rows:
            raise VlmfixInputError("cannot read the LLaVA-NeXT image layout from its features")
        return self._layout(rows, len(crops) // rows - 1)
