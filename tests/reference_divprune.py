"""Slow reference of DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175), written from the paper: the greedy
solution of the Max-Min Diversity Problem over the cosine distances of the image features, with literal loops,
and the model fed only the kept tokens (one prompt at a time)."""

from __future__ import annotations

import math

import torch


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return 1.0 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def divprune_select(features: torch.Tensor, k: int) -> list[int]:
    """The paper's greedy: the first token maximises its minimum distance to every other token; each next one
    maximises its minimum distance to the tokens selected so far (ties: the lower index). In selection order."""
    v = features.double().tolist()
    n = len(v)
    d = [[cosine_distance(v[i], v[j]) for j in range(n)] for i in range(n)]
    if n == 1:
        return [0]
    first = max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][s] for s in chosen), -i)))
    return chosen


@torch.no_grad()
def layer0_inputs(model, batch: dict) -> torch.Tensor:
    """(1, P, D): the hidden states entering decoder layer 0 of the plain model (text embeddings and image
    features) for a one-prompt batch."""
    seen = {}

    def keep(mod, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    layer = model.model.language_model.layers[0]
    hook = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model(**batch)
    finally:
        hook.remove()
    return seen["h"]


@torch.no_grad()
def kept_model_logits(model, embeds: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(S, V): the logits of the language model fed only the sequence positions `kept` (S,) of `embeds` (1, P, D),
    each at its original position (a Llama-style decoder with 1-D positions)."""
    out = model.model.language_model(inputs_embeds=embeds[:, kept], position_ids=kept[None])
    return model.lm_head(out.last_hidden_state)[0]
