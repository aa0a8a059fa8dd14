"""VCD: Visual Contrastive Decoding (Leng, Zhang, Chen, Li, Lu, Miao, Bing, CVPR 2024, arXiv 2311.16922).

The next-token distribution of the image-conditioned prompt is contrasted with that of the same prompt on a
distorted image v' (Gaussian noise of the forward diffusion process, q(v_t | v_{t-1}) = N(sqrt(1 - beta_t)
v_{t-1}, beta_t I), so v' = sqrt(abar_T) v + sqrt(1 - abar_T) eps):

    p_vcd(y | v, v', x) = softmax[(1 + alpha) logit(y | v, x) - alpha logit(y | v', x)]

restricted to the adaptive plausibility set V_head = {y : p(y | v, x) >= beta max_w p(w | v, x)} (the other
tokens get -inf). Greedy decoding takes its argmax; sampling samples it (generate's own processors,
temperature / top-k / top-p, apply on top, as to any logits).

vlmfix runs the noised prompt as a contrast branch (`vlmfix.core.contrast`, kind "noised"): extra batch rows of
the same forward, one KV cache, the noised pixels encoded by the vision tower once more at the prefill.

Defaults: alpha = 1, beta = 0.1, T = 500 noise steps (the paper's settings). The paper gives the noise process
but not its variance schedule: vlmfix follows the authors' published one (1000 steps, beta_t a sigmoid ramp
from 1e-5 to 5e-3; `vlmfix.core.contrast.diffusion_abar`), applied to the processor's normalized pixels.
The noise is seeded (`seed`) per image from its own pixels, so a row gets the same noise alone or in a batch.
alpha = 0 is the neutral setting: no branch runs at all (no cut either): the plain model exactly. A row
without an image is left alone (its raw logits: there is no image to distort).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vlmfix.core.contrast import DIFFUSION_STEPS, ContrastCall, ContrastRecord
from vlmfix.methods.base import CallState, MethodConfig, Runtime, check_number, is_int, raise_problems
from vlmfix.methods.registry import register_method


@dataclass
class VCD(MethodConfig):
    """Visual contrastive decoding (defaults: the paper's alpha 1, beta 0.1, 500 noise steps).

    - alpha: the contrast's weight, (1 + alpha) l - alpha l_noised (>= 0; 0: nothing runs);
    - beta: the plausibility cut, tokens with probability < beta x max get -inf ([0, 1]; 0: none);
    - noise_step: the diffusion step of the noised image (0 .. 999);
    - seed: the noise's seed (an integer >= 0).
    """

    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        raise_problems("VCD", [
            check_number("alpha", self.alpha, 0.0),
            check_number("beta", self.beta, 0.0, 1.0),
            None if is_int(self.noise_step) and 0 <= self.noise_step < DIFFUSION_STEPS
            else f"noise_step must be an integer in 0..{DIFFUSION_STEPS - 1}, got {self.noise_step!r}",
            None if is_int(self.seed) and self.seed >= 0 else f"seed must be an integer >= 0, got {self.seed!r}",
        ])


class VCDRecord(ContrastRecord):
    """What VCD did in one call (`ContrastRecord`): settings alpha, beta, noise_step, seed."""

    acts: ClassVar[str] = "contrasted with the prompt on the noised image"


class VCDCall(ContrastCall):
    record_type = VCDRecord


class VCDRuntime(Runtime):
    """VCD bound to a model (nothing to resolve)."""

    call = VCDCall

    def branches(self) -> tuple[str, ...]:
        return ("noised",) if self.config.alpha != 0 else ()

    def branch_settings(self) -> dict[str, Any]:
        return {"noise_step": int(self.config.noise_step), "seed": int(self.config.seed)}

    def start(self, state: CallState) -> VCDCall:
        cfg = self.config
        acting = [r.has_image and cfg.alpha != 0 for r in state.rows]
        why = ["VCD left this row alone: text-only row, no image to noise" if not r.has_image else
               "VCD did nothing: alpha = 0" for r in state.rows]
        settings = {"alpha": float(cfg.alpha), "beta": float(cfg.beta), "noise_step": int(cfg.noise_step),
                    "seed": int(cfg.seed)}
        return VCDCall(self, state, cfg.alpha, cfg.beta, acting, why, settings)


register_method(name="vcd", config=VCD, runtime=VCDRuntime, summary="visual contrastive decoding (Leng et al., "
                "CVPR 2024): contrast with the prompt on the diffusion-noised image")
