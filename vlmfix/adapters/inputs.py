"""Reading model inputs in the adapters of the tiled and framed families (Gemma 3, LLaVA-OneVision, InternVL,
Idefics3 / SmolVLM): pixel tensors of a known shape, runs of image tokens, tile counts that must add up."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import VlmfixInputError


def pixels(inputs: Mapping[str, Any], key: str, dims: tuple[str, ...], family: str) -> torch.Tensor | None:
    """`inputs[key]` (None when absent), which must have one axis per name in `dims`."""
    value = inputs.get(key)
    if value is not None and value.ndim != len(dims):
        raise VlmfixInputError(
            f"{family} expects {key} of shape ({', '.join(dims)}), got {tuple(value.shape)}; use the model's processor"
        )
    return value


def token_runs(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """(starts, lengths) of the runs of True in a 1-D bool tensor, in order."""
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    edges = padded.diff()
    starts = (edges == 1).nonzero().flatten()
    return starts.tolist(), ((edges == -1).nonzero().flatten() - starts).tolist()


def check_tiles(counted: int, given: int, what: str) -> None:
    """Raise unless the prompt's image tokens make as many tiles (`counted`, of `what`) as the pixels hold."""
    if counted != given:
        raise VlmfixInputError(
            f"the prompt's image tokens make {counted} {what} but {given} tiles were given; build the inputs with "
            "the model's processor."
        )
