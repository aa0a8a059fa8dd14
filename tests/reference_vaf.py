"""A slow reference implementation of VAF (Yin, Si, Wang, "ClearSight: Visual Signal Enhancement for Object
Hallucination Mitigation in Multimodal Large Language Models", CVPR 2025, arXiv 2503.13107), written from the
paper's formula (the choices are those of vlmfix.methods.vaf's docstring): in each VAF layer, every head, every
query row, the pre-softmax scores Z become

    Z' = Z + alpha * M_enh o Z - beta * M_sup o Z

M_enh: the image-token key columns, M_sup: the system-prompt key columns (the prompt's tokens before its first
image token, vision markers excluded); entries the causal mask forbids stay forbidden; then the fp32 softmax.

Deliberately literal and slow: one prompt, full eager attention, a greedy loop with no KV cache (each step re-runs
the whole sequence; with every query row modified a causal model gives the cached run's rows).
"""

from __future__ import annotations

import torch
from reference_attention import routed
from reference_pai import _forward, decoder_layers, image_token_ids

NAME = "vaf_reference"


def vaf_attention_reference(query, key, value, image, system, alpha, beta, scaling=None):
    """Eager causal attention of one layer with VAF. query (1, H, Q, D), key / value (1, KV, K, D); image / system:
    lists of key columns. Returns out (1, Q, H, D) in the query's dtype."""
    _, h, q_len, d = query.shape
    kv_len = key.shape[2]
    rep = h // key.shape[1]
    k = key.repeat_interleave(rep, dim=1).float()
    v = value.repeat_interleave(rep, dim=1).float()
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * (d ** -0.5 if scaling is None else scaling)
    allowed = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]  # (Q, K)
    scores = scores.clone()
    for j in image:
        scores[..., j] = scores[..., j] + alpha * scores[..., j]
    for j in system:
        scores[..., j] = scores[..., j] - beta * scores[..., j]
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).to(query.dtype).transpose(1, 2).contiguous()


class Amplification:
    """The attention function of the reference: VAF in `layers`, plain eager attention elsewhere."""

    def __init__(self, model, layers, alpha, beta, image, system):
        self.index = decoder_layers(model)
        self.layers, self.alpha, self.beta, self.image, self.system = set(layers), alpha, beta, image, system

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        on = self.index[id(module)] in self.layers
        out = vaf_attention_reference(query, key, value, self.image if on else [], self.system if on else [],
                                      self.alpha, self.beta, scaling=scaling)
        return out, None


@torch.no_grad()
def vaf_generate_reference(model, inputs, layers, alpha, beta, steps, markers=()):
    """Greedy VAF decoding of one unpadded prompt for `steps` tokens (no stop at EOS). `markers`: token ids before the
    image that are not system-prompt text (vision start / end). Returns (new token ids (steps,), log-probabilities
    per step (steps, V))."""
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and bool(inputs.get("attention_mask", torch.ones_like(ids)).all()), "one unpadded prompt"
    tokens_of = ids[0].tolist()
    image = [i for i, t in enumerate(tokens_of) if t in image_token_ids(model)]
    system = [i for i in range(image[0]) if tokens_of[i] not in set(markers)]
    attention = Amplification(model, layers, alpha, beta, image, system)
    tokens, scores = [], []
    for _ in range(steps):
        with routed(model, NAME, attention):
            out = torch.log_softmax(_forward(model, inputs, ids), dim=-1)
        token = out.argmax().view(1, 1)
        tokens.append(int(token))
        scores.append(out)
        ids = torch.cat([ids, token], dim=1)
    return torch.tensor(tokens), torch.stack(scores)
