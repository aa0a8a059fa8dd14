"""A slow reference implementation of PAI (Liu, Zheng, Chen, "Paying More Attention to Image: A Training-Free
Method for Alleviating Hallucination in LVLMs", ECCV 2024, arXiv 2407.21771), written from the paper's formulas
(the choices are those of vlmfix.methods.pai's docstring; written from the paper's summaries, the PDF unavailable):

1. inference intervention: in each intervened decoder layer, every head, the pre-softmax attention scores A of
   the chosen query rows (by default the last row only: the token being generated) at the image-token key
   columns become  A + alpha * |A|  (entries the mask forbids stay forbidden), then the fp32 softmax;
2. image-centric logit refine: a second, image-free forward (the same prompt without the image tokens, no
   intervention) and, in log-probabilities,
       out = gamma * log p(y | X_V, X_I, X_H) - (gamma - 1) * log p(y | X_I, X_H)
   with the adaptive plausibility cut: tokens whose image-conditioned probability is below
   beta * (its maximum) get -inf.

Deliberately literal and slow: one prompt, a greedy loop with no KV cache (each step re-runs the whole
sequence: with the intervention on the last row only, or on every row, a causal model gives the same
rows as a cached run), two model calls per step. Pure PyTorch plus transformers' AttentionInterface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference_attention import routed

NAME = "pai_reference"


def pai_attention_reference(query, key, value, mask, image_positions, alpha, last_only=True, scaling=None):
    """Eager attention of one layer with PAI's excitation of the image-key scores.

    query (B, H, Q, D), key / value (B, KV, K, D) (grouped heads: query head h reads key head h // (H / KV));
    mask: None (plain causal, the queries being the last Q of the K positions), a 4-D bool mask (True = attend)
    or a 4-D additive float mask (B or 1, 1, Q, >= K); image_positions: the image tokens' key columns, one
    1-D sequence for every batch row or a list of one per row; last_only: excite the last query row alone
    (the generated token), else every row. Returns (out (B, Q, H, D) in the query's dtype, probs (B, H, Q, K) fp32).
    """
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    rep = h // key.shape[1]
    k = key.repeat_interleave(rep, dim=1).float()
    v = value.repeat_interleave(rep, dim=1).float()
    scale = d ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale  # (B, H, Q, K): the pre-softmax A
    low = torch.finfo(torch.float32).min
    if mask is None:
        q_start = kv_len - q_len
        allowed = torch.arange(kv_len)[None, :] <= torch.arange(q_start, kv_len)[:, None]
        allowed = allowed[None, None].expand(b, 1, q_len, kv_len)
        additive = torch.zeros(b, 1, q_len, kv_len)
    else:
        m = mask[:, :, :, :kv_len]
        if m.dtype == torch.bool:
            allowed = m
            additive = torch.zeros(m.shape)
        else:
            additive = m.float().clamp(min=low)
            allowed = additive > low
        allowed = allowed.expand(b, 1, q_len, kv_len)
        additive = additive.expand(b, 1, q_len, kv_len)
    scores = scores.clone()
    rows = [q_len - 1] if last_only else list(range(q_len))
    per_row = isinstance(image_positions, (list, tuple)) and len(image_positions) > 0 and \
        not isinstance(image_positions[0], int) and torch.as_tensor(image_positions[0]).dim() == 1
    for bi in range(b):
        cols = image_positions[bi] if per_row else image_positions
        for i in rows:
            for j in [int(c) for c in cols]:
                if not bool(allowed[bi, 0, i, j]):  # a forbidden entry stays forbidden
                    continue
                for hi in range(h):
                    s = scores[bi, hi, i, j]
                    scores[bi, hi, i, j] = s + alpha * s.abs()
    scores = (scores + additive).masked_fill(~allowed, low)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # (B, H, Q, D)
    return out.to(query.dtype).transpose(1, 2).contiguous(), probs


def decoder_layers(model):
    """{id(attention module): layer index} over the text decoder's layers."""
    return {id(layer.self_attn): i for i, layer in enumerate(model.get_decoder().layers)}


def image_token_ids(model) -> set[int]:
    config = model.config
    names = ("image_token_id", "image_token_index")
    return {int(v) for v in (getattr(config, n, None) for n in names) if v is not None}


class Intervention:
    """The attention function of the image-conditioned forward: PAI in `layers`, plain eager elsewhere."""

    def __init__(self, model, layers, alpha, last_only=True):
        self.index = decoder_layers(model)
        self.layers, self.alpha, self.last_only = set(layers), alpha, last_only
        self.image_positions = None  # set before each forward: the image tokens' positions of the sequence

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = self.index[id(module)]
        alpha = self.alpha if layer in self.layers else 0.0
        out, _ = pai_attention_reference(query, key, value, attention_mask, self.image_positions, alpha,
                                         last_only=self.last_only, scaling=scaling)
        return out, None


def _forward(model, inputs, ids):
    """Last-position logits (fp32) of a full, cache-free forward of `inputs` with input_ids `ids` (1, N)."""
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kw["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in inputs:  # Qwen2-VL: which tokens are the image's (the text it generated is not)
        extra = ids.shape[1] - inputs["mm_token_type_ids"].shape[1]
        kw["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, extra))
    return model(input_ids=ids, use_cache=False, **kw).logits[0, -1].float()


def combine(img_logits, noimg_logits, gamma, beta):
    """PAI's image-centric logit refine in log-probabilities, with the adaptive plausibility cut on the
    image-conditioned distribution (beta = 0: no cut; gamma = 1: the image-conditioned log-probabilities)."""
    lp_img = torch.log_softmax(img_logits, dim=-1)
    out = lp_img if noimg_logits is None else gamma * lp_img - (gamma - 1) * torch.log_softmax(noimg_logits, dim=-1)
    if beta > 0:
        out = out.masked_fill(lp_img < lp_img.max() + torch.log(torch.tensor(beta)), float("-inf"))
    return out


@torch.no_grad()
def pai_generate_reference(model, inputs_with_image, inputs_without_image, layers, alpha, gamma, beta, steps,
                           last_only=True):
    """Greedy PAI decoding of one prompt for `steps` tokens (no stop at EOS).

    inputs_with_image: processor output for the prompt with its image (input_ids (1, N), pixel inputs);
    inputs_without_image: the same prompt without the image (input_ids (1, N'), no pixel inputs) or None
    (no contrast; with gamma = 1 the second call is skipped too). Per step: the image forward with the
    PAI attention in `layers` (alpha; last_only as `pai_attention_reference`), the image-free forward with
    the model's plain attention, `combine`, argmax; the token is appended to both sequences.
    Returns (new token ids (steps,), combined log-probabilities per step (steps, V)).
    """
    assert inputs_with_image["input_ids"].shape[0] == 1, "one prompt at a time"
    ids = inputs_with_image["input_ids"]
    image = torch.isin(ids[0], torch.tensor(sorted(image_token_ids(model)))).nonzero().flatten()
    free = None if inputs_without_image is None or gamma == 1 else inputs_without_image["input_ids"]
    attention = Intervention(model, layers, alpha, last_only)
    attention.image_positions = image  # the image sits in the prompt: its key columns never move
    tokens, scores = [], []
    for _ in range(steps):
        with routed(model, NAME, attention):
            img_logits = _forward(model, inputs_with_image, ids)
        noimg_logits = None if free is None else _forward(model, inputs_without_image, free)
        out = combine(img_logits, noimg_logits, gamma, beta)
        token = out.argmax().view(1, 1)
        tokens.append(int(token))
        scores.append(out)
        ids = torch.cat([ids, token], dim=1)
        if free is not None:
            free = torch.cat([free, token], dim=1)
    return torch.tensor(tokens), torch.stack(scores)
