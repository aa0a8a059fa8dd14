"""GIFT: gaze shift-guided cross-modal fusion enhancement ("Capturing Gaze Shifts for Guidance:
Cross-Modal Fusion Enhancement for VLM Hallucination Mitigation", arXiv 2510.22067; specs/gift.md).

Saliency, once per sample from the prompt, at the saliency layer(s) l, over the user-query rows i
(informative words only) and the image columns j:
  dA[l,h,i,j] = max(A[l,h,i,j] - A[l,h,i-1,j], 0)   (a "gaze shift": attention that rises on j;
  after token pruning, i-1 is the nearest earlier token still present)
  per layer keep the top floor(H/2) heads by sum_{i,j} dA; S_j = mean over layers, kept heads and
  kept rows of dA[., ., ., j]; clamp S to mean +- 3 std (population), min-max to [0, 1] -> S_hat
  (0 when flat), M_j = exp(alpha * S_hat_j) in [1, e^alpha].
Boost, in each boost layer on the last query row (each decoding step and the last prompt position):
  top floor(H/2) heads by image attention: A'_hj = A_hj * M_j on image columns;
  r = sum of A' / sum of A over those heads and image columns;
  top floor(H/2) heads by attention to the user-query span: query-span entries times beta * r;
  every modified row renormalised to sum 1. Head selections use the unmodified row.

One prefill suffices when every saliency layer precedes every boost layer; otherwise `attach`
runs a pre-pass over the prompt that stops after the last saliency layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from ..state import CallState
from ..words import informative_tokens
from .base import Method

if TYPE_CHECKING:
    from ..adapters import Adapter


def default_layers(num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The depth rule for models without a preset, scaled from LLaVA-1.5-7B (32 layers: saliency 11,
    boost 12..22): saliency at round(0.34 L), boost from the next layer to round(0.69 L)."""
    sal = max(1, round(0.34 * num_layers))
    return (sal,), tuple(range(sal + 1, max(sal + 2, round(0.69 * num_layers) + 1)))


