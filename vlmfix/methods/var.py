"""VAR: Visual Attention Redistribution (Kang et al., "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025; specs/var.md).

For one batch row, layer l, query head h and query row i, with post-softmax fp32 attention A,
image positions I, sinks S_l (phi > tau over the prompt), visual sinks V_l = S_l & I and visual
non-sinks N_l = I \\ V_l:

- image-centric iff V_l is not empty, r = 1 - sum_V A / (sum_I A + 1e-6) >= rho and
  m = sum_I A >= m_min;
- then, with p the fraction of sink attention moved (the paper's semantics):
  A'_j = (1 - p) A_j for j in the source set (S_l, or V_l with sources="visual"),
  Omega = p * sum_{sources} A, and A'_j = A_j + Omega * A_j / sum_N A for j in N_l;
  nothing moves when sum_N A = 0. Rows still sum to 1.

Applies in layers 2 .. L-2 (or `layers`), on prefill rows from the first token after the last
image token to the end of the prompt, and on every decoding step. The released reference code
multiplies sinks by p and moves 1 - p (its "p = 0.6" moves 40%); vlmfix follows the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from ..state import CallState
from .base import Method

if TYPE_CHECKING:
    from ..adapters import Adapter


@dataclass
class VAR(Method):
    """Visual attention redistribution (paper defaults: tau 20, rho 0.5, p 0.6, m_min 0.2).

    - tau: sink threshold on phi (number, "scaled", "bos:F"; None = the one attach resolved for
      the model, i.e. its preset);
    - rho: minimum visual non-sink ratio of an image-centric head (0.5 hallucination benchmarks,
      0.8 general tasks, 0.9 vision-centric tasks);
    - p: fraction of the sinks' attention moved to the visual non-sinks;
    - m_min: minimum attention mass on the image of an image-centric head;
    - sources: "all" (text and visual sinks give attention, the paper) or "visual" (visual only);
    - layers: the layers it acts in (default 2 .. L-2).
    """

    tau: float | str | None = 20.0
    rho: float = 0.5
    p: float = 0.6
    m_min: float = 0.2
    sources: str = "all"
    layers: Sequence[int] | None = None

    name: ClassVar[str] = "var"
    uses_sinks: ClassVar[bool] = True

    def validate(self, adapter: "Adapter") -> None:
        from ..sinks import check_tau

        num_layers = adapter.num_layers
        if self.tau is not None:
            self.tau = check_tau(self.tau, adapter.hidden_size)
        for field, value in (("rho", self.rho), ("p", self.p), ("m_min", self.m_min)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"VAR {field} must be in [0, 1], got {value}")
        if self.sources not in ("all", "visual"):
            raise ValueError(f"VAR sources must be 'all' or 'visual', got {self.sources!r}")
        if self.layers is None:
            self._layers = frozenset(range(2, num_layers - 1))
        else:
            bad = [x for x in self.layers if not 0 <= x < num_layers]
            if bad:
                raise ValueError(f"VAR layers {bad} are outside the model's {num_layers} decoder layers")
            self._layers = frozenset(self.layers)

    def on_prefill(self, state: CallState) -> None:
        state.records[self.name] = {"masks": {}, "moved": {}, "heads": {}, "gain": {}}

    def eager_rows(self, state: CallState, layer: int, q_start: int, q_len: int) -> torch.Tensor | None:
        if self.p == 0 or layer not in self._layers or state.phase == "prepass" or not self._has_visual(state, layer):
            return None  # nothing VAR could move here: the fast path, exactly
        starts = [r.after_image for r in state.rows if r.has_image]
        if not starts:
            return None
        first = max(min(starts) - q_start, 0)
        return torch.arange(first, q_len) if first < q_len else None

    def _has_visual(self, state: CallState, layer: int) -> bool:
        """Whether any row has a visual sink at `layer` (VAR selects no head where none has)."""
        active = state.records[self.name].setdefault("active", {})
        if layer not in active:
            sinks = state.sink_mask(layer, self.tau)
            active[layer] = sinks is not None and bool((sinks & state.image_mask()).any())
        return active[layer]

    def _masks(self, state: CallState, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For `layer`: (B, P, 4) float masks over prompt positions [image, visual sinks, sources,
        visual non-sinks], and (B,) whether the row has a visual sink. Built once per call and layer."""
        rec = state.records[self.name]["masks"]
        if layer not in rec:
            sinks = state.sink_mask(layer, self.tau).to(device)
            image = state.image_mask(device)
            visual = sinks & image
            source = sinks if self.sources == "all" else visual
            stack = torch.stack([image, visual, source, image & ~visual], dim=-1).float()
            rec[layer] = (stack, visual.any(-1))
        return rec[layer]

    def _after_image(self, state: CallState, device: torch.device) -> torch.Tensor:
        """(B,) first position after each row's image (beyond any position for a text-only row)."""
        rec = state.records[self.name]
        if "after" not in rec:
            far = state.prompt_len + 10**9
            rec["after"] = torch.tensor([r.after_image if r.has_image else far for r in state.rows], device=device)
        return rec["after"]

    def probs(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        prompt = min(probs.shape[-1], state.prompt_len)
        masks, has_visual = self._masks(state, layer, probs.device)
        a = probs[..., :prompt]
        sums = torch.matmul(a, masks[:, None, :prompt])  # (B, H, R, 4): mass on image, visual, sources, non
        a_img, a_vis, a_src, a_non = sums.unbind(-1)
        ratio = 1.0 - a_vis / (a_img + 1e-6)
        row_ok = positions.to(probs.device)[None, :] >= self._after_image(state, probs.device)[:, None]  # (B, R)
        chosen = (ratio >= self.rho) & (a_img >= self.m_min) & (a_non > 0) & row_ok[:, None, :] & has_visual[:, None, None]
        omega = self.p * a_src * chosen
        gain = omega / a_non.clamp_min(1e-30)
        # chosen rows: sources x (1 - p), non-sinks x (1 + Omega / sum_N A); others unchanged
        source, non = masks[:, None, None, :prompt, 2], masks[:, None, None, :prompt, 3]
        delta = a * (gain[..., None] * non - (self.p * chosen)[..., None] * source)
        probs[..., :prompt] += delta
        rec = state.records[self.name]
        rec["moved"][layer] = rec["moved"].get(layer, 0) + omega.sum((1, 2))  # (B,) mass moved
        rec["heads"][layer] = rec["heads"].get(layer, 0) + chosen.sum((1, 2))  # (B,) image-centric pairs
        rec["gain"][layer] = rec["gain"].get(layer, 0) + delta.clamp_min(0).sum((1, 2))  # (B, P) received
        return probs

    @staticmethod
    def summary(state: CallState) -> dict[int, dict[str, list]]:
        """Per layer: visual sinks per row, attention mass moved per row, image-centric (head, row) pairs."""
        rec = state.records.get(VAR.name)
        if rec is None:
            return {}
        out = {}
        zeros = torch.zeros(state.batch_size)
        for layer in sorted(rec["masks"]):
            visual = rec["masks"][layer][0][..., 1]
            out[layer] = {
                "visual_sinks": visual.sum(-1).long().tolist(),
                "moved": torch.as_tensor(rec["moved"].get(layer, zeros)).cpu().tolist(),
                "image_centric": torch.as_tensor(rec["heads"].get(layer, zeros)).long().cpu().tolist(),
            }
        return out
