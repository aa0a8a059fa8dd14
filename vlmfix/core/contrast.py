"""Contrast branches: extra rows of the same forward whose logits a method combines with the real rows'.

A runtime declares the branches its calls contrast against (`Runtime.branches()`, e.g. ("no_image",):
each prompt without its image tokens), and its call combines the logits (`CombinesLogits.combine(main (B, V),
branch (B, V)) -> (B, V)`) at each step: the prefill's last position and every decoding step.

How (all in attach's forward hooks; the model and `generate` see nothing):

- at the prefill the pre-forward hook expands the batch from B to 2B rows: rows B..2B-1 are the prompts
  without their image tokens (and without the vision start / end tokens around them), re-left-padded to the
  same length, with their own attention mask and position ids (counted over their real tokens). They carry
  no image token, so the image features (pixel values, or what `generate` encoded before the forward) go to
  rows 0..B-1 alone; per-token type ids are 0 on them;
- at each decoding step the same hook expands input_ids (the generated token goes to both rows), the
  attention mask (the branch's prompt mask kept from the prefill, then the real rows' columns of the
  generated tokens), position ids (the branch's own count of real tokens) and cache_position (shared: both
  halves have the same length);
- the post-forward hook combines the last position's logits of rows B..2B-1 into rows 0..B-1 and returns an
  output of B rows (logits, and hidden states / attentions when asked for): `generate` sees B rows; the
  DynamicCache simply holds 2B rows.

Methods never act on the branch rows: `CallState.rows` stays the B real rows (`CallState.branch_rows` counts
the extra ones), the attention function computes its eager rows on batch rows 0..B-1 only (the branch
rows take the model's own attention), and the sink scores are read on rows 0..B-1.

Limits: a static cache (compiled generation, `cache_implementation="static"`) is sized for B rows and cannot
hold the 2B: refused at the prefill with a VlmfixError (use the default dynamic cache). One runtime with
branches per attach; not with in-place pruning or mask-replacing methods (refused at attach). Right-padded
prompts are refused (the branch rows are left-padded). A decoding step reads no host value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from vlmfix.core.errors import VlmfixError

#: the branch kinds attach knows how to build
KINDS = ("no_image",)

#: per-token inputs (B, L) whose branch rows are zeros (token types: the branch has no image token)
_TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")


@dataclass
class Branch:
    """The branch rows of one call: `real` real rows, the prompt length, the branch's prompt mask (B, L) on the
    model's device, and the call that combines the logits."""

    real: int
    prompt_len: int
    mask: torch.Tensor
    combiner: Any
    #: the columns the cache holds before the next step (the prompt, then the generated tokens; host ints)
    length: int = 0


