"""A slow reference implementation of VCD (Leng et al., "Mitigating Object Hallucinations in Large Vision-Language
Models through Visual Contrastive Decoding", CVPR 2024, arXiv 2311.16922), written from the paper's formulas:

1. the distorted image v' = the forward diffusion of the image v after T steps,
       q(v_t | v_{t-1}) = N(sqrt(1 - beta_t) v_{t-1}, beta_t I),  so  v_T = sqrt(abar_T) v + sqrt(1 - abar_T) eps,
   abar_T = prod_{t <= T} (1 - beta_t) (`abar` below computes the product step by step);
2. at every step, two model calls: logits l on (v, x, y_<t) and l' on (v', x, y_<t), then
       p_vcd = softmax[(1 + alpha) l - alpha l'],
   restricted to V_head = {y : p(y | v, x) >= beta max_w p(w | v, x)} (others get probability 0).

The noise sample eps is vlmfix's seeded draw (`vlmfix.core.contrast.diffusion_noise` at the same step and seed:
the random draw is an input of the method, like a seed); test_vcd checks its scale against `abar` here.
Deliberately literal and slow: one prompt, a loop with no KV cache (each step re-runs the whole sequence), two
model calls per step. Greedy (argmax) or sampling (`sample`: torch.multinomial of p_vcd, a draw per step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def abar(step: int, steps: int = 1000) -> float:
    """prod over the steps 0..step of (1 - beta_t), beta_t = 1e-5 + (5e-3 - 1e-5) sigmoid(-6 + 12 t / (steps - 1))
    (the VCD authors' published schedule; the paper leaves it unspecified)."""
    out = 1.0
    for t in range(step + 1):
        s = -6 + 12 * t / (steps - 1)
        out *= 1 - (1e-5 + (5e-3 - 1e-5) / (1 + math.exp(-s)))
    return out


def forward_last(model, inputs, ids):
    """Last-position logits (fp32) of a full, cache-free forward of `inputs` with input_ids `ids` (1, N)."""
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kw["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in inputs:  # Qwen2-VL: which tokens are the image's (the generated text is not)
        extra = ids.shape[1] - inputs["mm_token_type_ids"].shape[1]
        kw["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, extra))
    return model(input_ids=ids, use_cache=False, **kw).logits[0, -1].float()


def contrast(logits, other, alpha, beta):
    """(1 + alpha) l - alpha l', -inf outside V_head = {p >= beta max p} of softmax(l)."""
    out = (1 + alpha) * logits - alpha * other
    p = torch.softmax(logits, dim=-1)
    return out.masked_fill(p < beta * p.max(), float("-inf")) if beta > 0 else out


@torch.no_grad()
def contrast_generate_reference(model, inputs, other_inputs, alpha, beta, steps, sample=False):
    """Contrastive decoding of one prompt for `steps` tokens (no stop at EOS): per step the model on `inputs` and
    on `other_inputs` (the contrasted prompt: its own input_ids), `contrast`, argmax (or a draw); the token is
    appended to both. Returns (token ids (steps,), the contrasted logits per step (steps, V))."""
    assert inputs["input_ids"].shape[0] == 1, "one prompt at a time"
    ids, other = inputs["input_ids"], other_inputs["input_ids"]
    tokens, scores = [], []
    for _ in range(steps):
        out = contrast(forward_last(model, inputs, ids), forward_last(model, other_inputs, other), alpha, beta)
        token = torch.multinomial(torch.softmax(out, -1), 1).view(1, 1) if sample else out.argmax().view(1, 1)
        tokens.append(int(token))
        scores.append(out)
        ids, other = torch.cat([ids, token], dim=1), torch.cat([other, token], dim=1)
    return torch.tensor(tokens), torch.stack(scores)


def vcd_generate_reference(model, inputs, alpha, beta, noise_step, seed, steps, sample=False):
    """VCD of one prompt: the contrasted prompt is the same on the noised image."""
    from vlmfix.core.contrast import diffusion_noise

    noised = dict(inputs)
    noised["pixel_values"] = diffusion_noise(inputs["pixel_values"], noise_step, seed, inputs.get("image_grid_thw"))
    return contrast_generate_reference(model, inputs, noised, alpha, beta, steps, sample)
