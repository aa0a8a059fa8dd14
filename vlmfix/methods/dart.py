"""DART: duplication-aware reduction of tokens (Wen et al., 2025, "Stop Looking for Important Tokens in
Multimodal Language Models: Duplication Matters More", arXiv 2502.11494).

Instead of ranking image tokens by importance (attention), DART keeps the tokens that duplicate a few
*pivot* tokens least. At decoder layer K (the paper's K = 2), from the hidden states h entering that
layer, for batch row b with image tokens I and text after its image T (up to its last real token):

    pivots   P = the `image_pivots` tokens of I with the largest ||h_j||_1
               + the `text_pivots` tokens of T with the largest ||h_j||_1
    dup_j    = max_{p in P} cos(h_j, h_p)                                  (j in I, not an image pivot)
    kept     = the image pivots + the (budget - image pivots) tokens of I with the smallest dup_j

and the other image tokens are dropped from layer K on (the budget is FastV's: `keep` tokens or
`keep_ratio` of the row's image tokens; with a budget below the image pivots, the pivots with the
largest norms). The choice is made once, at the prefill; decoding steps carry no DART work.

Choices where the paper leaves room (also in docs/methods.md, "DART"):
- the pivot rule: the paper compares several norms and picks pivots by a token norm; here the L1 norm
  of the hidden states entering layer K (no extra projection), 4 image and 4 text pivots, the text
  ones taken from the row's text after its image (its question and the rest of the prompt);
- "least duplicated" as one ranking by the largest cosine similarity to any pivot (order-free and
  exact), rather than a greedy pass per pivot;
- the pivots themselves are kept (they are tokens the ranking would never keep: their own duplication
  is 1).

Forms (`vlmfix.methods.prune`): "inplace" removes the dropped tokens from the hidden states and the KV
cache from layer K on (speed); "mask" masks them out as keys and runs under a static cache (compiled
generation). Both choose the same tokens; the record is a `PruneRecord` (kept tokens per row, the
duplication scores -dup_j, pivots at +1). No attention is read, so `Debias` does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.core.state import CallState, RowLayout
from vlmfix.methods.base import MethodConfig, check_choice, is_int, raise_problems
from vlmfix.methods.prune import (FASTV_LAYER, FORMS, HiddenInPlaceCall, HiddenMaskCall, HiddenStates, KeepRuntime, RowChoice,
                                  keep_problems)
from vlmfix.methods.registry import register_method

#: the paper's pivot counts (image tokens, text tokens)
IMAGE_PIVOTS, TEXT_PIVOTS = 4, 4


def dart_choice(image: torch.Tensor, text: torch.Tensor, budget: int, image_pivots: int = IMAGE_PIVOTS,
                text_pivots: int = TEXT_PIVOTS) -> tuple[torch.Tensor, torch.Tensor]:
    """DART on one row: `image` (N, D) and `text` (T, D) hidden states -> (the kept offsets among the N image
    tokens, sorted; each image token's score: -dup_j, +1 for an image pivot). See the module docstring."""
    x = image.float()
    n = len(x)
    norms = x.abs().sum(-1)
    img_piv = torch.topk(norms, min(image_pivots, n)).indices
    if budget <= len(img_piv):
        return img_piv[:budget].sort().values, _scores(n, img_piv, None)
    pivots = x[img_piv]
    if text_pivots and len(text):
        t = text.float()
        pivots = torch.cat([pivots, t[torch.topk(t.abs().sum(-1), min(text_pivots, len(t))).indices]])
    unit = torch.nn.functional.normalize(x, dim=-1)
    dup = (unit @ torch.nn.functional.normalize(pivots, dim=-1).T).amax(-1)  # (N,)
    scores = _scores(n, img_piv, dup)
    return torch.topk(scores, budget).indices.sort().values, scores


def _scores(n: int, pivots: torch.Tensor, dup: torch.Tensor | None) -> torch.Tensor:
    """-dup (0 without it) with the image pivots at +2 (above any -dup: they are kept first)."""
    scores = torch.zeros(n) if dup is None else -dup.cpu()
    scores[pivots.cpu()] = 2.0
    return scores


class DARTRuntime(KeepRuntime):
    """DART bound to a model: one stage at layer K, chosen from the hidden states entering it."""

    scoring = HiddenStates()
    forms = {"mask": HiddenMaskCall, "inplace": HiddenInPlaceCall}
    first_layer = 0

    def choose(self, state: CallState, row: RowLayout, hidden: torch.Tensor, budget: int) -> RowChoice:
        img = row.image_positions
        after = row.after_image
        text = hidden[after:row.last + 1] if after is not None else hidden[:0]
        cfg = self.config
        offsets, scores = dart_choice(hidden[img.to(hidden.device)], text, budget, cfg.image_pivots, cfg.text_pivots)
        return RowChoice(img[offsets.cpu()], scores)


@dataclass
class DART(MethodConfig):
    """DART (paper: layer K = 2; 4 image + 4 text pivots; budgets of 64 / 128 / 192 of LLaVA-1.5's 576).

    - layer: K; the choice reads the hidden states entering layer K and drops tokens from K on (0 chooses
      from the input embeddings, before the decoder);
    - keep: image tokens kept per image row (128 when neither keep nor keep_ratio is given); or keep_ratio in
      (0, 1] of each row's image tokens (not both);
    - image_pivots, text_pivots: the pivots, by the L1 norm of the hidden states (image pivots are kept);
    - form: "inplace" (speed) or "mask" (the form that runs under a static cache / compiled generation).
    """

    layer: int = FASTV_LAYER
    keep: int | None = None
    keep_ratio: float | None = None
    image_pivots: int = IMAGE_PIVOTS
    text_pivots: int = TEXT_PIVOTS
    form: str = "inplace"

    default_keep: ClassVar[int] = 128

    def __post_init__(self) -> None:
        raise_problems("DART", [
            f"layer must be an int >= 0, got {self.layer!r}" if not is_int(self.layer) or self.layer < 0 else None,
            *keep_problems(self.keep, self.keep_ratio),
            None if is_int(self.image_pivots) and self.image_pivots >= 1 else
            f"image_pivots must be an int >= 1, got {self.image_pivots!r}",
            None if is_int(self.text_pivots) and self.text_pivots >= 0 else
            f"text_pivots must be an int >= 0, got {self.text_pivots!r}",
            check_choice("form", self.form, FORMS),
        ])

    def stage_layers(self) -> tuple[int, ...]:
        return (int(self.layer),)


__all__ = ["DART", "DARTRuntime", "dart_choice"]

register_method(name="dart", config=DART, runtime=DARTRuntime,
                summary="DART (Wen et al., 2025): keep the image tokens least duplicated by a few pivot tokens, "
                        "at layer 2")
