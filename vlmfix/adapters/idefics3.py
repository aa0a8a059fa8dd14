"""Idefics3 / SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`): tiles and a global view.

The processor splits a large image into rows x cols tiles of the tower's size and adds the whole
image downscaled (the global view); a small image is the global view alone. `pixel_values` is 5-D
(batch rows, images, C, H, W), padded with all-zero images, beside a `pixel_attention_mask` of the
real pixels. Each tile's f x f patches (f = image_size / patch_size) are pixel-shuffled
(`scale_factor`) to s x s tokens, s = f / scale_factor, row-major. In the text every tile is
"<fake_token_around_image><row_i_col_j>" + s^2 image tokens, a newline after each tile row, then
"\\n<fake_token_around_image><global-img>" + s^2 image tokens + "<fake_token_around_image>": the
image's tokens come in runs separated by text, one run per tile, one grid per run ("tile0", ...,
in reading order, then "global"; a lone global view is "image"). SmolVLM's video frames are such
single views, one image each.

Which runs make one image: the global view's run follows the `<global-img>` tag, so with a tokenizer
that knows the tag each image ends there. Without one, the runs of a batch row are taken as one
image (a warning says so when that is a guess, i.e. a row holds several runs).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from vlmfix.adapters.base import Adapter, ImageLayout, VlmfixInputError, encoded_images
from vlmfix.adapters.inputs import check_tiles, pixels, tiled_layout, token_runs

GLOBAL_TAG = "<global-img>"


class Idefics3Adapter(Adapter):
    family = "Idefics3 / SmolVLM"
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    processor_classes = ("Idefics3Processor", "SmolVLMProcessor")
    #: their chat templates write a user turn "<|im_start|>User:...<end_of_utterance>\nAssistant:"
    user_markers = ("User:", *Adapter.user_markers)
    turn_end_markers = ("<end_of_utterance>", *Adapter.turn_end_markers)

    def __init__(self, model: Any, processor: Any | None = None):
        super().__init__(model, processor)
        vc = self.config.vision_config
        #: tokens per tile side after the pixel shuffle
        self.side = int(vc.image_size) // int(vc.patch_size) // int(self.config.scale_factor)
        self.global_tag_id = self._global_tag_id(processor)

    def _global_tag_id(self, processor: Any | None) -> int | None:
        """The `<global-img>` token id from the processor's tokenizer (None when it does not know the tag)."""
        tok = self.tokenizer
        if tok is None:
            return None
        tag = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", GLOBAL_TAG)
        found = tok.convert_tokens_to_ids(tag)
        return None if found is None or found == getattr(tok, "unk_token_id", None) else int(found)

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        pixel_values = pixels(inputs, "pixel_values", ("batch", "images", "channels", "height", "width"), self.family)
        per_tile = self.side * self.side
        if pixel_values is not None:
            given = int((pixel_values.flatten(2) != 0).any(-1).sum())  # all-zero images are padding
        else:  # pre-encoded: one tensor per batch row, its tiles' tokens one after the other
            given = sum(f.shape[0] for f in encoded_images(inputs)) // per_tile
        layouts: list[ImageLayout] = []
        for b, ids in enumerate(inputs["input_ids"].cpu()):
            starts, lengths = token_runs(ids, self.image_token_id)
            if any(n != per_tile for n in lengths):
                raise VlmfixInputError(
                    f"batch row {b}: {self.family} image tokens come in runs of {per_tile} (one tile each), got "
                    f"{lengths}; build the prompt with the model's processor."
                )
            layouts += self._images(ids, starts, b)
        check_tiles(sum(len(lay.segments) for lay in layouts), given, "tiles")
        return layouts

    def _images(self, ids: torch.Tensor, starts: list[int], row: int) -> list[ImageLayout]:
        """The layouts of one batch row's images from the starts of its runs of image tokens."""
        if self.global_tag_id is None:
            if len(starts) > 1:
                warnings.warn(
                    f"batch row {row}: {len(starts)} runs of image tokens and no tokenizer that knows {GLOBAL_TAG}: "
                    "vlmfix takes them as the tiles and global view of one image. Pass the processor to tell "
                    "several images apart.", stacklevel=4,
                )
            groups = [starts] if starts else []
        else:
            groups, current = [], []
            for s in starts:
                current.append(s)
                if s > 0 and int(ids[s - 1]) == self.global_tag_id:
                    groups.append(current)
                    current = []
            if current:
                raise VlmfixInputError(
                    f"batch row {row}: image tokens after the last {GLOBAL_TAG} view; build the prompt with the "
                    "model's processor."
                )
        return [tiled_layout([s - group[0] for s in group], self.side, self.side, "global") for group in groups]

