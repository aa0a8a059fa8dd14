"""Plain eager attention for the reference implementations, and a context that routes a model's
text decoder through a reference attention function (its own AttentionInterface entry)."""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def eager_probs(query, key, value, attention_mask, scaling=None):
    """Full fp32 attention maps: (probs (B, H, Q, K), values expanded to query heads, q_start)."""
    d = query.shape[-1]
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1).float()
    v = value.repeat_interleave(rep, dim=1).float()
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * (scaling or d ** -0.5)
    kv_len, q_len = k.shape[2], query.shape[2]
    q_start = kv_len - q_len
    if attention_mask is None:
        allowed = (torch.arange(kv_len)[None, :] <= torch.arange(q_start, kv_len)[:, None])[None, None]
    else:
        allowed = attention_mask[:, :, :, :kv_len].bool()
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(torch.float32).min), dim=-1)
    return probs, v, q_start


def visual_ids(model) -> set[int]:
    """The ids of the visual tokens (image and, where the family takes video, video) of `model`."""
    config = model.config
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return {int(v) for v in (getattr(config, n, None) for n in names) if v is not None}


def text_key(model) -> str:
    text = model.config.get_text_config()
    return next(k for k in model.config.sub_configs if getattr(model.config, k) is text)


@contextlib.contextmanager
def routed(model, name: str, attention):
    """Run the model's text decoder through `attention` (registered as `name`), restoring it after."""
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    key = text_key(model)
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({key: name})
    try:
        yield
    finally:
        model.set_attn_implementation({key: previous})
