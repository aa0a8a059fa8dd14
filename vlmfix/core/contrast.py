"""Contrast branches: extra rows of the same forward whose logits a method combines with the real rows'.

A runtime declares the branch its calls contrast against (`Runtime.branches()`: one kind of `KINDS`), and its
call combines the logits (`CombinesLogits.combine(main (B, V), branch (B, V)) -> (B, V)`) at each step: the
prefill's last position and every decoding step. The kinds:

- "no_image": each prompt without its image tokens (and the vision start / end tokens around them),
  re-left-padded to the same length, with its own mask and position ids (counted over its real tokens); no
  image features go to it (PAI, M3ID);
- "same": the same prompt and the same image as the real row (the image's features are reused, not encoded
  again). A method's calls act on these rows to make them differ (ONLY: see "Acting on branch rows");
- "noised": the same prompt, the image with diffusion noise (`Runtime.branch_settings()`: "noise_step",
  "seed"; `diffusion_noise`); the noised pixels are encoded by the vision tower once more (VCD);
- "disturbed": the prompt with an instruction inserted before the user's question
  (`Runtime.branch_settings()`: "prefix_ids", the instruction's token ids), re-tokenized by insertion and
  re-left-padded (ICD). The branch rows are n tokens longer, so the call's prompt gets n more padding
  columns on the left in the real rows too (the call's `CallState` is built from the widened prompt: its
  positions count them); `generate` sees none of it.

How (all in attach's forward hooks; the model and `generate` see nothing):

- at the prefill the pre-forward hook expands the batch from B to 2B rows: rows B..2B-1 are the branch of rows
  0..B-1 (row B + i that of row i), with their own attention mask and position ids; per-image inputs (pixel
  values, image sizes / grids) or the features `generate` encoded before the forward (`mm_encoder_outputs`)
  are extended with the branch rows' images (none for "no_image"); per-token type ids follow the tokens;
- at each decoding step the same hook expands input_ids (the generated token goes to both rows), the
  attention mask and position ids (tensor ops only);
- the post-forward hook combines the last position's logits of rows B..2B-1 into rows 0..B-1 and returns an
  output of B rows (logits, and hidden states / attentions when asked for): `generate` sees B rows; the KV
  cache (dynamic, or static: a static cache sizes its batch at the prefill's first write) holds 2B rows.

Compiled generation (static cache): generate hands a static cache's forwards 4-D masks (B, 1, Q, K) (or a
dict of them); the branch rows get theirs from the real rows' causal limit and the branch prompt's mask
(`_branch_4d`), and a "no_image" branch's decoding positions are the real rows' text positions less the real
tokens its prompt lacks (`Branch.delta`). In a compiled decoding step (transformers compiles the forward,
hooks included) the pre-hook does only the branch's input expansion and the post-hook only the combination,
both tensor ops, traced into the graph. "disturbed" is refused with a static cache (its widened prompt
overflows a cache sized for the prompt).

Acting on branch rows (the API the "same" kind is for). By default a call's capabilities (`queries`, `bias`,
`edit`, `observe`) see the B real rows only: the attention function cuts query / key / value / mask to rows
0..B-1, and the branch rows take the model's own attention. A call class that sets
`MethodCall.batch_rows = "branch"` sees the branch rows only (tensors of B rows: rows B..2B-1, in the real
rows' order), and `"all"` sees all 2B rows (real rows first; `CallState.branch_flags()` is the (2B,) bool
tensor marking the branch rows, on the model's device: a decoding step reads only tensors). The real rows'
attention stays the model's own (never recomputed) unless a call that sees them asks for their queries. With
"same" / "noised" the branch rows' positions and layouts are the real rows' (`CallState.rows` describes
both); with "no_image" / "disturbed" they differ (`Branch.mask` is the branch rows' prompt mask). Example:
ONLY sets `batch_rows = "branch"` and biases one layer's scores of the "same" branch, then `combine`s.

Limits: one runtime with branches per attach; not with in-place pruning or mask-replacing methods (refused at
attach). Right-padded prompts are refused (the branch rows are left-padded). A decoding step reads no host
value.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlmfix.core.errors import VlmfixError
from vlmfix.core.protocol import CombinesLogits, HeatMaps, MethodCall, Record

#: the branch kinds attach knows how to build
KINDS = ("no_image", "same", "noised", "disturbed")
#: kinds whose branch rows have the real rows' tokens, mask and positions
SAME_LAYOUT = ("same", "noised")

#: per-token inputs (B, L) other than ids and mask (token types: 0 on text, the image's type on image tokens)
_TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")
#: pixel inputs of a modality (the encoder's main input), as `generate` names them
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}

#: the forward diffusion's schedule for the noised branch: T = 1000 steps, beta_t = 1e-5 + (5e-3 - 1e-5) *
#: sigmoid(s_t), s_t evenly spaced over [-6, 6] (the VCD authors' published schedule)
DIFFUSION_STEPS = 1000
BETA_MIN, BETA_MAX = 1e-5, 5e-3


def diffusion_abar(step: int) -> float:
    """abar_t = prod_{s <= t} (1 - beta_s) of the schedule above at step t (0 .. DIFFUSION_STEPS - 1, from 0)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (BETA_MAX - BETA_MIN) + BETA_MIN
    return float(torch.cumprod(1 - betas, 0)[step])


