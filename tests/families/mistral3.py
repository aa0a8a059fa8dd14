"""Mistral 3 (`Mistral3ForConditionalGeneration`): a Pixtral tower, 14-px patches merged 2 x 2; an image (H, W)
becomes H // 28 rows of W // 28 image tokens, each row closed by [IMG_BREAK], the last by [IMG_END]."""

from __future__ import annotations

import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

from .common import IMAGE, IMG_BREAK, IMG_END, left_pad, text_config

NAME = "mistral3"
VIDEO = False
PRUNE_IN_PLACE = True


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=16, image_size=112, patch_size=14)
    cfg = Mistral3Config(vision_config=vision, text_config=MistralConfig(**text_config(head_dim=16)),
                         image_token_index=IMAGE, spatial_merge_size=2, vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(cfg).eval()


def make_batch(model, prompts: list) -> dict:
    seqs, images, sizes = [], [], []
    for before, size, after in prompts:
        ids = list(before)
        if size is not None:
            h, w = (max(28, s // 28 * 28) for s in size)
            rows, cols = h // 28, w // 28
            ids += ([IMAGE] * cols + [IMG_BREAK]) * rows
            ids[-1] = IMG_END
            g = torch.Generator().manual_seed(h * 1000 + w)
            images.append(torch.randn(3, h, w, generator=g))
            sizes.append([h, w])
        seqs.append(ids + list(after))
    batch = left_pad(seqs)
    if images:
        height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
        pixels = torch.zeros(len(images), 3, height, width)
        for k, img in enumerate(images):
            pixels[k, :, : img.shape[1], : img.shape[2]] = img
        batch["pixel_values"] = pixels
        batch["image_sizes"] = torch.tensor(sizes)
    return batch
