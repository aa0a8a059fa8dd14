"""Tiny random Gemma 3 (`Gemma3ForConditionalGeneration`): a 1-layer SigLIP tower whose 8 x 8 patches
are pooled to 4 x 4 = 16 image tokens, framed by begin/end-of-image tokens, marked in `token_type_ids`.

Layers alternate sliding-window and full attention; `make_model(window=...)` sets the window (the
default is wider than every test prompt, so the references, which run the model's own cache, hold).
The multimodal projector initialises to zeros in transformers, which would give every image token
the same (zero) feature: it is drawn at random here.
"""

from __future__ import annotations

import torch
from families.common import IMAGE, left_pad, text_config
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

NAME = "gemma3"
VIDEO = False
PRUNE_IN_PLACE = True

BOI, EOI = 101, 102  # the tiny tokenizer's special ids after the image token
SIDE = 4  # image tokens per side
IMAGE_SIZE, PATCH = 32, 4  # 8 x 8 patches, pooled 2 x 2


def make_model(seed: int = 0, window: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = Gemma3TextConfig(**text_config(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]))
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=SIDE * SIDE,
                       boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    return model.eval()


def make_batch(model, prompts) -> dict:
    """Left-padded batch: each image is <boi> + 16 image tokens + <eoi>, as Gemma3Processor expands it
    (its "\\n\\n" around the block left out: the tiny vocabulary has no newline token)."""
    seqs, pixels = [], []
    for before, size, after in prompts:
        ids = list(before)
        if size is not None:
            ids += [BOI] + [IMAGE] * SIDE * SIDE + [EOI]
            g = torch.Generator().manual_seed(size[0] * 1000 + size[1])
            pixels.append(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g))  # resized to the tower's square
        seqs.append(ids + list(after))
    batch = left_pad(seqs)
    batch["token_type_ids"] = (batch["input_ids"] == IMAGE).long()
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch
