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
        starts = [r.after_image for r in state.rows if r.has_image]
        # first: the first position after any row's image (None: no image), once per call
        state.records[self.name] = {"masks": {}, "heads": {}, "gain": {}, "active": {}, "rows": {}, "limits": {},
                                    "first": min(starts) if starts else None}

    def eager_rows(self, state: CallState, layer: int, q_start: int, q_len: int) -> torch.Tensor | None:
        first = state.records[self.name]["first"]
        if (self.p == 0 or first is None or layer not in self._layers or state.phase == "prepass"
                or not self._has_visual(state, layer)):
            return None  # nothing VAR could move here: the fast path, exactly
        first = max(first - q_start, 0)
        if first >= q_len:
            return None
        cached = state.records[self.name]["rows"]  # one tensor per block shape: every decoding step reuses one
        if (first, q_len) not in cached:
            cached[first, q_len] = torch.arange(first, q_len)
        return cached[first, q_len]

    def _has_visual(self, state: CallState, layer: int) -> bool:
        """Whether any row has a visual sink at `layer` (VAR selects no head where none has)."""
        active = state.records[self.name]["active"]
        if layer not in active:
            sinks = state.sink_mask(layer, self.tau)
            active[layer] = sinks is not None and bool((sinks & state.image_mask()).any())
        return active[layer]

    def _masks(self, state: CallState, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For `layer`, built once per call: masks over the prompt positions that reduce `probs` to
        two products with the rows A.

        - (B, P, 5) float columns [T, visual sinks V_l, image I, visual non-sinks N_l, sources] with
          T = (1 - rho) [j in I] - [j in V_l]: A @ them gives per (head, row) t, sum_V A, m, sum_N A
          and sum_sources A, where t = (1 - rho) m - sum_V A, so that
          r = 1 - sum_V A / (m + 1e-6) >= rho  <=>  t >= -(1 - rho) 1e-6;
        - (B, 2, P) rows [-p [j in sources], p [j in N_l]]: [1, sum_sources A / sum_N A] @ them is
          the relative change of each entry of an image-centric row.

        N_l is left empty in a batch row without visual sinks: sum_N A = 0 there, which leaves all
        its heads unselected, as V_l = {} does.
        """
        rec = state.records[self.name]["masks"]
        if layer not in rec:
            sinks = state.sink_mask(layer, self.tau).to(device)
            image = state.image_mask(device)
            visual = sinks & image
            source = (sinks if self.sources == "all" else visual).float()
            non = (image & ~visual & visual.any(-1, keepdim=True)).float()
            image, visual = image.float(), visual.float()
            columns = torch.stack([(1 - self.rho) * image - visual, visual, image, non, source], dim=-1)
            rec[layer] = (columns, torch.stack([-self.p * source, self.p * non], dim=1))
        return rec[layer]

    def _after_image(self, state: CallState, device: torch.device) -> torch.Tensor:
        """(B,) first position after each row's image (beyond any position for a text-only row)."""
        rec = state.records[self.name]
        if "after" not in rec:
            far = state.prompt_len + 10**9
            rec["after"] = torch.tensor([r.after_image if r.has_image else far for r in state.rows], device=device)
        return rec["after"]

    def probs(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Selection and redistribution of the rows (B, H, R, K), in place, all (head, row) pairs at once.

        One product gives each pair's t, sum_V A, m, sum_N A, sum_sources A (see `_masks`); the pair
        is chosen iff t >= -(1 - rho) 1e-6, m >= m_min and sum_N A > 0 (and, at the prefill, its row
        comes after the batch row's image). A chosen pair's prompt entries become
        A'_j = A_j * (1 - p [j in sources] + p [j in N_l] sum_sources A / sum_N A),
        the bracket minus 1 being a second product; other pairs are left exactly as they are.
        Records per layer: image-centric pairs (B,) and attention received per position (B, P).
        """
        b, h, r, k = probs.shape
        prompt = min(k, state.prompt_len)
        columns, update = self._masks(state, layer, probs.device)
        if prompt < state.prompt_len:
            columns, update = columns[:, :prompt], update[..., :prompt]
        a = probs[..., :prompt]
        flat = a.reshape(b, h * r, prompt)
        sums = torch.bmm(flat, columns)  # (B, H * R, 5): t, sum_V A, m, sum_N A, sum_sources A
        rec = state.records[self.name]
        limits = rec["limits"].get(probs.device)  # lower bounds of t, sum_V A (none), m
        if limits is None:
            limits = rec["limits"][probs.device] = torch.tensor([-(1 - self.rho) * 1e-6, -torch.inf, self.m_min],
                                                                 device=probs.device)
        chosen = (sums[..., :3] >= limits).all(-1) & (sums[..., 3] > 0)
        if state.phase == "prefill":  # prompt rows before a batch row's image end stay as they are
            row_ok = positions.to(probs.device)[None, :] >= self._after_image(state, probs.device)[:, None]
            chosen = (chosen.view(b, h, r) & row_ok[:, None]).view(b, h * r)
        # [1, sum_sources A / sum_N A] for chosen pairs, 0 for the others (whose NaN when sum_N A = 0 is dropped)
        coef = torch.where(chosen[..., None], sums[..., 3:] / sums[..., 3:4], 0.0)
        if layer not in rec["heads"]:
            rec["heads"][layer] = torch.zeros(b, dtype=torch.long, device=probs.device)
            rec["gain"][layer] = torch.zeros(b, state.prompt_len, device=probs.device)
        rec["heads"][layer] += chosen.sum(-1)
        received = rec["gain"][layer][:, None, :prompt]  # += sum over pairs of A_j * gain, j in N_l
        received.addcmul_(torch.bmm(coef[..., 1:].transpose(1, 2), flat), update[:, 1:])
        a.addcmul_(a, torch.bmm(coef, update).view(b, h, r, prompt))
        return probs

    @staticmethod
    def summary(state: CallState) -> dict[int, dict[str, list]]:
        """Per layer: visual sinks per row, attention mass moved per row (= received by the visual
        non-sinks), image-centric (head, row) pairs."""
        rec = state.records.get(VAR.name)
        if rec is None:
            return {}
        out = {}
        zeros = torch.zeros(state.batch_size)
        for layer in sorted(rec["masks"]):
            visual = rec["masks"][layer][0][..., 1]
            out[layer] = {
                "visual_sinks": visual.sum(-1).long().tolist(),
                "moved": rec["gain"][layer].sum(-1).cpu().tolist() if layer in rec["gain"] else zeros.tolist(),
                "image_centric": torch.as_tensor(rec["heads"].get(layer, zeros)).long().cpu().tolist(),
            }
        return out
