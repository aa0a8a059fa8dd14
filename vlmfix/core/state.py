"""Per-call state: what one `generate` (or forward) learned at its prefill, batch-aware.

A `CallState` is created when a forward starts on an empty cache (the prefill) and replaced at the
next prefill; nothing in it outlives that or is shared between models. Positions are absolute
column indices in the padded prompt, which are also the key indices of the KV cache.

Padding, either side: each row's real tokens are those its attention mask marks, from its first
real token (`RowLayout.pad_left`) to its last (`RowLayout.last`; `pad_right` padding positions
follow it). Methods read a row's prompt up to its last real token and act on that token where
they act on "the last prompt position" (its next-token logits), so a left- or right-padded batch
gives each row what the row gives alone. Generation needs left padding (attach refuses a
right-padded prefill that is handed a cache).

Everything a decoding step reads from here is a tensor on the model's device (image mask, sink
masks): it is built during the prefill, and a decoding step never reads a value on the host.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


#: the first decoder layer with sink tokens: massive activations appear in the residual stream entering layer 2
#: (Sun et al., 2024; Kang et al., ICLR 2025), so layers 0 and 1 have none by definition
FIRST_SINK_LAYER = 2


def runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """The maximal runs of consecutive values in sorted `positions` (none for no positions)."""
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    return [run for run in torch.tensor_split(positions, breaks.tolist()) if len(run)]


def above_threshold(phi: torch.Tensor, tau: float | str, first: torch.Tensor) -> torch.Tensor:
    """phi (B, N) > tau, strictly; tau a number or "bos:F" (F x phi of each row's token at `first[b]`)."""
    if isinstance(tau, str):
        frac = float(tau.split(":", 1)[1])
        return phi > frac * phi[torch.arange(phi.shape[0]), first][:, None]
    return phi > tau


@dataclass(frozen=True)
class ImageSegment:
    """A rows x cols grid of visual tokens starting at `start`.

    Each grid row spans `stride` = cols + newline + gap positions: with `newline`, one newline
    *visual* token follows the row's patches (LLaVA-NeXT); `gap` more positions then follow that
    are not visual tokens (Pixtral's [IMG_BREAK] after each row and [IMG_END] after the last).
    `name` tells the segment's role ("image", "base", "crops", "frame0", "tile0"); `image_index`
    which image (or video) of its row it belongs to.
    """

    start: int
    rows: int
    cols: int
    newline: bool = False
    image_index: int = 0
    name: str = "image"
    gap: int = 0

    @property
    def stride(self) -> int:
        """Positions from one grid row's first patch to the next's."""
        return self.cols + int(self.newline) + self.gap

    @property
    def length(self) -> int:
        """Positions the segment spans, its gaps included."""
        return self.rows * self.stride

    def grid_positions(self) -> torch.Tensor:
        """(rows, cols) tensor of the absolute positions of the grid's patch tokens (newlines excluded)."""
        r = torch.arange(self.rows)[:, None] * self.stride
        return self.start + r + torch.arange(self.cols)[None, :]

    def newline_positions(self) -> torch.Tensor:
        """(rows,) absolute positions of the newline tokens closing the grid rows (empty without newlines)."""
        if not self.newline:
            return torch.zeros(0, dtype=torch.long)
        return self.start + torch.arange(self.rows) * self.stride + self.cols


@dataclass
class RowLayout:
    """The spans of one batch row of the prompt, and where its real tokens are (from the attention mask):
    `pad_left` padding positions before its first real token, `pad_right` after its last (a row the mask
    leaves empty has pad_left = prompt_len)."""

    index: int
    pad_left: int
    prompt_len: int
    image_positions: torch.Tensor
    newline_positions: torch.Tensor
    segments: tuple[ImageSegment, ...]
    #: the sorted positions of the user's question, the text of the last user turn (`Adapter.question`; not
    #: contiguous when the image stands between text pieces); None without a tokenizer or without such text
    query_positions: torch.Tensor | None
    #: the decoded tokens at `query_positions`
    query_pieces: tuple[str, ...] | None = None
    pad_right: int = 0

    @property
    def last(self) -> int:
        """The position of the row's last real token, whose logits predict the row's next token."""
        return self.prompt_len - 1 - self.pad_right

    @property
    def has_image(self) -> bool:
        return len(self.image_positions) > 0

    @property
    def note(self) -> str:
        """Why methods leave this row alone ('' when they do not)."""
        return "" if self.has_image else "text-only row: no image tokens, left untouched"

    @property
    def query_runs(self) -> list[tuple[int, int]]:
        """The question's positions as [start, end) runs of consecutive positions (none without a question)."""
        if self.query_positions is None:
            return []
        return [(int(r[0]), int(r[-1]) + 1) for r in runs(self.query_positions)]

    @property
    def after_image(self) -> int | None:
        """First position after the last image token (None for a text-only row)."""
        return int(self.image_positions[-1]) + 1 if self.has_image else None


@dataclass
class SlotMap:
    """Token pruning in force from decoder layer `layer` on, per batch row.

    - pos (B, S): the original prompt position of each slot of the hidden states (sorted). In the
      in-place form S shrinks at each stage; in the mask form nothing moves and pos is 0..P-1;
    - valid (B, S): whether the token in a slot is still in the sequence (in-place batches fill
      short rows with dropped tokens, masked as keys);
    - index (B, S): the gather index into the previous map's slots (in-place), None (mask form);
    - alive (B, prompt_len): which prompt positions are still in the sequence;
    - owner (B, prompt_len) or None: token merging: the prompt position of the kept token that each
      position removed here was merged into (its features folded into that token's), -1 for none (a kept
      position, or one dropped without merging). Earlier stages' merges are not repeated here.
    """

    layer: int
    pos: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor | None
    alive: torch.Tensor
    owner: torch.Tensor | None = None

    def group(self, row: int, position: int) -> torch.Tensor:
        """The sorted prompt positions the kept token at `position` of batch row `row` stands for: itself and
        the positions merged into it (at this stage)."""
        if self.owner is None:
            return torch.tensor([position])
        merged = (self.owner[row] == position).nonzero().flatten()
        return torch.cat([merged, torch.tensor([position])]).sort().values


class Phase(enum.Enum):
    """Where a layer call is: a GIFT-style pre-pass over the prompt (no cache written), the prefill
    of the prompt, or a decoding step (one or a few new tokens after the prompt)."""

    PREPASS = "prepass"
    PREFILL = "prefill"
    DECODE = "decode"


class Block(NamedTuple):
    """One call of one decoder layer's attention, as every method capability receives it.

    - `layer`: the decoder layer (0-indexed); `phase`: a `Phase`;
    - `q_start`: the prompt position of the block's first query row (the prefill and pre-pass: 0);
      None at a decoding step, whose rows follow the prompt (with a static cache their exact
      positions live in tensors, and the host never reads them);
    - `q_len`: query rows in the block; `kv_len`: key columns (in prompt positions after in-place
      pruning: the prompt followed by the generated tokens; a static cache's full length).
    """

    layer: int
    phase: Phase
    q_start: int | None
    q_len: int
    kv_len: int


class Queries(NamedTuple):
    """The query rows of one layer call computed in eager form (the union of what the calls asked).

    `index`: a slice or a (R,) index into the block's queries; `positions`: their prompt positions as a
    CPU tensor (None at a decoding step, where the queries are the whole block); `count`: R.
    """

    index: slice | torch.Tensor
    positions: torch.Tensor | None
    count: int


@dataclass
class CallState:
    """What the current call found; `Attached.last_state` keeps the last one for inspection.

    - `rows`: per batch row layout (image positions, grid, newline tokens, the question, padding);
    - `phi[layer]`: (B, prompt_len) fp32 sink scores of the prefill residual stream entering the
      layer (on the model's device), for layers >= FIRST_SINK_LAYER when a method or report asks for sinks;
    - `calls`: each attached method's call object (`vlmfix.core.protocol.MethodCall`: its tensors and
      its record), in the order the runtimes run; `record(VAR)` the record of one of them;
    - `phase`: a `Phase`; `slot_maps`: the token-pruning stages of this call (`SlotMap`, in layer
      order), empty without pruning. Sink scores are kept over prompt positions: phi is 0 at
      positions pruned away.
    """

    rows: list[RowLayout]
    prompt_len: int
    sink_dims: tuple[int, ...] = ()
    tau: float | str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    phase: Phase = Phase.PREFILL
    phi: dict[int, torch.Tensor] = field(default_factory=dict)
    slot_maps: list[SlotMap] = field(default_factory=list)
    #: the methods' call objects, in the order the runtimes run; read a record with `record`
    calls: list[Any] = field(default_factory=list)
    #: the calls by capability (attach sorts them at the prefill): those that ask for queries (observe, edit
    #: or bias them), replace masks, move tokens, read the inputs
    askers: tuple[Any, ...] = ()
    maskers: tuple[Any, ...] = ()
    movers: tuple[Any, ...] = ()
    readers: tuple[Any, ...] = ()
    #: extra batch rows after the B real ones that the model runs (contrast branches, `vlmfix.core.contrast`):
    #: rows B..B+branch_rows-1 of every layer call, which a call sees only when it asks (`MethodCall.batch_rows`)
    branch_rows: int = 0
    #: the call's contrast branch (`vlmfix.core.contrast.Branch`), None without one
    branch: Any = None
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def last_tokens(self) -> torch.Tensor:
        """(B,) CPU: the position of each row's last real token (`RowLayout.last`)."""
        return torch.tensor([r.last for r in self.rows])

    @property
    def last_range(self) -> range:
        """The prompt positions from the first to the last of the rows' last real tokens (plain ints: no host
        read); one position unless some row is right-padded."""
        lasts = [r.last for r in self.rows]
        return range(min(lasts), max(lasts) + 1)

    def text_after_image(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, R) CPU bool: whether prompt position `positions[i]` (R,) holds text after batch row b's image,
        from the first position after the image to the row's last real token (right padding excluded);
        all False in a text-only row."""
        starts = torch.tensor([r.after_image if r.has_image else self.prompt_len for r in self.rows])
        return (positions[None, :] >= starts[:, None]) & (positions[None, :] <= self.last_tokens()[:, None])

    @property
    def first_after_image(self) -> int | None:
        """The first position after any batch row's image (None: no row has an image)."""
        starts = [r.after_image for r in self.rows if r.has_image]
        return min(starts) if starts else None

    # -- records ----------------------------------------------------------------------------------
    def record(self, method: Any, index: int | None = None) -> Any:
        """The record of one attached method in this call: `method` is its config class (VAR), or the
        config instance given to attach. With several instances of one class, pass `index` (0-based,
        in the order given to attach) or the instance."""
        if isinstance(method, type):
            found = [c.record for c in self.calls if isinstance(c.runtime.config, method)]
            what = method.__name__
        else:
            found = [c.record for c in self.calls if c.runtime.config is method]
            what = repr(method)
        if not found:
            raise KeyError(f"no {what} was attached in this call")
        if index is not None:
            return found[index]
        if len(found) > 1:
            raise KeyError(f"{len(found)} {what} methods were attached; pass index=0..{len(found) - 1} "
                           "or the config instance")
        return found[0]

    def has_record(self, method: type) -> bool:
        """Whether a method of config class `method` was attached in this call."""
        return any(isinstance(c.runtime.config, method) for c in self.calls)

    @property
    def records(self) -> list[Any]:
        """The records of this call's methods (`vlmfix.core.protocol.Record`), in the order the runtimes run
        (None for a method that keeps none)."""
        return [c.record for c in self.calls]

    # -- pruning ----------------------------------------------------------------------------------
    def slot_map(self, layer: int) -> SlotMap | None:
        """The pruning map in force at `layer` (the last stage at or before it); None before any pruning."""
        current = None
        for m in self.slot_maps:
            if m.layer <= layer:
                current = m
        return current

    def merged_into(self, layer: int) -> torch.Tensor | None:
        """(B, prompt_len) CPU long: the kept prompt position each position was merged into by the stages in
        force at `layer` (followed through later stages), -1 for none; None when no stage merged."""
        maps = [m for m in self.slot_maps if m.layer <= layer and m.owner is not None]
        if not maps:
            return None
        owner = torch.full((self.batch_size, self.prompt_len), -1, dtype=torch.long)
        for m in maps:
            owner = torch.where(m.owner >= 0, m.owner, owner)  # this stage's merges
            moved = owner >= 0  # follow an earlier owner that this stage merged away
            later = m.owner.gather(1, owner.clamp_min(0))
            owner = torch.where(moved & (later >= 0), later, owner)
        return owner

    def to_prompt(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        """Per-slot values (B, S) of the hidden states entering `layer` -> (B, prompt_len) over prompt
        positions, 0 at the positions pruned away (in both pruning forms)."""
        m = self.slot_map(layer)
        if m is None:
            return values
        if values.shape[1] != m.pos.shape[1]:
            raise RuntimeError(
                f"layer {layer} holds {values.shape[1]} token slots but its pruning map has {m.pos.shape[1]}; "
                "the hidden states were read before the pruner gathered the kept tokens"
            )
        keep = self.on_device(("valid", m.layer), m.valid, values.device)
        pos = self.on_device(("pos", m.layer), m.pos, values.device)
        out = torch.zeros(values.shape[0], self.prompt_len, dtype=values.dtype, device=values.device)
        return out.scatter_(1, pos, torch.where(keep, values, torch.zeros_like(values)))

    def previous_token(self, layer: int, row: int, position: int) -> int:
        """The token before `position` in batch row `row` as layer `layer` sees the sequence: position - 1,
        or the nearest earlier position still present when pruning removed the tokens in between."""
        m = self.slot_map(layer)
        if m is None:
            return position - 1
        before = m.alive[row, :position].nonzero().flatten()
        return int(before[-1]) if len(before) else position - 1

    # -- masks, on the model's device, built once per call ------------------------------------------
    def on_device(self, key: Any, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host` copied to `device` once per call (kept under `key`)."""
        got = self._cache.get((key, device))
        if got is None:
            got = self._cache[key, device] = host.to(device)
        return got

    def branch_flags(self, device: torch.device | None = None) -> torch.Tensor:
        """(B + branch_rows,) bool: True at the contrast branch's batch rows (on `device`, default the model's)."""
        device = self.device if device is None else torch.device(device)
        key = ("branch", self.branch_rows, device)
        if key not in self._cache:
            flags = torch.zeros(self.batch_size + self.branch_rows, dtype=torch.bool)
            flags[self.batch_size:] = True
            self._cache[key] = flags.to(device)
        return self._cache[key]

    def image_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, prompt_len) bool: True at image-token positions (on `device`, default the model's)."""
        device = self.device if device is None else torch.device(device)
        key = ("image", device)
        if key not in self._cache:
            mask = torch.zeros(self.batch_size, self.prompt_len, dtype=torch.bool)
            for row in self.rows:
                mask[row.index, row.image_positions] = True
            self._cache[key] = mask.to(device)
        return self._cache[key]

    def real_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, prompt_len) bool: True from each row's first real token to its last (on `device`, default the
        model's)."""
        device = self.device if device is None else torch.device(device)
        key = ("real", device)
        if key not in self._cache:
            pos = torch.arange(self.prompt_len)
            first = torch.tensor([r.pad_left for r in self.rows])
            self._cache[key] = ((pos >= first[:, None]) & (pos <= self.last_tokens()[:, None])).to(device)
        return self._cache[key]

    def sink_mask(self, layer: int, tau: float | str | None = None) -> torch.Tensor | None:
        """(B, prompt_len) bool on phi's device: real tokens (never padding) whose sink score at `layer`
        exceeds the threshold (strict); None if sinks were not tracked. Layers before FIRST_SINK_LAYER have
        no sinks by definition (all False). tau: a number, or "bos:F" for F x the phi of each row's first
        real token."""
        tau = self.tau if tau is None else tau
        if layer < FIRST_SINK_LAYER:
            return torch.zeros(self.batch_size, self.prompt_len, dtype=torch.bool, device=self.device)
        phi = self.phi.get(layer)
        if phi is None or tau is None:
            return None
        key = ("sinks", layer, tau)
        if key not in self._cache:
            first = torch.tensor([r.pad_left for r in self.rows]).clamp(max=self.prompt_len - 1)
            self._cache[key] = above_threshold(phi, tau, first.to(phi.device)) & self.real_mask(phi.device)
        return self._cache[key]

    def sinks(self, layer: int, row: int, tau: float | str | None = None) -> torch.Tensor:
        """Positions of all sink tokens of batch row `row` at `layer` (text sinks such as BOS included)."""
        mask = self.sink_mask(layer, tau)
        if mask is None:
            raise RuntimeError("sink scores were not tracked in this call: attach a method that uses sinks")
        return mask[row].nonzero().flatten().cpu()

    def visual_sinks(self, layer: int, row: int, tau: float | str | None = None) -> torch.Tensor:
        """Positions of the image tokens of batch row `row` that are sinks at `layer`."""
        mask = self.sink_mask(layer, tau)
        if mask is None:
            raise RuntimeError("sink scores were not tracked in this call: attach a method that uses sinks")
        positions = self.rows[row].image_positions
        return positions[mask[row].cpu()[positions]]

    def summary(self) -> dict[str, Any]:
        """A plain-data overview: per row its spans, per layer its visual-sink counts."""
        out: dict[str, Any] = {"prompt_len": self.prompt_len, "sink_dims": list(self.sink_dims), "tau": self.tau}
        out["rows"] = [
            {
                "pad_left": r.pad_left,
                "pad_right": r.pad_right,
                "image_tokens": len(r.image_positions),
                "grids": [(s.rows, s.cols) for s in r.segments],
                "newline_tokens": len(r.newline_positions),
                "question": r.query_runs,
                "note": r.note,
            }
            for r in self.rows
        ]
        if self.phi and self.tau is not None:
            out["visual_sinks_per_layer"] = {
                layer: [len(self.visual_sinks(layer, r.index)) for r in self.rows] for layer in sorted(self.phi)
            }
        return out
