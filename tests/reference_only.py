"""A slow reference implementation of ONLY (Wan et al., "ONLY: One-Layer Intervention Sufficiently Mitigates
Hallucinations in Large Vision-Language Models", ICCV 2025, arXiv 2507.00898), written from the paper's description
(the choices are those of vlmfix.methods.only's docstring):

- the textually enhanced model: in decoder layer l, for every query row and head, TVER = H(text part) / H(image
  part) of the head's attention row (each part renormalised); heads with TVER below the mean over the heads get
  attention 0; every other layer plain;
- per step: f (original forward), f~ (enhanced forward), d = sum |softmax(f) - softmax(f~)|; f + alpha1 f~ if
  d < gamma, else (1 + alpha2) f - alpha2 f~; tokens with p < beta max p get -inf.

Deliberately literal and slow: one prompt, no KV cache, two model calls per step, a Python loop over the heads.
"""

from __future__ import annotations

import math

import torch
from reference_attention import routed
from reference_pai import _forward, decoder_layers, image_token_ids

NAME = "only_reference"


def entropy(weights: list[float]) -> float:
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0) if total > 0 else 0.0


class Enhanced:
    """The attention function of the enhanced forward: TVER head selection in `layer`, plain eager elsewhere."""

    def __init__(self, model, layer, image):
        self.index = decoder_layers(model)
        self.layer, self.image = layer, set(image)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        _, h, q_len, d = query.shape
        kv_len = key.shape[2]
        rep = h // key.shape[1]
        k = key.repeat_interleave(rep, dim=1).float()
        v = value.repeat_interleave(rep, dim=1).float()
        scores = torch.matmul(query.float(), k.transpose(-1, -2)) * (d ** -0.5 if scaling is None else scaling)
        allowed = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
        probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(torch.float32).min), dim=-1)
        if self.index[id(module)] == self.layer:
            probs = probs.clone()
            for i in range(q_len):
                ratios = []
                for head in range(h):
                    row = probs[0, head, i].tolist()
                    text = [w for j, w in enumerate(row) if j not in self.image]
                    visual = [w for j, w in enumerate(row) if j in self.image]
                    ratios.append(entropy(text) / max(entropy(visual), 1e-12))
                mean = sum(ratios) / h
                for head in range(h):
                    if ratios[head] < mean:
                        probs[0, head, i] = 0.0
        out = torch.matmul(probs, v)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


@torch.no_grad()
def only_generate_reference(model, inputs, layer, alpha1, alpha2, gamma, beta, steps):
    """Greedy ONLY decoding of one unpadded prompt for `steps` tokens (no stop at EOS). Returns (new token ids
    (steps,), the scores per step (steps, V))."""
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "one prompt at a time"
    image = [i for i, t in enumerate(ids[0].tolist()) if t in image_token_ids(model)]
    attention = Enhanced(model, layer, image)
    tokens, scores = [], []
    for _ in range(steps):
        f = _forward(model, inputs, ids)
        with routed(model, NAME, attention):
            g = _forward(model, inputs, ids)
        p = torch.softmax(f, -1)
        d = float((p - torch.softmax(g, -1)).abs().sum())
        out = f + alpha1 * g if d < gamma else (1 + alpha2) * f - alpha2 * g
        if beta > 0:
            out = out.masked_fill(p < beta * p.max(), float("-inf"))
        token = out.argmax().view(1, 1)
        tokens.append(int(token))
        scores.append(out)
        ids = torch.cat([ids, token], dim=1)
    return torch.tensor(tokens), torch.stack(scores)
