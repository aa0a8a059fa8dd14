"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): images, and videos whose frames are apart (a timestamp
before each). Its deepstack adds visual features after decoder layers 0 and 1 here (two deepstack
indexes), so in-place pruning from layer 2 runs and from layer 1 is refused."""

from __future__ import annotations

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from .common import IMAGE, VEND, VSTART, qwen_batch, text_config
from .common import VIDEO as VIDEO_TOKEN

NAME = "qwen3_vl"
VIDEO = True
PRUNE_IN_PLACE = True


def vision_config() -> dict:
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])


def qwen3_text(**extra) -> dict:
    """The tiny decoder with an explicit head_dim (16) and an interleaved mrope section that fits it."""
    return text_config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3], "mrope_interleaved": True}, **extra)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(vision_config=vision_config(), text_config=qwen3_text(), image_token_id=IMAGE,
                        video_token_id=VIDEO_TOKEN, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return Qwen3VLForConditionalGeneration(cfg).eval()


def make_batch(model, prompts: list) -> dict:
    return qwen_batch(prompts)


def make_video_batch(model, prompts: list) -> dict:
    return qwen_batch(prompts, video=True, frames_apart=True)
