"""Qwen3-VL MoE (`Qwen3VLMoeForConditionalGeneration`): Qwen3-VL with sparse-expert MLPs (4 experts, 2 per token)."""

from __future__ import annotations

import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from .common import IMAGE, VEND, VSTART, qwen_batch
from .qwen3_vl import VIDEO_TOKEN, make_video_batch, qwen3_text, vision_config  # noqa: F401 (make_video_batch)

NAME = "qwen3_vl_moe"
VIDEO = True
PRUNE_IN_PLACE = True


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = qwen3_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    cfg = Qwen3VLMoeConfig(vision_config=vision_config(), text_config=text, image_token_id=IMAGE,
                           video_token_id=VIDEO_TOKEN, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return Qwen3VLMoeForConditionalGeneration(cfg).eval()


def make_batch(model, prompts: list) -> dict:
    return qwen_batch(prompts)
