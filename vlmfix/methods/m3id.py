"""M3ID: Multi-Modal Mutual-Information Decoding (Favero et al., "Multi-Modal Hallucination Control by Visual
Information Grounding", CVPR 2024, arXiv 2403.14003).

The paper finds that a VLM's reliance on its image fades as tokens are generated, and amplifies the tokens
that carry mutual information with the image more as generation goes on. With l_c the log-probabilities of
the next token given the image and the text (the conditioned model) and l_u those given the text alone (the
unconditioned model, the prompt without its image), the scores of the t-th generated token are

    l*_t = l_c + (1 - gamma_t) / gamma_t * (l_c - l_u),        gamma_t = exp(-lambda t)

(so the weight (1 - gamma_t) / gamma_t = exp(lambda t) - 1 is 0 at t = 0 and grows with t), with the
forgetting rate lambda = 0.02 (the paper's setting). Greedy decoding takes the argmax of l*_t; sampling
samples from softmax(l*_t) (generate's own warpers apply to it).

Choices where the paper's text was not at hand when this was written (said again in docs/methods.md):

- t counts the tokens generated before the one being chosen: t = 0 for the first generated token (gamma_0 =
  1: the first token is the conditioned model's own choice), t = 1 for the second, ...;
- `threshold` (off by default): the paper's variant that intervenes only where the conditioned model is
  unsure: at steps where the conditioned model's top probability is >= threshold the scores stay l_c;
- no plausibility cut (VCD's beta is not part of M3ID).

How it runs: l_u comes from the "no_image" contrast branch (`vlmfix.core.contrast`: each prompt without its
image tokens, as extra batch rows of the same forward and the same KV cache; no second model call). The step
index t lives in a preallocated 0-d tensor that `combine` reads and then increments in place, so a decoding
step reads no Python counter. lambda = 0 is the neutral setting: no branch runs at all. A row without an image
is left alone (its raw logits). Runs in compiled static-cache generation (the counter is incremented inside the
compiled step). Limits: those of the contrast branch (left padding; not beside token pruning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlmfix.methods.base import (Buffers, CallState, CombinesLogits, MethodCall, MethodConfig, Record, Runtime, Target,
                                 check_number, raise_problems)
from vlmfix.methods.registry import register_method


@dataclass
class M3ID(MethodConfig):
    """Multi-modal mutual-information decoding (defaults: the paper's, lambda 0.02, no confidence gate).

    - lam: the forgetting rate lambda of gamma_t = exp(-lambda t) (>= 0; 0: no contrast, the plain model);
    - threshold: intervene only at steps where the image-conditioned top probability is below it ((0, 1];
      None: at every step).
    """

    lam: float = 0.02
    threshold: float | None = None

    def __post_init__(self) -> None:
        raise_problems("M3ID", [
            check_number("lam", self.lam, 0.0),
            None if self.threshold is None else check_number("threshold", self.threshold, 0.0, 1.0, lo_open=True),
        ])


@dataclass
class M3IDRecord(Record):
    """What M3ID did in one call: its settings, which rows have an image, and per row the number of steps where
    it changed the scores (`steps`, (B,) on the model's device: steps with t > 0 whose gate was open)."""

    lam: float
    threshold: float | None
    image: list[bool]
    steps: torch.Tensor | None = None
    state: CallState | None = field(default=None, repr=False, compare=False)

    acts: ClassVar[str] = "contrasted the image-conditioned scores with the image-free prompt's"

    def _steps(self) -> list[int]:
        return [0] * len(self.image) if self.steps is None else [int(s) for s in self.steps.tolist()]

    def acted(self) -> list[bool]:
        return [n > 0 for n in self._steps()]

    def row(self, row: int) -> dict[str, Any]:
        return {"image": self.image[row], "lam": self.lam if self.image[row] else 0.0,
                "steps": self._steps()[row]}

    def notes(self, row: int) -> list[str]:
        if not self.image[row]:
            return ["M3ID left this row alone: text-only row, no image tokens"]
        if self.lam == 0:
            return ["M3ID did nothing: lam = 0"]
        if not self.acted()[row]:
            why = " or the conditioned model was confident at every step" if self.threshold is not None else ""
            return [f"M3ID changed no step: the weight is 0 at the first generated token{why}"]
        return []

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "lam": self.lam, "threshold": self.threshold,
                "rows": [{**self.row(r), "notes": self.notes(r)} for r in range(len(self.image))]}

    def freeze(self) -> None:
        if self.steps is not None:
            self.steps = self.steps.clone()


class M3IDCall(MethodCall, CombinesLogits):
    """One call of M3ID: the step index t (a 0-d tensor), the image rows, the record."""

    record: M3IDRecord
    record_type = M3IDRecord

    def __init__(self, runtime: "M3IDRuntime", state: CallState):
        cfg = runtime.config
        self.lam = float(cfg.lam)
        self._log_threshold = None if cfg.threshold is None else math.log(cfg.threshold)
        image = [r.has_image for r in state.rows]
        self._has = torch.tensor(image, device=state.device)[:, None]  # (B, 1)
        buffers = runtime.buffers
        #: the index t of the token being chosen (0 at the prefill's last position), incremented by `combine`
        self._t = buffers.zeros("t", (), torch.float32, state.device)
        record = M3IDRecord(self.lam, cfg.threshold, image,
                            buffers.zeros("steps", (state.batch_size,), torch.long, state.device))
        record.state = state
        super().__init__(runtime, record)

    def combine(self, logits: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """l_c + (exp(lambda t) - 1) (l_c - l_u) in log-probabilities (l_c where the gate is shut); raw logits in a
        row without an image. Advances t."""
        t = self._t.to(logits.device)
        lc = torch.log_softmax(logits, dim=-1)
        weight = torch.expm1(self.lam * t)  # (1 - gamma_t) / gamma_t with gamma_t = exp(-lambda t)
        out = lc + weight * (lc - torch.log_softmax(branch, dim=-1))
        acts = self._has.to(logits.device) & (t > 0)
        if self._log_threshold is not None:
            acts = acts & (lc.amax(-1, keepdim=True) < self._log_threshold)
        self.record.steps += acts[:, 0].to(self.record.steps.device)
        out = torch.where(acts, out, lc)
        self._t += 1
        return torch.where(self._has.to(logits.device), out, logits)


class M3IDRuntime(Runtime):
    """M3ID bound to a model (nothing to resolve: the branch and the buffers of its step counter)."""

    call = M3IDCall

    def __init__(self, config: M3ID, target: Target):
        super().__init__(config, target)
        self.buffers = Buffers()

    def branches(self) -> tuple[str, ...]:
        return ("no_image",) if self.config.lam != 0 else ()

    def start(self, state: CallState) -> M3IDCall:
        return M3IDCall(self, state)


register_method(name="m3id", config=M3ID, runtime=M3IDRuntime, summary="multi-modal mutual-information decoding "
                "(Favero et al., CVPR 2024): contrast with the image-free prompt, a weight growing with each token")
