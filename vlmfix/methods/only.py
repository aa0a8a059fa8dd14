"""ONLY: one-layer intervention (Wan et al., "ONLY: One-Layer Intervention Sufficiently Mitigates Hallucinations in
Large Vision-Language Models", ICCV 2025, arXiv 2507.00898).

Contrastive decoding without a perturbed input: a *textually enhanced* next-token distribution comes from the same
prompt with one decoder layer's attention changed, and the method contrasts (or combines) it with the original.

1. Text-to-visual entropy ratio (TVER). In the intervened layer l, for each query token and head h, split the
   head's attention row a into its text keys (every key that is not an image token) and its image keys, each part
   renormalised to sum to 1, and take their entropies: TVER_h = H(a_text) / H(a_visual). Heads whose TVER is
   below the mean over the layer's heads are switched off (their attention weights set to 0, so they add nothing);
   the others, the text-leaning heads, stay: the layer's output then carries the textual information. Every
   query row of the prompt and each generated token is intervened (the intervened model's forward).
2. Adaptive decoding. With f the original logits, f~ the enhanced ones, and d = sum_y |p(y) - p~(y)| the
   Manhattan distance of their distributions:

       d < gamma:  f + alpha1 f~                (collaborative: the two agree)
       otherwise:  (1 + alpha2) f - alpha2 f~   (contrastive)

   then the adaptive plausibility cut: tokens with p(y) < beta max p get -inf.

Defaults: layer 0, alpha1 = 3, alpha2 = 1, gamma = 0.2, beta = 0.1: the authors' published command
(github.com/zifuwan/ONLY eval_bench/scripts/pope_eval.sh: --enhance_layer_index 0, --ritual_alpha_pos 3.0,
--ritual_alpha_neg 1.0, --js_gamma 0.2, --ritual_beta 0.1), written when the paper's text was not at hand (see
docs/methods.md for the choices: the direction of the head selection, the renormalised entropies, logits rather
than log-probabilities).

How it runs: f~ comes from the "same" contrast branch (`vlmfix.core.contrast`: each prompt and its image once more
as extra rows of the same forward and KV cache); this call sets `batch_rows = "branch"`, so its attention edit acts
on the branch rows only, in layer l, and `combine` merges the two halves' logits. The paper's efficiency (one
extra attention layer, not a second pass through the decoder) is not reproduced: the branch rows run every layer,
about twice the arithmetic. alpha1 = alpha2 = beta = 0 is the neutral setting (no branch runs). A row without an
image is left alone (its raw logits). Runs in compiled static-cache generation. Limits: those of the contrast
branch (left padding, not beside token pruning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlmfix.methods.base import (Buffers, Block, CallState, CombinesLogits, EditsQueries, MethodCall, MethodConfig,
                                 Phase, Queries, Record, Runtime, Target, check_number, is_int, raise_problems)
from vlmfix.methods.registry import register_method


def head_entropy_ratio(probs: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """TVER (B, H, R) of attention rows `probs` (B, H, R, K): the entropy of the text keys' attention over that of the
    image keys' (`image` (B, K) bool), each part renormalised to sum to 1 (0 log 0 = 0)."""
    tiny = torch.finfo(probs.dtype).tiny
    cols = image[:, None, None, :]

    def entropy(part: torch.Tensor) -> torch.Tensor:
        q = part / part.sum(-1, keepdim=True).clamp_min(tiny)
        return -(q * q.clamp_min(tiny).log()).sum(-1)

    return entropy(probs.masked_fill(cols, 0.0)) / entropy(probs.masked_fill(~cols, 0.0)).clamp_min(1e-12)


@dataclass
class ONLY(MethodConfig):
    """One-layer intervention (defaults: the authors' published command, layer 0, alpha1 3, alpha2 1, gamma 0.2,
    beta 0.1).

    - layer: the decoder layer whose heads are selected by TVER in the enhanced branch;
    - alpha1: weight of the enhanced logits where the two distributions agree (d < gamma) (>= 0);
    - alpha2: contrast weight where they differ (>= 0);
    - gamma: the Manhattan-distance threshold between collaborative and contrastive decoding ([0, 2]);
    - beta: plausibility cut, tokens with p < beta max p get -inf ([0, 1]; 0: none).
    """

    layer: int = 0
    alpha1: float = 3.0
    alpha2: float = 1.0
    gamma: float = 0.2
    beta: float = 0.1

    def __post_init__(self) -> None:
        raise_problems("ONLY", [
            None if is_int(self.layer) and self.layer >= 0 else f"layer must be an integer >= 0, got {self.layer!r}",
            check_number("alpha1", self.alpha1, 0.0),
            check_number("alpha2", self.alpha2, 0.0),
            check_number("gamma", self.gamma, 0.0, 2.0),
            check_number("beta", self.beta, 0.0, 1.0),
        ])

    @property
    def neutral(self) -> bool:
        """alpha1 = alpha2 = beta = 0: the scores are the original logits (no branch runs)."""
        return self.alpha1 == 0 and self.alpha2 == 0 and self.beta == 0