@dataclass
class Branch:
    """The branch rows of one call: `real` real rows, its `kind`, the prefill's columns, the branch's prompt
    mask (B, prompt_len) on the model's device, the call that combines the logits and, for "disturbed", the
    `shift` columns of padding added on the left of the real rows (generate's masks lack them)."""

    real: int
    kind: str
    prompt_len: int
    mask: torch.Tensor
    combiner: Any
    #: the columns the cache holds before the next step (the prompt, then the generated tokens; host ints)
    length: int = 0
    shift: int = 0
    #: (B,) on the model's device: real tokens of each real row's prompt minus its branch's ("no_image")
    delta: torch.Tensor | None = None


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


def diffusion_noise(pixels: torch.Tensor, step: int, seed: int, grid: torch.Tensor | None = None) -> torch.Tensor:
    """`pixels` noised by the forward diffusion q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) at step `step`
    (`diffusion_abar`), on the model's input pixels as the processor made them (normalized; not clamped).

    The noise is deterministic and per image: each unit (an (C, H, W) image or tile of a 4-D or 5-D tensor; the
    rows of one image of a flat (patches, D) tensor, `grid` (images, 3) its t, h, w) draws from a generator
    seeded with `seed` and a digest of the unit's own pixels, so an image gets the same noise alone or in any
    batch. The host reads the pixels (a prefill, never a decoding step)."""
    abar = diffusion_abar(step)
    if pixels.dim() >= 4:
        units = list(pixels.reshape(-1, *pixels.shape[-3:]))
    elif pixels.dim() == 2 and grid is not None:
        units = list(pixels.split(grid.prod(-1).tolist()))
    else:
        units = [pixels]
    noise = []
    for unit in units:
        host = unit.detach().float().cpu().contiguous()
        digest = hashlib.blake2b(host.numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))
        noise.append(torch.randn(host.shape, generator=g, dtype=torch.float32))
    eps = torch.stack(noise) if pixels.dim() >= 4 else torch.cat(noise)
    eps = eps.reshape(pixels.shape).to(pixels.device)
    return (math.sqrt(abar) * pixels.float() + math.sqrt(1 - abar) * eps).to(pixels.dtype)


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


def _twice(positions: torch.Tensor, branch: torch.Tensor, b: int) -> torch.Tensor:
    """Cat `branch` (same shape as `positions`: (B, Q) or (A, B, Q), broadcast over a batch of 1) along the batch."""
    if positions.shape[-2] != b:
        positions = positions.expand(*positions.shape[:-2], b, positions.shape[-1])
        branch = branch.expand(*branch.shape[:-2], b, branch.shape[-1])
    return torch.cat([positions, branch], dim=-2)


