"""Mistral 3 (`Mistral3ForConditionalGeneration`): Pixtral images.

An image of H x W pixels becomes rows x cols tokens, rows = H / (patch * m), cols = W / (patch *
m) (m: the spatial merge size of the patch merger); every row of image tokens is closed by an
[IMG_BREAK] token and the last one by [IMG_END] instead. Neither is an image token: each image is
one segment with a gap of one non-image position after every grid row. From raw inputs the grid
comes from `image_sizes`; from pre-encoded features (what `generate` passes) it is read off the
prompt, whose rows of image tokens are the runs between the break tokens.
"""

from __future__ import annotations

from typing import Any, Mapping

from vlmfix.core.state import ImageSegment
from vlmfix.adapters.base import Adapter, ImageLayout, VlmfixInputError, encoded_images, feature_spans, runs


def pixtral_layout(rows: int, cols: int) -> ImageLayout:
    """rows x cols image tokens, each grid row followed by one break (or end) token."""
    return ImageLayout(segments=(ImageSegment(start=0, rows=rows, cols=cols, gap=1),), length=rows * cols)


class Mistral3Adapter(Adapter):
    family = "Mistral 3"
    model_classes = ("Mistral3ForConditionalGeneration",)
    processor_classes = ("PixtralProcessor",)

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        if inputs.get("pixel_values") is not None:
            sizes = inputs.get("image_sizes")
            if sizes is None:
                raise VlmfixInputError("Mistral 3 needs image_sizes with pixel_values; use the model's processor")
            step = int(self.config.vision_config.patch_size) * int(self.config.spatial_merge_size)
            return [pixtral_layout(h // step, w // step) for h, w in sizes.tolist()]
        spans, unmatched = feature_spans(inputs, self.image_token_id, [f.shape[0] for f in encoded_images(inputs)])
        layouts: list[ImageLayout] = []
        for _, span in spans:
            n, cols = len(span), len(runs(span)[0])  # the first row of image tokens
            layouts.append(pixtral_layout(n // cols, cols) if n % cols == 0 else pixtral_layout(1, n))
        return layouts + [pixtral_layout(1, n) for n in unmatched]  # more features than tokens: an error