def half(n: int) -> int:
    """floor(H/2), at least 1."""
    return max(1, n // 2)


@dataclass
class GIFT(Method):
    """GIFT (defaults: the model preset in configs/models; LLaVA-1.5-7B: alpha 5, saliency layer 11,
    boost layers 12..22; models without a preset: `default_layers` and alpha 5).

    - alpha: boost strength, M in [1, e^alpha]; 0 turns GIFT off exactly;
    - saliency_layers / boost_layers: 0-indexed decoder layers (None: preset or depth rule);
    - beta: factor on r for the query-span boost (the paper's beta = 1);
    - use_spacy: informative words by spaCy POS tags (True), the built-in word list (False), or
      spaCy when installed (None).
    """

    alpha: float | None = None
    saliency_layers: Sequence[int] | None = None
    boost_layers: Sequence[int] | None = None
    beta: float = 1.0
    use_spacy: bool | None = None

    name: ClassVar[str] = "gift"

    def validate(self, adapter: "Adapter") -> None:
        preset = (adapter.preset or {}).get("gift")
        n = adapter.num_layers
        if preset:
            lo, hi = preset["boost_layers"]
            sal, boost, alpha = tuple(preset["saliency_layers"]), tuple(range(lo, hi + 1)), preset["alpha"]
        else:
            (sal, boost), alpha = default_layers(n), 5.0
        self.alpha = alpha if self.alpha is None else float(self.alpha)
        self.saliency_layers = tuple(sal if self.saliency_layers is None else self.saliency_layers)
        self.boost_layers = tuple(boost if self.boost_layers is None else self.boost_layers)
        if not self.alpha >= 0:
            raise ValueError(f"GIFT alpha must be >= 0, got {self.alpha}")
        for what, layers in (("saliency_layers", self.saliency_layers), ("boost_layers", self.boost_layers)):
            if not layers:
                raise ValueError(f"GIFT {what} is empty")
            bad = [x for x in layers if not 0 <= x < n]
            if bad:
                raise ValueError(f"GIFT {what} {bad} are outside the model's {n} decoder layers")
        self._sal, self._boost = frozenset(self.saliency_layers), frozenset(self.boost_layers)

    @property
    def needs_prepass(self) -> bool:
        """True when a boost layer comes at or before the last saliency layer."""
        return min(self._boost) <= max(self._sal)

    def prepass_until(self) -> int | None:
        return max(self._sal) if self.alpha > 0 and self.needs_prepass else None

    # -- per call ---------------------------------------------------------------------------
    def on_prefill(self, state: CallState) -> None:
        rows: list[dict[str, Any]] = []
        for row in state.rows:
            info: dict[str, Any] = {"span": row.query_span, "informative": None, "note": ""}
            if not row.has_image:
                info["note"] = row.note
            elif row.query_span is None:
                info["note"] = "no user text after the image: no saliency, no boost"
            else:
                flags = (informative_tokens(row.query_pieces, self.use_spacy) if row.query_pieces is not None
                         else [True] * (row.query_span[1] - row.query_span[0]))
                info["informative"] = torch.tensor(flags, dtype=torch.bool)
                if not any(flags):
                    info["note"] = "no informative word in the question: saliency is flat, attention unchanged"
            rows.append(info)
        state.records[self.name] = {"rows": rows, "saliency": {}, "M": None, "r": {}, "alpha": self.alpha}

    @staticmethod
    def _spans(state: CallState) -> list[tuple[int, int]]:
        """Query spans of the rows with at least one informative token (the rows GIFT can act on)."""
        rows = state.records[GIFT.name]["rows"]
        return [info["span"] for info in rows if info["informative"] is not None and bool(info["informative"].any())]

    def eager_rows(self, state: CallState, layer: int, q_start: int, q_len: int) -> torch.Tensor | None:
        rec = state.records[self.name]
        if not self.alpha or not self._spans(state) or (rec["M"] is not None and all(m is None for m in rec["M"])):
            return None  # nothing to boost: the fast path, exactly
        rows = []
        if layer in self._sal and state.phase in ("prefill", "prepass") and state.records[self.name]["M"] is None:
            spans = self._spans(state)
            before = [state.previous_token(layer, b, info["span"][0]) for b, info in enumerate(rec["rows"])
                      if info["informative"] is not None and bool(info["informative"].any())]
            lo = max(min(before) - q_start, 0)  # from the token before the first span token
            hi = min(max(s[1] for s in spans) - q_start, q_len)
            rows.append(torch.arange(lo, hi))
        if layer in self._boost and state.phase != "prepass":
            rows.append(torch.arange(q_len - 1, q_len) if state.phase == "prefill" else torch.arange(q_len))
        rows = [r for r in rows if len(r)]
        return torch.cat(rows) if rows else None

    def probs(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        rec = state.records[self.name]
        if layer in self._sal and rec["M"] is None and state.phase in ("prefill", "prepass"):
            self._gaze_shifts(state, layer, positions, probs)
        if layer in self._boost and state.phase != "prepass":
            if rec["M"] is None:
                rec["M"] = self._boost_map(state)
            probs = self._boost_rows(state, layer, positions, probs)
        return probs

    # -- saliency ---------------------------------------------------------------------------
    def _gaze_shifts(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> None:
        rec = state.records[self.name]
        per_row = rec["saliency"].setdefault(layer, {})
        where = {int(p): k for k, p in enumerate(positions.tolist())}
        for info, row in zip(rec["rows"], state.rows):
            flags = info["informative"]
            if flags is None or not bool(flags.any()):
                continue
            start, end = info["span"]
            kept = [i for i, f in zip(range(start, end), flags.tolist()) if f]
            cur = torch.tensor([where[i] for i in kept])
            before = state.previous_token(layer, row.index, start)  # pruning may have removed start - 1
            prev = torch.tensor([where[i - 1 if i > start else before] for i in kept])
            image = row.image_positions.to(probs.device)
            a = probs[row.index][:, :, image]  # (H, R, N_img)
            shift = (a[:, cur] - a[:, prev]).clamp_min(0)  # (H, kept rows, N_img)
            heads = shift.sum((1, 2)).topk(half(shift.shape[0])).indices
            per_row[row.index] = shift[heads].mean((0, 1)).cpu()  # (N_img,)

    def _boost_map(self, state: CallState) -> list[torch.Tensor | None]:
        """Per batch row, M over its image tokens (None: no boost for that row)."""
        rec = state.records[self.name]
        maps: list[torch.Tensor | None] = []
        for row in state.rows:
            parts = [rec["saliency"][layer][row.index] for layer in sorted(rec["saliency"])
                     if row.index in rec["saliency"][layer]]
            if not parts:
                maps.append(None)
                continue
            s = torch.stack(parts).mean(0)
            mean, std = s.mean(), s.std(unbiased=False)
            s = s.clamp(float(mean - 3 * std), float(mean + 3 * std))
            lo, hi = s.min(), s.max()
            if not hi > lo:  # S_hat = 0 everywhere, M = 1: nothing to boost
                rec["rows"][row.index]["note"] = "flat saliency (max == min): no boost"
                rec["rows"][row.index]["saliency"] = torch.zeros_like(s)
                maps.append(None)
                continue
            s_hat = (s - lo) / (hi - lo)
            rec["rows"][row.index]["saliency"] = s_hat
            maps.append(torch.exp(self.alpha * s_hat))
        return maps

    # -- boost ------------------------------------------------------------------------------
    def _boost_rows(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The boost on the rows at the last prompt position (prefill) or every row (decode), all
        batch rows at once; rows without a map are left as they are."""
        rec = state.records[self.name]
        if state.phase == "decode":
            k = slice(None)
        else:
            hit = (positions == state.prompt_len - 1).nonzero().flatten()
            if not len(hit):
                return probs
            k = slice(int(hit[0]), int(hit[0]) + 1)
        image, span, m, has_map = self._boost_masks(state, probs.device)  # (B, 1, 1, P) x 3, (B,)
        prompt = image.shape[-1]
        a = probs[:, :, k, :prompt]  # (B, H, R, P)
        heads = probs.shape[1]
        top = half(heads)
        vis = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)  # (B, H, R)
        vis.scatter_(1, (a * image).sum(-1).topk(top, dim=1).indices, True)
        qry = torch.zeros_like(vis)
        qry.scatter_(1, (a * span).sum(-1).topk(top, dim=1).indices, True)
        boosted = torch.where(vis[..., None], a * m, a)
        on_image = (vis[..., None] * image)
        ratio = (boosted * on_image).sum((1, 3)) / (a * on_image).sum((1, 3)).clamp_min(1e-30)  # (B, R)
        scaled = torch.where((qry[..., None] * span) > 0, boosted * (self.beta * ratio)[:, None, :, None], boosted)
        touched = (vis | qry) & has_map[:, None, None]
        rest = probs[:, :, k, prompt:]
        total = scaled.sum(-1, keepdim=True) + rest.sum(-1, keepdim=True)
        probs[:, :, k, :prompt] = torch.where(touched[..., None], scaled / total, a)
        probs[:, :, k, prompt:] = torch.where(touched[..., None], rest / total, rest)
        rec["r"].setdefault(layer, []).append(ratio.cpu())
        return probs

    def _boost_masks(self, state: CallState, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(B, 1, 1, P) image and query-span masks and M (1 outside the image); (B,) rows with a map."""
        rec = state.records[self.name]
        if "masks" not in rec:
            image = state.image_mask(device).float()
            span = torch.zeros_like(image)
            m = torch.ones_like(image)
            for row, mb in zip(state.rows, rec["M"]):
                if mb is not None:
                    m[row.index, row.image_positions] = mb.to(device)
                    start, end = rec["rows"][row.index]["span"]
                    span[row.index, start:end] = 1.0
            has_map = torch.tensor([mb is not None for mb in rec["M"]], device=device)
            rec["masks"] = (image[:, None, None], span[:, None, None], m[:, None, None], has_map)
        return rec["masks"]

    @staticmethod
    def saliency(state: CallState, row: int = 0) -> torch.Tensor | None:
        """S_hat over the image tokens of batch row `row` (None when that row got no saliency)."""
        rec = state.records.get(GIFT.name)
        return None if rec is None else rec["rows"][row].get("saliency")
