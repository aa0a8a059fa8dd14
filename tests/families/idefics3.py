"""Tiny random Idefics3: a 1-layer SigLIP-style tower of 4 x 4 patches per 24-px tile, pixel-shuffled (scale 2)
to 2 x 2 = 4 tokens per tile, a Llama decoder. Images are resized to a longest edge of 48 px and split
into rows x cols tiles of 24 px plus the global view, the grid coming from transformers' Idefics3 image
processor, and written as Idefics3Processor does: per tile "<fake_token_around_image><row_i_col_j>" +
4 image tokens, a newline after each tile row, then "\\n<fake_token_around_image><global-img>" + 4
image tokens + "<fake_token_around_image>". `pixel_values` is 5-D, padded with all-zero images, beside
`pixel_attention_mask`. families.smolvlm builds the same on SmolVLM's classes."""

from __future__ import annotations

import torch
from families.common import IMAGE, left_pad, text_config
from transformers import Idefics3Config, Idefics3ForConditionalGeneration
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

NAME = "idefics3"
VIDEO = False
PRUNE_IN_PLACE = True

TILE, PATCH, PER_TILE = 24, 6, 4
NEWLINE, FAKE, GLOBAL = 3, 107, 108  # the tiny tokenizer's "\n", <fake_token_around_image>, <global-img>


def row_col(r: int, c: int) -> int:
    """The tiny tokenizer's <row_{r+1}_col_{c+1}>."""
    return 109 + 2 * r + c


def configs() -> dict:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=TILE, patch_size=PATCH)
    return dict(vision_config=vision, text_config=dict(model_type="llama", **text_config()), image_token_id=IMAGE,
                scale_factor=2)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(Idefics3Config(**configs())).eval()


def tile_grid(size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of tiles of an image of `size` (H, W) as Idefics3's image processor splits it ((0, 0): the
    global view alone)."""
    processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE})
    _, rows, cols = processor.get_number_of_image_patches(*size)
    return rows, cols


def image_ids(rows: int, cols: int) -> list[int]:
    """The ids Idefics3Processor writes for an image of rows x cols tiles."""
    view = [IMAGE] * PER_TILE
    if rows == 0:
        return [FAKE, GLOBAL] + view + [FAKE]
    ids = []
    for r in range(rows):
        for c in range(cols):
            ids += [FAKE, row_col(r, c)] + view
        ids.append(NEWLINE)
    return ids + [NEWLINE, FAKE, GLOBAL] + view + [FAKE]


def make_batch(model, prompts) -> dict:
    seqs, views = [], []
    for before, size, after in prompts:
        ids = list(before)
        if size is not None:
            rows, cols = tile_grid(size)
            ids += image_ids(rows, cols)
            g = torch.Generator().manual_seed(sum(size))
            views.append(torch.randn(rows * cols + 1, 3, TILE, TILE, generator=g))
        else:
            views.append(None)
        seqs.append(ids + list(after))
    batch = left_pad(seqs)
    if any(v is not None for v in views):
        most = max(len(v) for v in views if v is not None)
        pixels = torch.zeros(len(views), most, 3, TILE, TILE)
        mask = torch.zeros(len(views), most, TILE, TILE, dtype=torch.bool)
        for b, v in enumerate(views):
            if v is not None:
                pixels[b, : len(v)] = v
                mask[b, : len(v)] = True
        batch["pixel_values"], batch["pixel_attention_mask"] = pixels, mask
    return batch
