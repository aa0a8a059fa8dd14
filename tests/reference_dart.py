"""Slow references for DART (Wen et al., 2025, arXiv 2502.11494) and the pruning controls (random, pool), written
from the paper / the controls' definitions (the choices are those of vlmfix.methods.dart's and
vlmfix.methods.controls' docstrings), deliberately literal: Python loops over tokens, one prompt at a time,
and a decoder run layer by layer by hand.

- `dart_choice_reference`: the pivots (largest L1 norms), each image token's duplication (its largest cosine
  similarity to a pivot, computed as a plain sum of products) and the kept tokens;
- `pooled_groups_reference`: the blocks of one grid pooled to a budget, by looping over its cells;
- `decoder_reference`: the tiny LLaVA's decoder run by hand, layer by layer, over the full prompt until layer
  K, where the chosen image tokens alone go on (with their original positions): DART's pruned model;
- `fed_only_reference`: the language model fed only the kept (or pooled) input embeddings, at their original
  positions: the controls' pruned model (they act before the decoder).
"""

from __future__ import annotations

import math

import torch


def _l1(v: list[float]) -> float:
    return sum(abs(x) for x in v)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-12)


def dart_choice_reference(image: torch.Tensor, text: torch.Tensor, budget: int, image_pivots: int = 4,
                          text_pivots: int = 4) -> list[int]:
    """The offsets (sorted) of the image tokens DART keeps among `image` (N, D), with the text `text` (T, D)."""
    img = image.double().tolist()
    txt = text.double().tolist()
    by_norm = sorted(range(len(img)), key=lambda j: -_l1(img[j]))
    pivots_at = by_norm[:image_pivots]
    if budget <= len(pivots_at):
        return sorted(pivots_at[:budget])
    pivots = [img[j] for j in pivots_at] + [txt[j] for j in sorted(range(len(txt)), key=lambda j: -_l1(txt[j]))
                                            [:text_pivots]]
    duplication = {j: max(_cos(img[j], p) for p in pivots) for j in range(len(img)) if j not in pivots_at}
    rest = sorted(duplication, key=lambda j: duplication[j])[:budget - len(pivots_at)]
    return sorted(pivots_at + rest)


def pooled_groups_reference(rows: int, cols: int, budget: int) -> list[list[tuple[int, int]]]:
    """The blocks (lists of (row, col) cells, raster order) of a rows x cols grid (no newlines) pooled to at most
    `budget` tokens: r' block rows = round(rows sqrt(budget / (rows cols))) in 1 .. rows, c' = budget // r' in
    1 .. cols; block (i, j) holds the cells whose row lies in [i rows / r', (i + 1) rows / r') (floors), columns
    alike."""
    r = min(rows, max(1, round(rows * math.sqrt(budget / (rows * cols)))))
    c = min(cols, max(1, budget // r))
    if r * c > budget:
        r = max(1, budget // c)
    blocks = []
    for i in range(r):
        for j in range(c):
            cells = [(y, x) for y in range(rows) for x in range(cols)
                     if i * rows // r <= y < (i + 1) * rows // r and j * cols // c <= x < (j + 1) * cols // c]
            blocks.append(cells)
    return blocks


@torch.no_grad()
def input_embeddings(model, batch: dict) -> torch.Tensor:
    """(1, P, D): the decoder's input embeddings of one prompt (the image features scattered in)."""
    got = {}

    def keep(module, args, kwargs):
        got["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    layer0 = model.model.language_model.layers[0]
    handle = layer0.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    return got["h"]


def _run_layers(lm, h: torch.Tensor, pos: torch.Tensor, layers) -> torch.Tensor:
    """Decoder `layers` of a Llama-style model over h (1, S, D) at positions pos (1, S), causal by position."""
    allowed = (pos[0][None, :] <= pos[0][:, None])[None, None]  # (1, 1, S, S): key position <= query position
    for layer in layers:
        pe = lm.rotary_emb(h, pos)
        out = layer(h, attention_mask=allowed, position_ids=pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return h


@torch.no_grad()
def decoder_reference(model, batch: dict, image_positions: torch.Tensor, layer: int, choose) -> tuple[list[int], torch.Tensor]:
    """One prompt (no padding) through the tiny LLaVA's decoder by hand: every token through layers 0 .. K-1, then
    `choose(hidden (P, D))` -> the kept image positions, and only the text and those go on through layers K ..
    (original positions). Returns (the kept image positions, the last position's logits (V,))."""
    lm = model.model.language_model
    h = input_embeddings(model, batch)
    p = h.shape[1]
    pos = torch.arange(p)[None]
    h = _run_layers(lm, h, pos, lm.layers[:layer])
    kept = sorted(int(x) for x in choose(h[0]))
    keep = sorted(set(range(p)) - set(image_positions.tolist()) | set(kept))
    h, pos = h[:, keep], pos[:, keep]
    h = _run_layers(lm, h, pos, lm.layers[layer:])
    return kept, model.lm_head(lm.norm(h))[0, -1]


@torch.no_grad()
def fed_only_reference(model, batch: dict, image_positions: torch.Tensor, groups: dict[int, list[int]]) -> torch.Tensor:
    """One prompt: the language model fed only the text and the kept image tokens' input embeddings, each kept one
    the mean of its group (`groups`: kept position -> the positions merged into it; every kept image position is
    a key), at their original positions. Returns the last position's logits (V,)."""
    emb = input_embeddings(model, batch)[0]
    p = emb.shape[0]
    keep = sorted(set(range(p)) - set(image_positions.tolist()) | set(groups))
    rows = []
    for position in keep:
        members = [position, *groups.get(position, [])]
        total = torch.zeros(emb.shape[1], dtype=torch.float64)
        for m in members:
            total += emb[m].double()
        rows.append((total / len(members)).to(emb.dtype))
    lm = model.model.language_model
    h = _run_layers(lm, torch.stack(rows)[None], torch.tensor(keep)[None], lm.layers)
    return model.lm_head(lm.norm(h))[0, -1]
