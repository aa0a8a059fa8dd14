"""Sink dimensions and visual sink tokens.

- Massive activations (Sun et al., 2024, "Massive Activations in Large Language Models"): a scalar
  of the residual stream with |x| > 100 and |x| > 1000 x median|h| of that hidden state. They sit
  on a few fixed dimensions, the *sink dimensions*, of the first token from the early layers on.
- Visual sink tokens (Kang et al., ICLR 2025, "See What You Are Told"): with x the residual stream
  entering layer l and x_hat = x / sqrt(mean_d x_d^2 + 1e-6) (fp32, no learned gain),
  phi(x) = max_{d in D_sink} |x_hat_d|; a token is a sink at l >= FIRST_SINK_LAYER (2, `vlmfix.core.state`) iff phi > tau.
  phi <= sqrt(hidden_size), so tau = 20 (set for 4096-wide LMs) is rescaled for narrower ones:
  `scaled_tau(h) = 20 * sqrt(h / 4096)` ("scaled"), or relative to the first token's phi ("bos:F").

Described, with its choices and defaults, in docs/methods.md ("Attention sinks").
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn


#: ordinary English sentences (no image): the default prompt set of `find_sink_dims`
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris, a city known for its museums and its long history.",
    "Please describe what you see in the picture in two short sentences.",
    "A young boy is playing with a red ball in the park while his mother watches.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The recipe needs two cups of flour, one egg, and a pinch of salt.",
    "After the meeting, the team walked to the station and took the last train home.",
)

REFERENCE_TAU = 20.0
REFERENCE_WIDTH = 4096


def scaled_tau(hidden_size: int, tau: float = REFERENCE_TAU) -> float:
    """tau rescaled to an LM of width `hidden_size`: tau * sqrt(hidden_size / 4096).

    The paper's tau = 20 was set where phi can reach sqrt(4096) = 64; SmolLM2-135M (576 wide) tops
    out at 24, so its scaled tau is 7.5.
    """
    return tau * math.sqrt(hidden_size / REFERENCE_WIDTH)


def check_tau(tau: float | str, hidden_size: int | None = None) -> float | str:
    """Validate a sink threshold: a number > 0, "scaled" (`scaled_tau`, needs hidden_size), or
    "bos:F" (F x the phi of the row's first token at that layer, 0 < F <= 1). Returns the float or "bos:F"."""
    if isinstance(tau, str):
        text = tau.strip().lower()
        if text == "scaled" and hidden_size is not None:
            return scaled_tau(hidden_size)
        if text.startswith("bos:"):
            try:
                frac = float(text[4:])
            except ValueError:
                frac = -1.0
            if 0 < frac <= 1:
                return f"bos:{frac}"
        try:
            tau = float(text)
        except ValueError:
            raise ValueError(
                f"tau must be a number > 0, 'scaled' or 'bos:F' with 0 < F <= 1, got {tau!r}"
            ) from None
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number > 0 (a sink score threshold; the paper uses 20 for 4096-wide "
                         f"LMs), got {tau}")
    return float(tau)


def sink_scores(hidden: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """phi per token: max over sink dims of |x_hat_d|, x_hat = x / sqrt(mean(x^2) + 1e-6), in fp32.

    hidden: (..., D) raw residual stream. Returns (...). No dims -> zeros.
    """
    x = hidden.float()
    if not len(dims):
        return torch.zeros(x.shape[:-1], device=x.device)
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (x[..., list(dims)] / rms).abs().amax(-1)


def massive_dims(hidden: torch.Tensor, min_abs: float = 100.0, ratio: float = 1000.0) -> dict[int, float]:
    """Dims where the first token of `hidden` (N, D) is massive: |x| > min_abs and > ratio x median|hidden|."""
    a = hidden.float().abs()
    limit = max(min_abs, ratio * float(a.median()))
    first = a[0]
    idx = (first > limit).nonzero().flatten().tolist()
    return {d: float(first[d]) for d in idx}


def _decoder(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"cannot find a decoder LM with .layers in {type(model).__name__}")
    return decoder


@torch.no_grad()
def first_token_profile(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], min_abs: float = 100.0, ratio: float = 1000.0
) -> tuple[list[dict[int, int]], dict[int, float]]:
    """Per layer: how many prompts make each dim massive on the first token; and each dim's peak |x|."""
    decoder = _decoder(model)
    device = next(decoder.parameters()).device
    n_layers = len(decoder.layers)
    counts: list[dict[int, int]] = [dict() for _ in range(n_layers)]
    peak: dict[int, float] = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        hidden = decoder(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(n_layers):  # hidden_states[l] enters layer l
            for d, v in massive_dims(hidden[layer][0], min_abs, ratio).items():
                counts[layer][d] = counts[layer].get(d, 0) + 1
                peak[d] = max(peak.get(d, 0.0), v)
    return counts, peak


def find_sink_dims(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | None = None,
    *,
    min_abs: float = 100.0,
    ratio: float = 1000.0,
) -> tuple[int, ...]:
    """The decoder LM's sink dimensions, strongest first (Sun et al., 2024 criterion).

    Runs the LM on `prompts` (default: `DEFAULT_PROMPTS`), reads the residual stream entering each
    layer, and keeps the dims where the first token is massive (|x| > min_abs and > ratio x the
    median magnitude of that hidden state) for a majority of the prompts in a majority of the
    middle layers (L/4 <= l < 3L/4). Works on a text LM or on a VLM (its decoder is used).
    """
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise ValueError("find_sink_dims needs at least one prompt")
    counts, peak = first_token_profile(model, tokenizer, prompts, min_abs, ratio)
    n = len(counts)
    middle = range(n // 4, max(n // 4 + 1, (3 * n) // 4))
    votes: dict[int, int] = {}
    for layer in middle:
        for d, c in counts[layer].items():
            if 2 * c > len(prompts):
                votes[d] = votes.get(d, 0) + 1
    dims = [d for d, v in votes.items() if 2 * v > len(middle)]
    return tuple(sorted(dims, key=lambda d: -peak[d]))