def _mask_map(mask: Any, fn: Any) -> Any:
    """`fn` applied to a 4-D mask, or to each of a dict of them (one per attention type)."""
    return {k: fn(v) for k, v in mask.items()} if isinstance(mask, dict) else fn(mask)


def _is_4d(mask: Any) -> bool:
    """Whether `mask` is what generate builds for a static cache: a 4-D mask (B, 1, Q, K), or a dict of them."""
    return isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)


def _rows_2d(mask: Any) -> torch.Tensor:
    """The (B, L) padding mask of a prefill's 4-D mask (B, 1, L, K): the last query row over the prompt's columns."""
    m = next(iter(mask.values())) if isinstance(mask, dict) else mask
    length = m.shape[-2]
    last = m[:, 0, -1, :length]
    return (last if last.dtype == torch.bool else last == 0).long()


def _branch_4d(real: torch.Tensor, branch_cols: torch.Tensor) -> torch.Tensor:
    """The branch rows' 4-D mask: a real row's query may see key k when k is at most its own column (the last key
    its real row's mask allows: the causal limit) and the branch row's column k holds a real token
    (`branch_cols` (B, K) bool: the branch prompt's mask, then every generated column)."""
    allowed = real if real.dtype == torch.bool else real == 0
    cols = torch.arange(real.shape[-1], device=real.device)
    limit = torch.where(allowed, cols, -1).amax(-1, keepdim=True)  # (B, 1, Q, 1)
    out = (cols <= limit) & branch_cols[:, None, None, :]
    if real.dtype == torch.bool:
        return out
    return torch.zeros_like(real).masked_fill(~out, torch.finfo(real.dtype).min)


def _static_cols(branch_mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K) bool: the branch prompt's mask (B, L) followed by K - L generated columns."""
    return torch.cat([branch_mask.bool(), branch_mask.new_ones(branch_mask.shape[0], k - branch_mask.shape[1],
                                                               dtype=torch.bool)], dim=1)


def _inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = dict(kwargs)
    if args:
        kwargs.setdefault("input_ids", args[0])
        args = args[1:]
    return args, kwargs


def widen(args: tuple, kwargs: dict, adapter: Any, shift: int) -> tuple[tuple, dict]:
    """A "disturbed" prefill's (args, kwargs) with `shift` columns of padding added on the left of every row
    (ids, mask, position ids, token types), so that the branch rows, `shift` tokens longer, fit beside them.
    Done before the call's state is built (its positions count the new columns)."""
    args, kwargs = _inputs(args, kwargs)
    ids = kwargs.get("input_ids")
    if ids is None or kwargs.get("inputs_embeds") is not None:
        raise VlmfixError("a contrast branch is built from input_ids; this forward brought inputs_embeds: pass input_ids")
    b, length = ids.shape
    mask = kwargs.get("attention_mask")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if _is_4d(mask) or getattr(cache, "is_compileable", False):
        raise VlmfixError("the disturbed branch (ICD) widens the prompt, which a static cache sized for the prompt "
                          "cannot hold: generate with the default dynamic cache (no cache_implementation=\"static\")")
    if mask is None:
        mask = torch.ones_like(ids)
    positions = kwargs.get("position_ids")
    if positions is None:
        if (getattr(adapter.model.config.get_text_config(), "rope_parameters", None) or {}).get("mrope_section"):
            raise VlmfixError("this branch needs the multi-axis position ids that generate passes to "
                              f"{type(adapter.model).__name__}: use generate (or pass position_ids)")
        positions = torch.arange(length, device=ids.device)[None].expand(b, length)  # the model's default
    kwargs["input_ids"] = F.pad(ids, (shift, 0), value=_pad_id(adapter))
    kwargs["attention_mask"] = F.pad(mask, (shift, 0))
    kwargs["position_ids"] = F.pad(positions, (shift, 0))
    for name in _TOKEN_TYPES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[:2] == (b, length):
            kwargs[name] = F.pad(value, (shift, 0))
    return args, kwargs


