"""Tiny random InternVL: a 1-layer InternViT of 6 x 6 patches per 24-px tile, pixel-shuffled to 3 x 3 = 9
tokens per tile, a Qwen2 decoder. Images are cut into up to 4 tiles plus a thumbnail, the tile count
coming from transformers' GotOcr2 image processor (InternVL's), and written "<img>" + 9 tokens per
tile + "</img>" as InternVLProcessor does (the tiny tokenizer's vision start / end stand for <img> / </img>)."""

from __future__ import annotations

import torch
from families.common import IMAGE, VEND, VSTART, left_pad, text_config
from transformers import InternVLConfig, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

NAME = "internvl"
VIDEO = False  # InternVL takes video frames as one-tile images in pixel_values
PRUNE_IN_PLACE = True

TILE, PATCH, PER_TILE = 24, 4, 9


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[TILE, TILE], patch_size=[PATCH, PATCH])
    cfg = InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **text_config()),
                         image_token_id=IMAGE, image_seq_length=PER_TILE, downsample_ratio=0.5)
    return InternVLForConditionalGeneration(cfg).eval()


def tiles(size: tuple[int, int]) -> int:
    """Tiles of an image of `size` (H, W), thumbnail included, as InternVL's image processor cuts it."""
    processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, max_patches=4)
    return processor.get_number_of_image_patches(*size)


def make_batch(model, prompts) -> dict:
    seqs, pixels = [], []
    for before, size, after in prompts:
        ids = list(before)
        if size is not None:
            n = tiles(size)
            ids += [VSTART] + [IMAGE] * (PER_TILE * n) + [VEND]
            pixels.append(torch.randn(n, 3, TILE, TILE, generator=torch.Generator().manual_seed(sum(size))))
        seqs.append(ids + list(after))
    batch = left_pad(seqs)
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch
