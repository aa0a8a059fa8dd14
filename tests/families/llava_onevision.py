"""Tiny random LLaVA-OneVision: a 1-layer SigLIP tower of 4 x 4 patches per 24-px view, "anyres" crops
from pinpoints up to 48 x 48 px capped at 2 base views ("anyres_max_2"), a Qwen2 decoder; videos pool
each frame to 2 x 2 tokens and end with one newline token.

Token counts come from transformers' LlavaOnevisionProcessor arithmetic (its `_get_number_of_features`
and its video formula), not from vlmfix's adapter.
"""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import torch
from families.common import IMAGE, VIDEO as VIDEO_TOKEN, left_pad, text_config
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

NAME = "llava_onevision"
VIDEO = True
PRUNE_IN_PLACE = True
#: the harness's clips: one frame count per batch (one tensor), one grid per frame
VIDEO_FRAMES, FRAMES_PER_SEGMENT = (3, 3), 1

VIEW, PATCH = 24, 6
PINPOINTS = [[24, 48], [48, 24], [48, 48]]
ASPECT = "anyres_max_2"


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=VIEW, patch_size=PATCH, vision_use_head=False)
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=dict(model_type="qwen2", **text_config()), image_token_index=IMAGE,
        video_token_index=VIDEO_TOKEN, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=ASPECT,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def _counter() -> SimpleNamespace:
    """The processor's token arithmetic on the tiny geometry (its methods, bound to a plain namespace)."""
    ns = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS),
                         num_image_tokens=(VIEW // PATCH) ** 2, vision_aspect_ratio=ASPECT)
    ns._get_unpadded_features = partial(LlavaOnevisionProcessor._get_unpadded_features, ns)
    return ns


def image_tokens(size: tuple[int, int]) -> int:
    """Image tokens of one image of `size` (H, W) alone in its row, as LlavaOnevisionProcessor counts them."""
    return LlavaOnevisionProcessor._get_number_of_features(_counter(), size[0], size[1], VIEW, VIEW)


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, VIEW, VIEW, generator=torch.Generator().manual_seed(seed))


def make_batch(model, prompts) -> dict:
    """Left-padded batch, one image per row: its views (base + best-fit crops) padded to the batch's most
    views, `image_sizes`, and `batch_num_images` (1 per image row), as the processor returns them."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    seqs, views, sizes = [], [], []
    for before, size, after in prompts:
        ids = list(before)
        if size is not None:
            ids += [IMAGE] * image_tokens(size)
            views.append(_pixels(image_size_to_num_patches(size, PINPOINTS, VIEW), seed=sum(size)))
            sizes.append(list(size))
        seqs.append(ids + list(after))
    batch = left_pad(seqs)
    if views:
        most = max(v.shape[0] for v in views)
        batch["pixel_values"] = torch.stack([torch.cat([v, v.new_zeros(most - len(v), *v.shape[1:])]) for v in views])
        batch["image_sizes"] = torch.tensor(sizes)
        batch["batch_num_images"] = torch.ones(len(views), dtype=torch.long)
    return batch


def make_video_batch(model, prompts) -> dict:
    """Left-padded batch, one clip (frames, H, W) per row: `pixel_values_videos` (clips, frames, 3, 24, 24)
    and, per clip, frames x ceil(4/2)^2 video tokens + 1 newline token, the processor's count. The model
    takes the clips of a batch as one tensor, so they must have the same number of frames."""
    frames = {size[0] for _, size, _ in prompts if size is not None}
    if len(frames) > 1:
        raise ValueError(f"LLaVA-OneVision batches clips of one frame count only, got {sorted(frames)}")
    per_frame = math.ceil(VIEW // PATCH / 2) ** 2
    seqs, clips = [], []
    for before, size, after in prompts:
        ids = list(before)
        if size is not None:
            ids += [VIDEO_TOKEN] * (size[0] * per_frame + 1)
            clips.append(_pixels(size[0], seed=sum(size)))
        seqs.append(ids + list(after))
    batch = left_pad(seqs)
    if clips:
        batch["pixel_values_videos"] = torch.stack(clips)
    return batch
