"""Reading model inputs and building layouts in the adapters of the tiled and framed families (Qwen2-VL,
Gemma 3, LLaVA-OneVision, InternVL, Idefics3 / SmolVLM): pixel tensors of a known shape, runs of image
tokens, frame and tile layouts, tile counts that must add up."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vlmfix.core.state import ImageSegment
from vlmfix.adapters.base import ImageLayout, VlmfixInputError, runs


def pixels(inputs: Mapping[str, Any], key: str, dims: tuple[str, ...], family: str) -> torch.Tensor | None:
    """`inputs[key]` (None when absent), which must have one axis per name in `dims`."""
    value = inputs.get(key)
    if value is not None and value.ndim != len(dims):
        raise VlmfixInputError(
            f"{family} expects {key} of shape ({', '.join(dims)}), got {tuple(value.shape)}; use the model's processor"
        )
    return value


def token_runs(ids: torch.Tensor, token_id: int) -> tuple[list[int], list[int]]:
    """(starts, lengths) of the runs of `token_id` in the 1-D `ids`, in order (`base.runs` of its positions)."""
    found = runs((ids == token_id).nonzero().flatten())
    return [int(r[0]) for r in found], [len(r) for r in found]


def frames_layout(t: int, rows: int, cols: int, continues: bool = False, first: int = 0) -> ImageLayout:
    """t frames of rows x cols tokens in one run (segments named frame{first}, frame{first + 1}, ...)."""
    segs = tuple(ImageSegment(start=k * rows * cols, rows=rows, cols=cols, name=f"frame{first + k}") for k in range(t))
    return ImageLayout(segments=segs, length=t * rows * cols, continues=continues)


def tiled_layout(offsets: list[int], rows: int, cols: int, overview: str) -> ImageLayout:
    """An image of tiles, one rows x cols grid each at `offsets` (from the image's first token): "image"
    for a single tile, else "tile0", "tile1", ... and the `overview` (the global view, the thumbnail) last."""
    names = ["image"] if len(offsets) == 1 else [f"tile{k}" for k in range(len(offsets) - 1)] + [overview]
    segs = tuple(ImageSegment(start=o, rows=rows, cols=cols, name=n) for o, n in zip(offsets, names))
    return ImageLayout(segments=segs, length=len(offsets) * rows * cols)


def check_tiles(counted: int, given: int, what: str) -> None:
    """Raise unless the prompt's image tokens make as many tiles (`counted`, of `what`) as the pixels hold."""
    if counted != given:
        raise VlmfixInputError(
            f"the prompt's image tokens make {counted} {what} but {given} tiles were given; build the inputs with "
            "the model's processor."
        )
