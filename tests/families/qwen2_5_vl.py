"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`), images and videos (a clip's frames in one run)."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .common import IMAGE, VEND, VSTART, qwen_batch, text_config
from .common import VIDEO as VIDEO_TOKEN

NAME = "qwen2_5_vl"
VIDEO = True
PRUNE_IN_PLACE = True


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0], tokens_per_second=2),
        text_config=dict(model_type="qwen2_5_vl_text", **text_config(rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})),
        image_token_id=IMAGE, video_token_id=VIDEO_TOKEN, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def make_batch(model, prompts: list) -> dict:
    return qwen_batch(prompts)


def make_video_batch(model, prompts: list) -> dict:
    return qwen_batch(prompts, video=True)
