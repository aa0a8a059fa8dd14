"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's "anyres" images, capped, and videos.

Images, as in LLaVA-NeXT: a base view of s x s tokens (s = image_size / patch_size) followed by the
crops of the best-fit resolution stitched into one grid and unpadded to the image's aspect ratio,
each grid row closed by a newline token. OneVision then caps the crop grid ("anyres_max_N",
`config.vision_aspect_ratio`): when its h x w tokens exceed N base views by more than 10%
(ratio = sqrt(h w / (N s^2)) > 1.1), it is resized (bilinear) to floor(h / ratio) x floor(w / ratio)
before the newlines are added. In a batch row with several images (`batch_num_images` > 1) no image
is cropped: each is its base view and one newline token.

Videos (`pixel_values_videos`, frames x channels x H x W per clip): each frame's s x s tokens are
pooled (bilinear) to ceil(s/2) x ceil(s/2), frames one after the other, and one newline token ends
the clip. Video tokens are visual tokens like image tokens; the layout has one grid per frame.
From pre-encoded features (what `generate` passes) image layouts are read off the newline vectors
(as in LLaVA-NeXT) and a clip's frame count off its length.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from vlmfix.adapters.base import ImageLayout, VlmfixInputError, encoded_images
from vlmfix.adapters.inputs import frames_layout, pixels
from vlmfix.adapters.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "LLaVA-OneVision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    processor_classes = ("LlavaOnevisionProcessor",)

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        # the vision tower gives s x s patch features per view with either strategy (SigLIP has no CLS token)
        if inputs.get("pixel_values") is not None:
            return self._from_sizes(inputs)
        return [self._from_features(f) for f in encoded_images(inputs)]

    def _from_sizes(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise VlmfixInputError("LLaVA-OneVision needs image_sizes with pixel_values; use the model's processor")
        counts = inputs.get("batch_num_images")
        cropped = [True] * len(image_sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        side, size_px = self._side(), int(self.config.vision_config.image_size)
        cap = int(str(inputs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio).strip("anyres_max_"))
        layouts = []
        for size, crops in zip(image_sizes.tolist(), cropped):
            if not crops:
                layouts.append(self._layout(None, None))
                continue
            ph, pw = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, size_px)
            h, w = unpad_image(torch.empty(1, ph * side, pw * side), torch.tensor(size)).shape[-2:]
            ratio = math.sqrt(h * w / (cap * side**2))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
            layouts.append(self._layout(int(h), int(w)))
        return layouts

    def _video_layout(self, frames: int) -> ImageLayout:
        p = math.ceil(self._side() / 2)
        grid = frames_layout(frames, p, p)
        return ImageLayout(segments=grid.segments, length=grid.length + 1, newlines=(grid.length,))

    def video_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        videos = pixels(inputs, "pixel_values_videos", ("videos", "frames", "channels", "height", "width"), self.family)
        if videos is not None:
            return [self._video_layout(videos.shape[1])] * videos.shape[0]
        per_frame = math.ceil(self._side() / 2) ** 2
        return [self._video_layout((f.shape[0] - 1) // per_frame) for f in encoded_images(inputs, "video")]
