"""ICD: Instruction Contrastive Decoding (Wang, Pan, Ding, Biemann, ACL Findings 2024, arXiv 2403.18715).

The next-token distribution of the prompt is contrasted with that of the same prompt (same image) under a
disturbance instruction, a role prefix that makes the model an unreliable observer ("You are a confused
object detector."), which the paper finds to amplify hallucination:

    p_icd(y | v, x) = softmax[(1 + alpha) logit(y | v, x) - alpha logit(y | v, x_d)]

restricted to the adaptive plausibility set V_head = {y : p(y | v, x) >= beta max_w p(w | v, x)} (the other
tokens get -inf). Greedy decoding takes its argmax; sampling samples it.

vlmfix runs the disturbed prompt as a contrast branch (`vlmfix.core.contrast`, kind "disturbed"): extra batch
rows of the same forward, one KV cache, the image's features reused. The instruction's tokens (the
instruction followed by a newline, tokenized alone) are inserted before the first token of the user's
question (`RowLayout.query_positions`, which needs the tokenizer): the role prefix of the instruction. So
the call's prompt is that many columns wider (padding on the left of the real rows; see
`vlmfix.core.contrast`).

Defaults: alpha = 1, beta = 0.1, the instruction "You are a confused object detector." (the paper's
disturbance; its placement as a line before the question is vlmfix's reading of "role prefix" for chat
templates whose system prompt vlmfix does not rewrite). alpha = 0 is the neutral setting: no branch runs
(no cut either), the plain model exactly. A row without an image, or where no question was found, is left
alone (its raw logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vlmfix.core.contrast import ContrastCall, ContrastRecord
from vlmfix.methods.base import CallState, MethodConfig, Runtime, Target, check_number, raise_problems
from vlmfix.methods.registry import register_method

#: the paper's disturbance instruction
DISTURBANCE = "You are a confused object detector."


@dataclass
class ICD(MethodConfig):
    """Instruction contrastive decoding (defaults: the paper's alpha 1, beta 0.1 and disturbance instruction).

    - alpha: the contrast's weight, (1 + alpha) l - alpha l_disturbed (>= 0; 0: nothing runs);
    - beta: the plausibility cut, tokens with probability < beta x max get -inf ([0, 1]; 0: none);
    - instruction: the disturbance instruction inserted before the question (a non-empty string).
    """

    alpha: float = 1.0
    beta: float = 0.1
    instruction: str = DISTURBANCE

    def __post_init__(self) -> None:
        raise_problems("ICD", [
            check_number("alpha", self.alpha, 0.0),
            check_number("beta", self.beta, 0.0, 1.0),
            None if isinstance(self.instruction, str) and self.instruction.strip()
            else f"instruction must be a non-empty string, got {self.instruction!r}",
        ])


class ICDRecord(ContrastRecord):
    """What ICD did in one call (`ContrastRecord`): settings alpha, beta, instruction."""

    acts: ClassVar[str] = "contrasted with the prompt under the disturbance instruction"


class ICDCall(ContrastCall):
    record_type = ICDRecord


class ICDRuntime(Runtime):
    """ICD bound to a model: the disturbance instruction's token ids (its tokenizer)."""

    call = ICDCall
    needs_tokenizer = True

    def __init__(self, config: ICD, target: Target):
        super().__init__(config, target)
        tokenizer = target.adapter.tokenizer
        self.prefix_ids: list[int] = [] if tokenizer is None else \
            list(tokenizer(config.instruction + "\n", add_special_tokens=False).input_ids)

    def branches(self) -> tuple[str, ...]:
        return ("disturbed",) if self.config.alpha != 0 else ()

    def branch_settings(self) -> dict[str, Any]:
        return {"prefix_ids": self.prefix_ids}

    def resolved(self) -> dict[str, Any]:
        return {"prefix_ids": self.prefix_ids}

    def start(self, state: CallState) -> ICDCall:
        cfg = self.config
        asked = [r.query_positions is not None and len(r.query_positions) > 0 for r in state.rows]
        acting = [r.has_image and q and cfg.alpha != 0 for r, q in zip(state.rows, asked)]
        why = ["ICD left this row alone: text-only row, no image tokens" if not r.has_image else
               "ICD left this row alone: no question found to put the instruction before" if not q else
               "ICD did nothing: alpha = 0" for r, q in zip(state.rows, asked)]
        settings = {"alpha": float(cfg.alpha), "beta": float(cfg.beta), "instruction": cfg.instruction}
        return ICDCall(self, state, cfg.alpha, cfg.beta, acting, why, settings)


register_method(name="icd", config=ICD, runtime=ICDRuntime, summary="instruction contrastive decoding (Wang et al., "
                "ACL Findings 2024): contrast with the prompt under a disturbance instruction")
