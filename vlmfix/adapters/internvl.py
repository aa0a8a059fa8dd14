"""InternVL (`InternVLForConditionalGeneration`, InternVL 3): tiles of pixel-shuffled patches between <img> ... </img>.

The processor cuts an image into a grid of tiles of the tower's size, in row-major order, plus a
thumbnail of the whole image when there is more than one tile (InternVL's image processor always
adds it then); `pixel_values` holds every tile of every image, one after the other, and the number
of tiles per image is not passed to the model. Each tile's f x f patches (f = image_size /
patch_size) are pixel-shuffled (`downsample_ratio`, 0.5) to s x s tokens, s = f * ratio, row-major;
the image is "<img>" + the tiles' tokens + "</img>", one run of image tokens. So the run's length
gives the tile count (run / s^2), and the layout is one s x s grid per tile ("tile0", ...,
"thumbnail"; a single tile is "image"). Video frames reach the model as one-tile images.
"""

from __future__ import annotations

from typing import Any, Mapping

from vlmfix.adapters.base import Adapter, ImageLayout, VlmfixInputError, encoded_images
from vlmfix.adapters.inputs import check_tiles, tiled_layout, token_runs


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


class InternVLAdapter(Adapter):
    family = "InternVL"
    model_classes = ("InternVLForConditionalGeneration",)
    processor_classes = ("InternVLProcessor",)
    #: the processor's label before each video frame ("Frame1: <img>...</img>")
    processor_text = r"Frame\d+: "

    def __init__(self, model: Any, processor: Any | None = None):
        super().__init__(model, processor)
        vc = self.config.vision_config
        (h, w), (ph, pw) = _pair(vc.image_size), _pair(vc.patch_size)
        ratio = float(self.config.downsample_ratio)
        #: tokens per tile side (rows, cols) after the pixel shuffle
        self.tile_grid = (int(h // ph * ratio), int(w // pw * ratio))

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        pixel_values = inputs.get("pixel_values")
        tiles_given = pixel_values.shape[0] if pixel_values is not None else len(encoded_images(inputs))
        rows, cols = self.tile_grid
        per_tile = rows * cols
        layouts = []
        for ids in inputs["input_ids"].cpu():
            for run in token_runs(ids, self.image_token_id)[1]:
                if run % per_tile:
                    raise VlmfixInputError(
                        f"an InternVL image of {run} image tokens is not a whole number of tiles of {per_tile} tokens; "
                        "build the prompt with the model's processor."
                    )
                layouts.append(tiled_layout([k * per_tile for k in range(run // per_tile)], rows, cols, "thumbnail"))
        check_tiles(sum(len(lay.segments) for lay in layouts), tiles_given, f"InternVL tiles of {per_tile} tokens")
        return layouts

