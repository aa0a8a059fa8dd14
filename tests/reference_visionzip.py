"""Slow reference of VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467), written from the paper for LLaVA-1.5
(CLIP, CLS first) and Gemma 3 (SigLIP, no CLS): the tower run in eager attention, its attention and keys
recomputed from its hidden states, dominant and contextual tokens chosen with literal loops, and the contextual
features merged (one image at a time)."""

from __future__ import annotations

import copy
import math

import torch


def eager_tower(model):
    tower = copy.deepcopy(model.model.vision_tower)
    tower.config._attn_implementation = "eager"
    return tower


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def select(scores: list[float], keys: list[list[float]], keep: int, contextual: int):
    """(dominant, targets, groups): the `keep - contextual` highest scores (ties: the lower index), the remaining
    tokens' uniform targets (every floor(R / C)-th, the first C) and each target's group (itself and the remaining
    tokens whose key is most similar to its key, ties to the earlier target)."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    dominant = sorted(order[:keep - contextual])
    remaining = [i for i in range(n) if i not in dominant]
    if contextual == 0:
        return dominant, [], {}
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    groups = {t: [t] for t in targets}
    for i in remaining:
        if i in groups:
            continue
        sims = [cosine(keys[i], keys[t]) for t in targets]
        groups[targets[sims.index(max(sims))]].append(i)
    return dominant, targets, groups


@torch.no_grad()
def llava_visionzip(model, pixel_values: torch.Tensor, keep: int, contextual: int):
    """LLaVA-1.5 ("default" strategy, the feature layer read): (dominant, targets, groups, features (N, D) with
    the contextual tokens' features replaced by projector(mean of the group's tower features))."""
    tower = eager_tower(model)
    layer = model.config.vision_feature_layer % (len(getattr(tower, "vision_model", tower).encoder.layers) + 1) - 1
    out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    attention = out.attentions[layer][0].float()  # (H, T, T)
    heads = attention.shape[0]
    scores = [float(attention[:, 0, j].mean()) for j in range(1, attention.shape[-1])]  # from CLS to each patch
    block = getattr(tower, "vision_model", tower).encoder.layers[layer]
    keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer]))[0]  # (T, H * d)
    keys = keys.view(keys.shape[0], heads, -1).mean(1)[1:].tolist()
    dominant, targets, groups = select(scores, keys, keep, contextual)
    hidden = out.hidden_states[layer + 1][0, 1:]  # the projector's input, CLS dropped
    projector = model.model.multi_modal_projector
    features = projector(hidden)
    for t, members in groups.items():
        features[t] = projector(hidden[members].mean(0))
    return dominant, targets, groups, features


@torch.no_grad()
def gemma3_visionzip(model, pixel_values: torch.Tensor, keep: int, contextual: int, side: int):
    """Gemma 3 (SigLIP, no CLS; the last layer; p x p patches pooled k x k into side x side tokens): each token's
    score is the mean over its patches of the attention a patch receives (mean over heads and queries), its key
    the mean of its patches' head-mean keys; the contextual tokens' features are their groups' mean features."""
    tower = eager_tower(model)
    out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    layer = len(getattr(tower, "vision_model", tower).encoder.layers) - 1
    attention = out.attentions[layer][0].float()
    heads, t = attention.shape[0], attention.shape[-1]
    received = attention.mean((0, 1))  # (T,)
    block = getattr(tower, "vision_model", tower).encoder.layers[layer]
    keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer]))[0].view(t, heads, -1).mean(1)
    p = math.isqrt(t)
    k = p // side
    token_scores, token_keys = [], []
    for r in range(side):
        for c in range(side):
            patches = [(r * k + i) * p + c * k + j for i in range(k) for j in range(k)]
            token_scores.append(float(received[patches].mean()))
            token_keys.append(keys[patches].mean(0).tolist())
    dominant, targets, groups = select(token_scores, token_keys, keep, contextual)
    got = model.model.get_image_features(pixel_values)
    features = (got.pooler_output if hasattr(got, "pooler_output") else got)[0].clone()
    for tgt, members in groups.items():
        features[tgt] = features[members].mean(0)
    return dominant, targets, groups, features
