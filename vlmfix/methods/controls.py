"""The controls of token-pruning tables: seeded random selection and spatial pooling of the image grid, at
the same budget as the pruners (VTC-Bench, arXiv 2510.07143: plain downsampling beats many pruners, so a
spatial baseline belongs in every table).

Both act on the hidden states entering decoder layer `layer` (default 0: the input embeddings, before the
decoder), with FastV's budget vocabulary (`keep` tokens or `keep_ratio` of each row's image tokens), in
the two forms of `vlmfix.methods.prune` ("inplace": the dropped tokens leave the sequence and the KV
cache; "mask": they are masked out as keys, and static caches run it). Kept tokens keep their
positions (rotary, Qwen2-VL's 3-D positions).

`random` (`RandomPrune`): a row with n image tokens keeps the first `budget` of a permutation of its n
tokens drawn from a generator seeded with `seed` (newline tokens are image tokens like the others).
The draw depends on the seed and n only, never on the other rows of the batch: a row keeps in a batch
what it keeps alone (two rows with as many image tokens keep the same offsets).

`pool` (`PoolPrune`): average pooling of each grid (an image, a tile, a crop grid, a video frame: every
`ImageSegment`) to a smaller grid, a merge: the rows x cols grid is cut into r' x c' blocks of
neighbouring tokens (block i spans rows floor(i rows / r') .. floor((i + 1) rows / r') - 1, columns alike)
and each block becomes one token, the mean of its tokens' hidden states, at the position of its
top-left token. Choices (also in docs/methods.md, "Controls: random and pool"):
- pooling (a merge) rather than a strided subset, as VTC-Bench's downsampling averages pixels;
- the row's budget goes first to its image tokens outside any grid (a CLS token, LLaVA-NeXT's and
  LLaVA-OneVision's lone trailing newline), kept as they are, then to the grids in proportion to their
  tokens (floor); a grid gets r' = round(rows sqrt(k / (rows cols))) block rows (1 .. rows) and
  c' = k // r' columns (1 .. cols), so a square grid at keep 64 of 576 pools 3 x 3 blocks into 8 x 8;
  at least one block per grid, whatever the budget (the record notes where the kept count is not the
  budget);
- newline tokens (LLaVA-NeXT's image_newline closing each grid row): never pooled across block rows:
  block row i keeps one newline, the one closing its last grid row, into which the others of its rows
  are merged (they hold the same learned vector), and it counts in the budget (a grid with newlines
  gets r' (c' + 1) <= k).

The record is a `PruneRecord` (kept tokens per row; pool's stage also holds its groups: `owner`, and
`PruneStage.groups`). Neither reads attention, so `Debias` does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.core.state import CallState, ImageSegment, RowLayout
from vlmfix.methods.base import MethodConfig, check_choice, is_int, raise_problems
from vlmfix.methods.prune import (FORMS, HiddenInPlaceCall, HiddenMaskCall, HiddenStates, KeepRuntime, RowChoice,
                                  keep_problems)
from vlmfix.methods.registry import register_method


# -- the choices, one row at a time ---------------------------------------------------------------------
def random_choice(n: int, budget: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kept offsets among n image tokens, sorted; each token's score: 1 for the permutation's first, down
    to 1/n): the first `budget` of a permutation drawn from a generator seeded with `seed`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scores = torch.empty(n)
    scores[perm] = torch.arange(n, 0, -1, dtype=torch.float32) / n
    return perm[:budget].sort().values, scores


def pooled_shape(rows: int, cols: int, k: int, newline: bool = False) -> tuple[int, int]:
    """(r', c'): the block grid of a rows x cols grid pooled to at most k tokens (r' (c' + 1) with a newline per
    row), at least 1 x 1 (see the module docstring)."""
    nl = int(newline)
    r = min(rows, max(1, round(rows * math.sqrt(k / (rows * (cols + nl))))))
    c = min(cols, max(1, k // r - nl))
    if r * (c + nl) > k:
        r = max(1, k // (c + nl))
    return r, c


def pool_segment(seg: ImageSegment, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One grid pooled to at most k tokens: (the segment's positions: its patches then its newlines, each one's
    group head: the kept position it stands for, itself for a kept one), in prompt positions."""
    grid = seg.grid_positions()
    r, c = pooled_shape(seg.rows, seg.cols, k, seg.newline)
    row_cuts = torch.tensor([i * seg.rows // r for i in range(r + 1)])
    col_cuts = torch.tensor([j * seg.cols // c for j in range(c + 1)])
    block_row = torch.searchsorted(row_cuts, torch.arange(seg.rows), right=True) - 1  # (rows,) block row of each
    block_col = torch.searchsorted(col_cuts, torch.arange(seg.cols), right=True) - 1
    head = grid[row_cuts[block_row][:, None], col_cuts[block_col][None, :]]  # a block's top-left cell
    positions, heads = [grid.flatten()], [head.flatten()]
    if seg.newline:  # a block row's newlines stand for the one closing its last grid row
        lines = seg.newline_positions()
        positions.append(lines)
        heads.append(lines[row_cuts[block_row + 1] - 1])
    return torch.cat(positions), torch.cat(heads)


def pool_row(row: RowLayout, budget: int) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Pool one row's grids to `budget` tokens: (the kept positions, sorted; per image token the kept position it is
    merged into, -1 for none; a note where the kept count is not the budget, or None)."""
    img = row.image_positions
    sizes = [s.rows * s.cols for s in row.segments]
    in_grids = torch.cat([torch.cat([s.grid_positions().flatten(), s.newline_positions()]) for s in row.segments]) \
        if row.segments else img[:0]
    outside = img[~torch.isin(img, in_grids)]
    room = budget - len(outside)
    pooled = [pool_segment(seg, max(1, room * size // sum(sizes))) for seg, size in zip(row.segments, sizes)]
    owner = torch.full((len(img),), -1, dtype=torch.long)
    kept = [outside]
    for positions, heads in pooled:
        kept.append(heads.unique())
        merged = heads != positions
        owner[torch.searchsorted(img, positions[merged])] = heads[merged]
    kept_t = torch.cat(kept).sort().values
    note = None
    if len(kept_t) != budget:
        grids = ", ".join(f"{s.name} {s.rows}x{s.cols}" for s in row.segments)
        note = (f"row {row.index}: pooled to {len(kept_t)} tokens, not the budget {budget} (grids {grids}; "
                f"{len(outside)} image tokens outside any grid kept as they are; whole blocks only)")
    return kept_t, owner, note


# -- runtimes ----------------------------------------------------------------------------------------
class ControlRuntime(KeepRuntime):
    """A control bound to a model: one stage at `layer`, chosen one row at a time (`choose`)."""

    scoring = HiddenStates()
    forms = {"mask": HiddenMaskCall, "inplace": HiddenInPlaceCall}
    first_layer = 0


class RandomRuntime(ControlRuntime):
    def choose(self, state: CallState, row: RowLayout, hidden: torch.Tensor, budget: int) -> RowChoice:
        offsets, scores = random_choice(len(row.image_positions), budget, int(self.config.seed))
        return RowChoice(row.image_positions[offsets], scores)


class PoolRuntime(ControlRuntime):
    def choose(self, state: CallState, row: RowLayout, hidden: torch.Tensor, budget: int) -> RowChoice:
        kept, owner, note = pool_row(row, budget)
        img = row.image_positions
        sizes = torch.zeros(len(img))  # the record's score: a kept token's group size, 0 for a merged one
        sizes[torch.searchsorted(img, kept)] = 1.0
        merged = owner >= 0
        sizes.index_add_(0, torch.searchsorted(img, owner[merged]), torch.ones(int(merged.sum())))
        return RowChoice(kept, sizes, owner, note)


# -- configs -------------------------------------------------------------------------------------------
def _control_problems(name: str, config: "RandomPrune | PoolPrune") -> None:
    raise_problems(name, [
        f"layer must be an int >= 0, got {config.layer!r}" if not is_int(config.layer) or config.layer < 0 else None,
        *keep_problems(config.keep, config.keep_ratio),
        check_choice("form", config.form, FORMS),
    ])


@dataclass
class RandomPrune(MethodConfig):
    """The random control: each image row keeps `keep` (128 when neither is given) or `keep_ratio` of its image
    tokens, drawn by a generator seeded with `seed`, from decoder layer `layer` on (0: before the decoder);
    form "inplace" or "mask" (the form that runs under a static cache)."""

    layer: int = 0
    keep: int | None = None
    keep_ratio: float | None = None
    seed: int = 0
    form: str = "inplace"

    default_keep: ClassVar[int] = 128

    def __post_init__(self) -> None:
        _control_problems("RandomPrune", self)
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"RandomPrune: seed must be an int >= 0, got {self.seed!r}")

    def stage_layers(self) -> tuple[int, ...]:
        return (int(self.layer),)


@dataclass
class PoolPrune(MethodConfig):
    """The pooling control: each grid of an image row (image, tile, frame) average-pooled to a smaller grid so
    that the row keeps at most `keep` (128 when neither is given) or `keep_ratio` of its image tokens, from
    decoder layer `layer` on (0: before the decoder); form "inplace" or "mask" (the form that runs under a
    static cache)."""

    layer: int = 0
    keep: int | None = None
    keep_ratio: float | None = None
    form: str = "inplace"

    default_keep: ClassVar[int] = 128

    def __post_init__(self) -> None:
        _control_problems("PoolPrune", self)

    def stage_layers(self) -> tuple[int, ...]:
        return (int(self.layer),)


__all__ = ["PoolPrune", "PoolRuntime", "RandomPrune", "RandomRuntime", "pool_row", "pooled_shape", "random_choice"]

register_method(name="random", config=RandomPrune, runtime=RandomRuntime,
                summary="random control: keep a seeded random subset of the image tokens, before the decoder")
register_method(name="pool", config=PoolPrune, runtime=PoolRuntime,
                summary="pooling control (VTC-Bench): average-pool each image grid to the budget, before the decoder")
