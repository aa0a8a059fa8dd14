"""A slow reference implementation of M3ID (Favero et al., "Multi-Modal Hallucination Control by Visual Information
Grounding", CVPR 2024, arXiv 2403.14003), written from the paper's formula (the choices are those of
vlmfix.methods.m3id's docstring):

    l*_t = l_c + (1 - gamma_t) / gamma_t * (l_c - l_u),    gamma_t = exp(-lambda t)

l_c: log-probabilities of the next token given the image and the text, l_u: given the text alone (the prompt
without its image); t = 0 for the first generated token; with a confidence threshold, steps where max p_c >=
threshold keep l_c.

Deliberately literal and slow: one prompt, a greedy loop with no KV cache, two model calls per step (the
image-conditioned forward and the image-free one), gamma_t computed from a Python int.
"""

from __future__ import annotations

import math

import torch
from reference_pai import _forward


@torch.no_grad()
def m3id_generate_reference(model, inputs_with_image, inputs_without_image, lam, steps, threshold=None):
    """Greedy M3ID decoding of one prompt for `steps` tokens (no stop at EOS).

    Returns (new token ids (steps,), the scores l*_t per step (steps, V))."""
    assert inputs_with_image["input_ids"].shape[0] == 1, "one prompt at a time"
    ids, free = inputs_with_image["input_ids"], inputs_without_image["input_ids"]
    tokens, scores = [], []
    for t in range(steps):
        lc = torch.log_softmax(_forward(model, inputs_with_image, ids), dim=-1)
        lu = torch.log_softmax(_forward(model, inputs_without_image, free), dim=-1)
        gamma = math.exp(-lam * t)
        out = lc + (1 - gamma) / gamma * (lc - lu)
        if threshold is not None and lc.exp().max() >= threshold:
            out = lc
        token = out.argmax().view(1, 1)
        tokens.append(int(token))
        scores.append(out)
        ids = torch.cat([ids, token], dim=1)
        free = torch.cat([free, token], dim=1)
    return torch.tensor(tokens), torch.stack(scores)