@dataclass
class ONLYRecord(Record):
    """What ONLY did in one call: its settings, which rows have an image, and per row the steps decoded
    collaboratively and contrastively (`collaborative`, `contrastive`: (B,) on the model's device)."""

    layer: int
    alpha1: float
    alpha2: float
    gamma: float
    beta: float
    image: list[bool]
    contrast: bool
    collaborative: torch.Tensor | None = None
    contrastive: torch.Tensor | None = None
    state: CallState | None = field(default=None, repr=False, compare=False)

    acts: ClassVar[str] = "combined the logits with those of the textually enhanced layer"

    def _counts(self, t: torch.Tensor | None) -> list[int]:
        return [0] * len(self.image) if t is None else [int(x) for x in t.tolist()]

    def acted(self) -> list[bool]:
        return [has and self.contrast for has in self.image]

    def row(self, row: int) -> dict[str, Any]:
        return {"image": self.image[row], "layer": self.layer,
                "collaborative": self._counts(self.collaborative)[row],
                "contrastive": self._counts(self.contrastive)[row]}

    def notes(self, row: int) -> list[str]:
        if not self.image[row]:
            return ["ONLY left this row alone: text-only row, no image tokens"]
        if not self.contrast:
            return ["ONLY did nothing: alpha1 = alpha2 = beta = 0"]
        return []

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "alpha1": self.alpha1, "alpha2": self.alpha2,
                "gamma": self.gamma, "beta": self.beta, "contrast": self.contrast,
                "rows": [{**self.row(r), "notes": self.notes(r)} for r in range(len(self.image))]}

    def freeze(self) -> None:
        for name in ("collaborative", "contrastive"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.clone())


class ONLYCall(MethodCall, EditsQueries, CombinesLogits):
    """One call of ONLY: the image columns (B, P), which rows have an image, the record. Its attention edit sees
    the "same" branch's rows only (`batch_rows`)."""

    record: ONLYRecord
    record_type = ONLYRecord
    batch_rows = "branch"

    def __init__(self, runtime: "ONLYRuntime", state: CallState):
        cfg = runtime.config
        self.layer = int(cfg.layer)
        self.alpha1, self.alpha2, self.gamma, self.beta = float(cfg.alpha1), float(cfg.alpha2), float(cfg.gamma), \
            float(cfg.beta)
        image = [r.has_image for r in state.rows]
        self._on = bool(runtime.branches()) and any(image)
        self._image = state.image_mask()  # (B, P) bool
        self._has = torch.tensor(image, device=state.device)[:, None]  # (B, 1)
        buffers = runtime.buffers
        record = ONLYRecord(self.layer, self.alpha1, self.alpha2, self.gamma, self.beta, image,
                            bool(runtime.branches()), buffers.zeros("collaborative", (state.batch_size,), torch.long,
                                                                    state.device),
                            buffers.zeros("contrastive", (state.batch_size,), torch.long, state.device))
        record.state = state
        super().__init__(runtime, record)

    # -- EditsQueries, on the branch rows ------------------------------------------------------------
    def queries(self, block: Block, state: CallState) -> range | None:
        if not self._on or block.layer != self.layer or block.phase is Phase.PREPASS:
            return None
        return range(0, block.q_len)

    def edit(self, block: Block, state: CallState, queries: Queries, probs: torch.Tensor) -> torch.Tensor:
        """Heads whose TVER is below the mean over the heads get attention 0 (per row and query); rows without an
        image keep their attention."""
        k = probs.shape[-1]
        image = self._image.to(probs.device)[:, :k]
        image = torch.nn.functional.pad(image, (0, k - image.shape[1]))  # generated tokens are text
        tver = head_entropy_ratio(probs, image)  # (B, H, R)
        keep = (tver >= tver.mean(1, keepdim=True)) | ~self._has.to(probs.device)[:, :, None]
        return probs * keep[..., None]

    # -- CombinesLogits --------------------------------------------------------------------------------
    def combine(self, logits: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """Collaborative f + alpha1 f~ where sum |p - p~| < gamma, else (1 + alpha2) f - alpha2 f~; the plausibility
        cut on p; raw logits in a row without an image."""
        p = torch.softmax(logits, dim=-1)
        close = (p - torch.softmax(branch, dim=-1)).abs().sum(-1, keepdim=True) < self.gamma  # (B, 1)
        out = torch.where(close, logits + self.alpha1 * branch, (1 + self.alpha2) * logits - self.alpha2 * branch)
        if self.beta > 0:
            out = out.masked_fill(p < self.beta * p.amax(-1, keepdim=True), float("-inf"))
        has = self._has.to(logits.device)
        self.record.collaborative += (close & has)[:, 0].to(self.record.collaborative.device)
        self.record.contrastive += (~close & has)[:, 0].to(self.record.contrastive.device)
        return torch.where(has, out, logits)


class ONLYRuntime(Runtime):
    """ONLY bound to a model: its layer (checked against the depth), the "same" branch, the record's buffers."""

    call = ONLYCall

    def __init__(self, config: ONLY, target: Target):
        super().__init__(config, target)
        n = target.adapter.num_layers
        if config.layer >= n:
            raise ValueError(f"ONLY layer {config.layer} is outside the model's {n} decoder layers")
        self.buffers = Buffers()

    def branches(self) -> tuple[str, ...]:
        return () if self.config.neutral else ("same",)

    def resolved(self) -> dict:
        return {"layer": int(self.config.layer)}

    def start(self, state: CallState) -> ONLYCall:
        return ONLYCall(self, state)


register_method(name="only", config=ONLY, runtime=ONLYRuntime, summary="one-layer intervention (Wan et al., ICCV "
                "2025): contrast with the logits of one layer's text-leaning heads (TVER), collaborative or "
                "contrastive")