def removed_ids(adapter: Any) -> set[int]:
    """Token ids the "no_image" branch drops: the visual tokens and the vision start / end markers."""
    config = adapter.model.config
    ids = set(adapter.visual_token_ids)
    for name in ("vision_start_token_id", "vision_end_token_id", "boi_token_id", "eoi_token_id",
                 "image_start_token_id", "image_end_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def _positions(mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """The position ids of the last `q_len` columns of rows with attention mask `mask` (B, K): each real
    token's count of real tokens before it (padding at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]


def _expand_positions(position_ids: torch.Tensor | None, branch: torch.Tensor, start: int) -> torch.Tensor:
    """Cat the branch's text positions (B, Q) to `position_ids` (B, Q), or (A, B, Q) for multi-axis rope
    (every axis of a text token holds its text position); None: the model's default, start .. start + Q - 1."""
    b, q = branch.shape
    if position_ids is None:
        position_ids = torch.arange(start, start + q, device=branch.device)[None].expand(b, q)
    elif position_ids.shape[-2] != b:  # broadcast over the batch
        position_ids = position_ids.expand(*position_ids.shape[:-2], b, q)
    branch = branch.to(position_ids.dtype)
    if position_ids.dim() == 3:
        return torch.cat([position_ids, branch[None].expand(position_ids.shape[0], -1, -1)], dim=1)
    return torch.cat([position_ids, branch], dim=0)


def prefill_inputs(args: tuple, kwargs: dict, adapter: Any, rows: Sequence[Any], combiner: Any,
                   kinds: Sequence[str]) -> tuple[tuple, dict, Branch]:
    """The prefill's (args, kwargs) with the branch rows added (see the module docstring), and the `Branch`."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise VlmfixError(f"unknown contrast branch kinds {unknown}; known: {', '.join(KINDS)}")
    kwargs = dict(kwargs)
    if args:
        kwargs.setdefault("input_ids", args[0])
        args = args[1:]
    ids = kwargs.get("input_ids")
    if ids is None:
        raise VlmfixError("a contrast branch is built from input_ids; this forward brought only inputs_embeds")
    if kwargs.get("inputs_embeds") is not None:
        raise VlmfixError("a contrast branch cannot be built for a forward given inputs_embeds: pass input_ids")
    if any(r.pad_right for r in rows):
        raise VlmfixError("a contrast branch needs left-padded prompts (padding_side=\"left\")")
    b, length = ids.shape
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    drop = torch.isin(ids, torch.tensor(sorted(removed_ids(adapter)), device=ids.device))
    keep = mask.bool() & ~drop
    branch_ids = torch.zeros_like(ids)
    branch_mask = torch.zeros_like(mask)
    counts = keep.sum(1).tolist()  # the prefill may read the host
    for r in range(b):
        n = counts[r]
        if n:
            branch_ids[r, length - n:] = ids[r][keep[r]]
            branch_mask[r, length - n:] = 1
    pad = getattr(adapter.model.config.get_text_config(), "pad_token_id", None)
    if pad is not None and not isinstance(pad, (list, tuple)):
        branch_ids[branch_mask == 0] = int(pad)
    kwargs["input_ids"] = torch.cat([ids, branch_ids])
    kwargs["attention_mask"] = torch.cat([mask, branch_mask])
    kwargs["position_ids"] = _expand_positions(kwargs.get("position_ids"), _positions(branch_mask, length), 0)
    for name in _TOKEN_TYPES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[:2] == (b, length):
            kwargs[name] = torch.cat([value, torch.zeros_like(value)])
    return args, kwargs, Branch(b, length, branch_mask, combiner, length)


def step_inputs(args: tuple, kwargs: dict, branch: Branch) -> tuple[tuple, dict]:
    """A decoding step's (args, kwargs) with the branch rows added (tensor ops only: no host read)."""
    kwargs = dict(kwargs)
    if args:
        kwargs.setdefault("input_ids", args[0])
        args = args[1:]
    ids = kwargs["input_ids"]
    q = ids.shape[1]
    kwargs["input_ids"] = torch.cat([ids, ids])
    mask = kwargs.get("attention_mask")
    if mask is None:  # every real token (a batch without padding): the cache's columns and this step's
        mask = torch.ones(branch.real, branch.length + q, dtype=branch.mask.dtype, device=ids.device)
    branch_mask = torch.cat([branch.mask.to(mask.dtype), mask[:, branch.prompt_len:]], dim=1)
    kwargs["attention_mask"] = torch.cat([mask, branch_mask])
    kwargs["position_ids"] = _expand_positions(kwargs.get("position_ids"), _positions(branch_mask, q), branch.length)
    branch.length += q
    for name in _TOKEN_TYPES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[0] == branch.real:
            kwargs[name] = torch.cat([value, torch.zeros_like(value)])
    return args, kwargs


def _rows(value: Any, real: int) -> Any:
    """`value` cut to its first `real` batch rows (tensors; tuples of tensors), else itself."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 2 * real:
        return value[:real]
    if isinstance(value, tuple):
        return tuple(_rows(v, real) for v in value)
    return value


def combine_output(output: Any, branch: Branch, last: torch.Tensor | None) -> Any:
    """The forward's output with B rows: the logits of rows 0..B-1 with their last position (`last` (B,), each
    row's last real token at a full-length prefill; None: the last column) replaced by the combiner's
    result over rows 0..B-1 and B..2B-1."""
    logits = output.logits
    real = branch.real
    main, other = logits[:real], logits[real:]
    if last is None:
        pick = main[:, -1]
        where = None
    else:
        where = last.to(logits.device)
        pick = main[torch.arange(real, device=logits.device), where]
    combined = branch.combiner.combine(pick.float(), other[:, -1].float()).to(logits.dtype)
    new = main.clone()
    if where is None:
        new[:, -1] = combined
    else:
        new[torch.arange(real, device=logits.device), where] = combined
    for key in list(output.keys()):
        if key == "logits":
            output[key] = new
        elif key in ("hidden_states", "attentions"):  # per layer, batch first (image features are not per row)
            output[key] = _rows(output[key], real)
    return output