def _pad_id(adapter: Any) -> int:
    pad = getattr(adapter.model.config.get_text_config(), "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


def _per_image_keys(model: Any, modality: str) -> tuple[str, ...]:
    """The inputs the model's `get_<modality>_features` takes (pixels, sizes, grids), as `generate` finds them."""
    fn = getattr(getattr(model, "base_model", model), f"get_{modality}_features", None)
    if fn is None:
        return ()
    return tuple(k for k in inspect.signature(fn).parameters if k not in ("kwargs", "return_dict"))


def _doubled(output: Any, branch: Any) -> Any:
    """An encoder output (`mm_encoder_outputs[modality]`) whose per-image features are followed by `branch`'s
    (another such output: the noised images' features; or None: the same features again)."""
    other = output if branch is None else branch
    new = copy.copy(output)
    for key, per_layer in (("pooler_output", False), ("deepstack_features", True)):
        mine, theirs = output.get(key), other.get(key)
        if mine is None:
            continue
        if per_layer:  # a list over layers of the features of every image token
            new[key] = [torch.cat([a, c]) for a, c in zip(mine, theirs)]
        elif isinstance(mine, torch.Tensor):
            new[key] = torch.cat([mine, theirs])
        else:
            new[key] = type(mine)(list(mine) + list(theirs))
    return new


def _branch_images(kwargs: dict, model: Any, kind: str, settings: dict, encoded: dict | None) -> None:
    """Give the branch rows their images (in place on `kwargs`): the per-image inputs followed by the branch
    rows' (the same, or noised), or the features `generate` encoded followed by the branch's (`encoded`: what
    the noised pixels encoded to, per modality)."""
    outputs = kwargs.get("mm_encoder_outputs")
    if outputs:
        if kind == "noised" and any(m not in (encoded or {}) for m in outputs):
            raise VlmfixError("the noised branch needs the pixels, and this forward brought encoded features only "
                              "(mm_encoder_outputs that vlmfix did not see encoded): pass pixel_values")
        kwargs["mm_encoder_outputs"] = {m: _doubled(o, (encoded or {}).get(m) if kind == "noised" else None)
                                        for m, o in outputs.items()}
    for modality, main in _PIXELS.items():
        pixels = kwargs.get(main)
        if pixels is None:
            continue
        keys = _per_image_keys(model, modality)
        if kind == "noised":
            if modality == "video":
                raise VlmfixError("the noised branch (VCD) noises images; this batch has videos")
            grid = kwargs.get("image_grid_thw")
            pixels = noise_pixels(pixels, settings, grid)
        for key in keys:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim():
                kwargs[key] = torch.cat([value, pixels if key == main else value])


def noise_pixels(pixels: torch.Tensor, settings: dict, grid: torch.Tensor | None) -> torch.Tensor:
    """The noised branch's pixels (`diffusion_noise` at the runtime's "noise_step" and "seed")."""
    return diffusion_noise(pixels, int(settings["noise_step"]), int(settings.get("seed", 0)), grid)


def prefill_inputs(args: tuple, kwargs: dict, adapter: Any, rows: Sequence[Any], combiner: Any, kind: str,
                   settings: dict | None = None, encoded: dict | None = None) -> tuple[tuple, dict, Branch]:
    """The prefill's (args, kwargs) with the branch rows added (see the module docstring), and the `Branch`.
    A "disturbed" prefill comes here already `widen`ed; `settings` are the runtime's `branch_settings()`;
    `encoded` what the noised pixels encoded to before the forward, per modality."""
    if kind not in KINDS:
        raise VlmfixError(f"unknown contrast branch kind {kind!r}; known: {', '.join(KINDS)}")
    settings = settings or {}
    args, kwargs = _inputs(args, kwargs)
    ids = kwargs.get("input_ids")
    if ids is None or kwargs.get("inputs_embeds") is not None:
        raise VlmfixError("a contrast branch is built from input_ids; this forward brought inputs_embeds: pass input_ids")
    if any(r.pad_right for r in rows):
        raise VlmfixError("a contrast branch needs left-padded prompts (padding_side=\"left\")")
    b, length = ids.shape
    mask = kwargs.get("attention_mask")
    static = _is_4d(mask)
    if static:
        mask4d, mask = mask, _rows_2d(mask)
    elif mask is None:
        mask = torch.ones_like(ids)
    positions = kwargs.get("position_ids")
    shift = 0
    if kind in SAME_LAYOUT:
        branch_ids, branch_mask = ids, mask
        kwargs["position_ids"] = None if positions is None else _twice(positions, positions, b)
        types = {n: v for n in _TOKEN_TYPES if isinstance(v := kwargs.get(n), torch.Tensor) and v.shape[:2] == (b, length)}
    elif kind == "no_image":
        branch_ids, branch_mask = _drop(ids, mask, torch.tensor(sorted(removed_ids(adapter)), device=ids.device), adapter)
        kwargs["position_ids"] = _expand_positions(positions, _positions(branch_mask, length), 0)
        types = {n: torch.zeros_like(v) for n in _TOKEN_TYPES
                 if isinstance(v := kwargs.get(n), torch.Tensor) and v.shape[:2] == (b, length)}
    else:  # disturbed: the instruction inserted before each row's question (rows without one keep their prompt)
        prefix = torch.as_tensor(settings["prefix_ids"], dtype=ids.dtype, device=ids.device)
        shift = len(prefix)
        branch_ids, branch_mask, kwargs["position_ids"], types = _disturb(ids, mask, positions, kwargs, rows, prefix)
    kwargs["input_ids"] = torch.cat([ids, branch_ids])
    if not static:
        kwargs["attention_mask"] = torch.cat([mask, branch_mask])
    elif kind in SAME_LAYOUT:
        kwargs["attention_mask"] = _mask_map(mask4d, lambda m: torch.cat([m, m]))
    else:
        kwargs["attention_mask"] = _mask_map(mask4d, lambda m: torch.cat([m, _branch_4d(m, _static_cols(branch_mask, m.shape[-1]))]))
    for name, value in types.items():
        kwargs[name] = torch.cat([kwargs[name], value])
    if kind != "no_image":
        _branch_images(kwargs, adapter.model, kind, settings, encoded)
    delta = (mask.sum(1) - branch_mask.sum(1)).to(ids.device)
    return args, kwargs, Branch(b, kind, length, branch_mask, combiner, length, shift, delta)


def _drop(ids: torch.Tensor, mask: torch.Tensor, drop_ids: torch.Tensor, adapter: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of each row without the tokens `drop_ids`, re-left-padded to the same length."""
    keep = mask.bool() & ~torch.isin(ids, drop_ids)
    branch_ids = torch.full_like(ids, _pad_id(adapter))
    branch_mask = torch.zeros_like(mask)
    length = ids.shape[1]
    for r, n in enumerate(keep.sum(1).tolist()):  # the prefill may read the host
        if n:
            branch_ids[r, length - n:] = ids[r][keep[r]]
            branch_mask[r, length - n:] = 1
    return branch_ids, branch_mask


def _disturb(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kwargs: dict, rows: Sequence[Any],
             prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The "disturbed" branch of a widened prefill: `prefix` inserted before each row's question (the first
    position of `RowLayout.query_positions`; a row without one keeps its prompt), the row's real tokens moved
    left over the widening's padding. Position ids: the real row's before the insertion, then the inserted
    tokens continue from the question's position, and every later token is `n` further on (every rope axis: the
    question is text). Returns (ids, mask, position ids of all 2B rows, the branch's token types)."""
    n = len(prefix)
    b, length = ids.shape
    branch_ids, branch_mask = ids.clone(), mask.clone()
    branch_pos = positions.clone()
    types = {name: v.clone() for name in _TOKEN_TYPES
             if isinstance(v := kwargs.get(name), torch.Tensor) and v.shape[:2] == (b, length)}
    steps = torch.arange(n, device=ids.device)
    for r, row in enumerate(rows):
        if row.query_positions is None or not len(row.query_positions):
            continue
        at = int(row.query_positions[0])  # a column of the widened prompt (the state was built from it)
        # columns n .. at-1 move to 0 .. at-n-1, the prefix fills at-n .. at-1, the rest stays
        branch_ids[r, :at - n] = ids[r, n:at]
        branch_ids[r, at - n:at] = prefix
        branch_mask[r, :at - n] = mask[r, n:at]
        branch_mask[r, at - n:at] = 1
        start = positions[..., r, at]
        branch_pos[..., r, :at - n] = positions[..., r, n:at]
        branch_pos[..., r, at - n:at] = start[..., None] + steps
        branch_pos[..., r, at:] = positions[..., r, at:] + n
        for name, v in types.items():
            v[r, :at - n] = kwargs[name][r, n:at]
            v[r, at - n:at] = 0
    return branch_ids, branch_mask, torch.cat([positions, branch_pos], dim=-2), types


def step_inputs(args: tuple, kwargs: dict, branch: Branch) -> tuple[tuple, dict]:
    """A decoding step's (args, kwargs) with the branch rows added (tensor ops only: no host read)."""
    args, kwargs = _inputs(args, kwargs)
    ids = kwargs["input_ids"]
    q = ids.shape[1]
    b = branch.real
    kwargs["input_ids"] = torch.cat([ids, ids])
    mask = kwargs.get("attention_mask")
    if _is_4d(mask):  # a static cache's step (compiled generation): tensor ops on the 4-D masks
        return args, _static_step(kwargs, mask, branch, b)
    if mask is None:  # every real token (a batch without padding): the cache's columns and this step's
        mask = torch.ones(b, branch.length - branch.shift + q, dtype=branch.mask.dtype, device=ids.device)
    real_mask = F.pad(mask, (branch.shift, 0)) if branch.shift else mask
    positions = kwargs.get("position_ids")
    if branch.kind in SAME_LAYOUT:
        branch_mask = real_mask
        if positions is not None:
            kwargs["position_ids"] = _twice(positions, positions, b)
    else:
        branch_mask = torch.cat([branch.mask.to(mask.dtype), mask[:, branch.prompt_len - branch.shift:]], dim=1)
        if branch.kind == "disturbed":
            if positions is None:  # the model's default for the real rows (generate's columns)
                positions = torch.arange(q, device=ids.device)[None].expand(b, q) + (real_mask.shape[1] - q - branch.shift)
            kwargs["position_ids"] = _twice(positions, positions + branch.shift, b)
        else:
            kwargs["position_ids"] = _expand_positions(positions, _positions(branch_mask, q), branch.length)
    kwargs["attention_mask"] = torch.cat([real_mask, branch_mask])
    if not torch.compiler.is_compiling():
        branch.length += q
    for name in _TOKEN_TYPES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[0] == b:
            kwargs[name] = torch.cat([value, value if branch.kind != "no_image" else torch.zeros_like(value)])
    return args, kwargs


def _static_step(kwargs: dict, mask: Any, branch: Branch, b: int) -> dict:
    """A static cache's decoding step (`step_inputs`): the 4-D masks of the branch rows built from the real rows'
    causal limit and the branch prompt's mask; a "no_image" branch's positions are the real rows' text positions
    less the real tokens the branch prompt lacks (`Branch.delta`). Tensor ops only."""
    positions = kwargs.get("position_ids")
    if branch.kind in SAME_LAYOUT:
        kwargs["attention_mask"] = _mask_map(mask, lambda m: torch.cat([m, m]))
        if positions is not None:
            kwargs["position_ids"] = _twice(positions, positions, b)
    else:
        kwargs["attention_mask"] = _mask_map(
            mask, lambda m: torch.cat([m, _branch_4d(m, _static_cols(branch.mask, m.shape[-1]))]))
        text = positions[0] if positions.dim() == 3 else positions  # (B, Q): the real rows' text positions
        kwargs["position_ids"] = _expand_positions(positions, text - branch.delta[:, None].to(text.dtype), 0)
    for name in _TOKEN_TYPES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[0] == b:
            kwargs[name] = torch.cat([value, value if branch.kind != "no_image" else torch.zeros_like(value)])
    return kwargs


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
    if where is None:
        new = torch.cat([main[:, :-1], combined[:, None]], dim=1)
    else:
        new = main.clone()
        new[torch.arange(real, device=logits.device), where] = combined
    for key in list(output.keys()):
        if key == "logits":
            output[key] = new
        elif key in ("hidden_states", "attentions"):  # per layer, batch first (image features are not per row)
            output[key] = _rows(output[key], real)
    return output


# -- contrastive decoding over a branch (VCD, ICD) ---------------------------------------------------------
def contrast_logits(logits: torch.Tensor, branch: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Contrastive decoding (Li et al. 2023; VCD, ICD): (1 + alpha) logits - alpha branch, with the adaptive
    plausibility cut: -inf at the tokens whose probability under `logits` is below beta x its maximum (beta = 0:
    no cut). (B, V) fp32 -> (B, V); tensor ops only."""
    out = (1 + alpha) * logits - alpha * branch
    if beta > 0:
        lp = torch.log_softmax(logits, dim=-1)
        out = out.masked_fill(lp < lp.amax(-1, keepdim=True) + math.log(beta), float("-inf"))
    return out


@dataclass
class ContrastRecord(Record):
    """What a contrastive-decoding method did in one call: its settings, which rows it acted on (`acting`; the
    others kept their raw logits, `why` says why) and, per row, the steps (the prefill's and each decoding
    step's) where the contrast changed the greedy pick (`changed`, (B,) on the model's device) of `steps`.
    No heat map: the method acts on the next-token logits, not on prompt positions."""

    settings: dict[str, Any]
    acting: list[bool]
    why: list[str]
    changed: torch.Tensor
    steps: torch.Tensor

    def acted(self) -> list[bool]:
        return list(self.acting)

    def row(self, row: int) -> dict[str, Any]:
        if not self.acting[row]:
            return {"acted": False}
        return {"acted": True, **self.settings, "changed_steps": int(self.changed[row]), "steps": int(self.steps)}

    def notes(self, row: int) -> list[str]:
        return [] if self.acting[row] else [self.why[row]]

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        return [f"{self.method.upper()} contrasts next-token logits, not prompt positions (no heat map); "
                f"{self.row(maps.row)}"]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **self.settings,
                "rows": [{**self.row(r), "notes": self.notes(r)} for r in range(len(self.acting))]}


class ContrastCall(MethodCall, CombinesLogits):
    """A call of a contrastive-decoding method: `contrast_logits` on the rows in `acting`, raw logits elsewhere;
    counts, per row, the steps where the contrast changed the greedy pick (tensor ops only)."""

    record: ContrastRecord

    def __init__(self, runtime: Any, state: Any, alpha: float, beta: float, acting: list[bool], why: list[str],
                 settings: dict[str, Any]):
        self.alpha, self.beta = float(alpha), float(beta)
        self._acting = torch.tensor(acting, device=state.device)[:, None]
        record = self.record_type(settings, acting, why, torch.zeros(len(acting), dtype=torch.long, device=state.device),
                                  torch.zeros((), dtype=torch.long, device=state.device))
        super().__init__(runtime, record)

    def combine(self, logits: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        acting = self._acting.to(logits.device)
        out = torch.where(acting, contrast_logits(logits, branch, self.alpha, self.beta), logits)
        changed = (out.argmax(-1) != logits.argmax(-1)) & acting[:, 0]
        self.record.changed += changed.to(self.record.changed.device)
        self.record.steps += 1
        return out
