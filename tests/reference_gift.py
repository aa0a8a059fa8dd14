"""A slow reference implementation of GIFT as the paper specifies it (see vlmfix/methods/gift.py), the explicit two-pass way:

1. a full prefill with every attention map (eager attention, output_attentions) builds the
   saliency map with plain loops over layers, heads and query rows: the question's informative
   tokens after the row's last image token (a token before the image cannot attend to it);
2. generation with a reference attention function that boosts the last query row of each boost
   layer (the last prompt position, then every decoding step), again with plain loops.
"""

from __future__ import annotations

import math

import torch
from reference_attention import eager_probs, routed, text_key, visual_ids

NAME = "gift_reference"


def saliency(model, inputs, questions, informative, layers, alpha):
    """Per batch row: (S_hat, M) over its image tokens, or None without informative rows after the image.
    `questions[b]`: the positions of row b's question (or None), `informative[b]` a flag per position."""
    key = text_key(model)
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({key: "eager"})
    extra = {}
    if "Qwen" not in type(model).__name__ and inputs.get("attention_mask") is not None:
        # left padding: the positions generate() uses (Qwen2-VL derives its 3-D positions itself)
        mask = inputs["attention_mask"]
        extra["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    try:
        with torch.no_grad():
            attentions = model(**inputs, **extra, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({key: previous})
    visual = torch.tensor(sorted(visual_ids(model)))
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        image = torch.isin(inputs["input_ids"][b], visual).nonzero().flatten().tolist()
        rows = [i for i, keep in zip(questions[b] or [], informative[b] or []) if keep and image and i > image[-1]]
        if not image or not rows:
            out.append(None)
            continue
        per_layer = []
        for layer in layers:
            a = attentions[layer][b].float()  # (H, N, N)
            heads = a.shape[0]
            totals, shifts = [], []
            for h in range(heads):
                shift = [[max(float(a[h, i, j]) - float(a[h, i - 1, j]), 0.0) for j in image] for i in rows]
                shifts.append(shift)
                totals.append(sum(sum(r) for r in shift))
            keep = sorted(range(heads), key=lambda h: -totals[h])[: max(1, heads // 2)]
            per_layer.append([sum(shifts[h][r][j] for h in keep for r in range(len(rows))) / (len(keep) * len(rows))
                              for j in range(len(image))])
        s = [sum(v[j] for v in per_layer) / len(per_layer) for j in range(len(image))]
        mean = sum(s) / len(s)
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / len(s))
        s = [min(max(x, mean - 3 * std), mean + 3 * std) for x in s]
        lo, hi = min(s), max(s)
        s_hat = [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in s]
        out.append((torch.tensor(s_hat), torch.tensor([math.exp(alpha * x) for x in s_hat])))
    return out


class Booster:
    def __init__(self, model, inputs, questions, maps, boost_layers, beta=1.0):
        self.visual = torch.tensor(sorted(visual_ids(model)))
        self.ids = inputs["input_ids"]
        self.prompt_len = self.ids.shape[1]
        self.questions, self.maps, self.layers, self.beta = questions, maps, set(boost_layers), beta

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        probs, v, q_start = eager_probs(query, key, value, attention_mask, scaling)
        q_len = query.shape[2]
        if module.layer_idx in self.layers:
            probs = probs.clone()
            i = q_len - 1  # the last row: the last prompt position, or the decoding step
            for b in range(query.shape[0]):
                if self.maps[b] is not None:
                    probs[b, :, i] = self.boost(probs[b, :, i], b)
        return torch.matmul(probs, v).to(query.dtype).transpose(1, 2).contiguous(), None

    def boost(self, a, b):
        heads = a.shape[0]
        image = torch.isin(self.ids[b], self.visual).nonzero().flatten().tolist()
        question = self.questions[b]
        m = self.maps[b][1]
        half = max(1, heads // 2)
        vis = sorted(range(heads), key=lambda h: -sum(float(a[h, j]) for j in image))[:half]
        qry = sorted(range(heads), key=lambda h: -sum(float(a[h, j]) for j in question))[:half]
        new = a.clone()
        before = after = 0.0
        for h in vis:
            for n, j in enumerate(image):
                before += float(a[h, j])
                new[h, j] = a[h, j] * m[n]
                after += float(new[h, j])
        r = after / before if before > 0 else 1.0
        for h in qry:
            for j in question:
                new[h, j] = new[h, j] * (self.beta * r)
        for h in set(vis) | set(qry):
            new[h] = new[h] / new[h].sum()
        return new


def boosted(model, booster):
    return routed(model, NAME, booster.attention)
