"""A slow, literal OPERA (Huang et al., CVPR 2024) written from the paper: one prompt, a plain Python beam
search, every beam re-run from scratch at every step with full eager attention (no KV cache), the window's
column products multiplied out one by one, the roll-back restoring Python lists.

Settings as vlmfix.methods.opera documents them (its choices where the paper leaves room): the penalty of a
beam is phi of the window that ends at its last generated token, the attention is the maximum over heads (the
mean over `layers`), the overlap check is r consecutive steps of the best beam. EOS never stops it (the tests
clear the model's eos), so the answer is the best beam after `steps` tokens.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

LOG_CAP = 69.0


@contextmanager
def eager(model):
    """The model with eager attention everywhere (its attention weights returned), put back after."""
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def prompt_embeddings(model, inputs: dict) -> torch.Tensor:
    """The prompt's input embeddings with the image features merged in, as the language model receives them."""
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        hook.remove()
    return seen["embeds"]


def full_forward(model, inputs: dict, tokens: list[int], embeds: torch.Tensor | None):
    """(next-token log-probs, attentions per layer (H, S, S)) of the prompt followed by `tokens`. With `embeds`
    (the prompt's merged embeddings) the generated tokens are embedded after them (so a generated id that is
    the image token stays text); without, the ids run through the whole model (Qwen2-VL, whose token types
    mark the image)."""
    new = torch.tensor([tokens], dtype=torch.long)
    if embeds is not None:
        x = torch.cat([embeds, model.get_input_embeddings()(new)], 1)
        out = model(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long), output_attentions=True,
                    use_cache=False)
    else:
        ids = torch.cat([inputs["input_ids"], new], 1)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        types = inputs["mm_token_type_ids"]
        extra["mm_token_type_ids"] = torch.cat([types, torch.zeros(1, len(tokens), dtype=types.dtype)], 1)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, use_cache=False,
                    **extra)
    return torch.log_softmax(out.logits[0, -1].float(), -1), [a[0].float() for a in out.attentions]


def window_score(omega: list[list[float]], t: int, sigma: float, window: int | None) -> tuple[float, int]:
    """(phi, c) of the window ending at generated token t - 1: the largest column product
    prod_{i=c}^{t-1} sigma * omega[i][c] over the window's columns, and its column."""
    first = 0 if window is None else max(0, t - window)
    best, where = -math.inf, first
    for c in range(first, t):
        log_product = 0.0
        for i in range(c, t):
            value = sigma * omega[i][c]
            log_product += math.log(value) if value > 0 else -math.inf
        if log_product > best:
            best, where = log_product, c
    return best, where


def attention_rows(attentions, layers, prompt_len: int, t: int) -> list[list[float]]:
    """omega[i][j]: generated token i's attention on generated token j (max over heads, mean over layers)."""
    a = torch.stack([attentions[layer].amax(0) for layer in layers]).mean(0)
    return a[prompt_len:prompt_len + t, prompt_len:prompt_len + t].tolist()


def opera_reference(model, inputs: dict, layers, *, steps: int, num_beams: int = 5, sigma: float = 50.0,
                    alpha: float = 1.0, candidates: int = 5, window: int | None = None,
                    threshold: int | None = 15, max_rollbacks: int = 5) -> tuple[list[int], list[tuple[int, int]]]:
    """(the best beam's generated tokens, the roll-backs as (summary position, generated length then))."""
    prompt_len = inputs["input_ids"].shape[1]
    beams = [([], 0.0)]  # (generated tokens, score), best first
    history: dict[int, tuple[list, list, set]] = {}  # generated length -> (beams, table, banned (beam, token))
    rollbacks: list[tuple[int, int]] = []
    last_back = -1
    with eager(model), torch.no_grad():
        embeds = None if "mm_token_type_ids" in inputs else prompt_embeddings(model, inputs)
        while len(beams[0][0]) < steps:
            t = len(beams[0][0])
            table, best_attention = [], None
            for j, (tokens, score) in enumerate(beams):
                log_probs, attentions = full_forward(model, inputs, tokens, embeds)
                penalty = 0.0
                if t > 0 and alpha > 0:
                    log_phi, _ = window_score(attention_rows(attentions, layers, prompt_len, t), t, sigma, window)
                    penalty = alpha * math.exp(min(log_phi, LOG_CAP))
                top, ids = torch.topk(log_probs, candidates)
                table += [(score + float(v) - penalty, j, int(tok)) for v, tok in zip(top, ids)]
                if j == 0:
                    best_attention = attentions
            history[t] = (beams, table, set())
            banned: set = set()
            if threshold is not None and 0 < t and len(rollbacks) < max_rollbacks and t >= threshold:
                omega = attention_rows(best_attention, layers, prompt_len, t)
                places = {window_score(omega, p, sigma, window)[1] for p in range(t - threshold + 1, t + 1)}
                s = next(iter(places))
                if len(places) == 1 and s + 1 < t and s >= last_back:
                    top_tokens = beams[0][0]
                    m = s + 1
                    old_beams, table, banned = history[m]
                    parent = next(j for j, (tokens, _) in enumerate(old_beams) if tokens == top_tokens[:m])
                    banned.add((parent, top_tokens[m]))
                    rollbacks.append((s, t))
                    last_back = s
                    beams = old_beams
            ranked = sorted((row for row in table if (row[1], row[2]) not in banned), key=lambda row: -row[0])
            beams = [(beams[j][0] + [tok], score) for score, j, tok in ranked[:num_beams]]
    return beams[0][0], rollbacks
