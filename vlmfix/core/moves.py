"""`InPlaceMoves`: what a call that removes (or merges) tokens in place needs besides choosing them.

A call that subclasses `InPlaceMoves` appends its stages to `state.slot_maps` (`SlotMap`: the kept
slots' prompt positions `pos`, `valid`, the gather `index` into the previous stage's slots, `alive`,
and optionally `owner`, the merges) before the stage's layer runs; its runtime's `moved_layers()`
names every decoder layer from its first stage on (layer 0 included: a stage at layer 0 acts on the
input embeddings, before the decoder). Then, for each of those layers, it

- gathers the hidden states entering a stage's layer to the kept slots (`before_layer`), then lets
  `rewrite(layer, state, hidden)` change them (merged features, for instance: by default unchanged);
- gathers the rotary (cos, sin) tables and `position_ids` to the kept slots, so kept tokens keep
  their original positions;
- rebuilds the layer's attention mask over the slots from the model's own mask (`mask`);
- gives the `SlotView` that lets every other method name tokens by prompt position (`view`).

Batch rows may keep different numbers of tokens: shorter rows are filled with dropped tokens that stay
masked as keys (`valid` False). The same logic as the in-place form of `vlmfix.methods.prune`.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmfix.core.protocol import MovesTokens, ReplacesMask
from vlmfix.core.slots import SlotView
from vlmfix.core.state import Block, CallState, Phase, SlotMap

__all__ = ["InPlaceMoves", "slot_stage"]


def take(t: torch.Tensor, pos: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather `t` (..., B or 1, P, ...) along its sequence dim at per-row positions pos (B, S)."""
    seq_dim %= t.dim()
    moved = t.movedim((seq_dim - 1, seq_dim), (0, 1))
    moved = moved.expand(pos.shape[0], *moved.shape[1:])
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
    return moved[rows, pos.to(t.device)].movedim((0, 1), (seq_dim - 1, seq_dim))


def slot_stage(layer: int, prev: SlotMap | None, alive: torch.Tensor, owner: torch.Tensor | None = None) -> SlotMap:
    """The in-place stage from `layer` on keeping the prompt positions `alive` (B, prompt_len) of the slots of
    `prev` (None: every prompt position), with the merges `owner` (see `SlotMap`)."""
    b, p = alive.shape
    if prev is None:
        every = torch.ones(b, p, dtype=torch.bool)
        prev = SlotMap(-1, torch.arange(p).expand(b, p), every, None, every)
    keep = prev.valid & alive.gather(1, prev.pos)
    width = int(keep.sum(1).max())
    index = torch.empty(b, width, dtype=torch.long)
    for r in range(b):
        real = keep[r].nonzero().flatten()
        filler = (~keep[r]).nonzero().flatten()[: width - len(real)]
        index[r] = torch.cat([real, filler]).sort().values
    return SlotMap(layer, prev.pos.gather(1, index), keep.gather(1, index), index, alive & prev.alive, owner)


def _allowed(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    if attention_mask is None:
        q = torch.arange(q_len, device=device) + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= q[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _as_mask_of(allowed: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    if like is not None and like.dtype.is_floating_point:
        return torch.zeros(allowed.shape, dtype=like.dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(like.dtype).min)
    return allowed


class InPlaceMoves(MovesTokens, ReplacesMask):
    """Mixin of a call that moves tokens in place from the stages it appended (see the module docstring)."""

    def rewrite(self, layer: int, state: CallState, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states (B, S, D) of the kept slots entering the stage at `layer`, after the gather."""
        return hidden

    def _moves(self) -> dict[str, Any]:
        got = getattr(self, "_moves_cache", None)
        if got is None:
            got = self._moves_cache = {"gathers": {}, "views": {}, "mask": None}
        return got

    def _own(self, state: CallState, layer: int) -> SlotMap | None:
        return state.slot_map(layer)

    def before_layer(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        m = self._own(state, layer)
        if m is None:
            return None
        cache = self._moves()["gathers"]
        kwargs = dict(kwargs)
        if m.layer == layer:
            hidden = args[0] if args else kwargs["hidden_states"]
            index = m.index.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1])
            hidden = self.rewrite(layer, state, hidden.gather(1, index))
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        full = state.prompt_len
        pe = kwargs.get("position_embeddings")
        if pe is not None and pe[0].shape[-2] == full:
            key = ("pe", m.layer, id(pe[0]))
            if key not in cache:
                cache[key] = tuple(take(t, m.pos, -2) for t in pe)
            kwargs["position_embeddings"] = cache[key]
        ids = kwargs.get("position_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == full:
            key = ("ids", m.layer)
            if key not in cache:
                cache[key] = take(ids, m.pos, -1)
            kwargs["position_ids"] = cache[key]
        return args, kwargs

    def view(self, block: Block, state: CallState) -> SlotView | None:
        m = self._own(state, block.layer)
        if m is None:
            return None
        views = self._moves()["views"]
        key = (m.layer, block.phase, block.q_len, block.kv_len)
        if key not in views:
            views.clear()
            views[key] = SlotView(m, state.prompt_len, block.phase, block.q_len, block.kv_len)
        return views[key]

    def mask(self, block: Block, state: CallState, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        m = self._own(state, block.layer)
        if m is None:
            return None
        if block.phase is Phase.DECODE and block.q_len == 1 and attention_mask is None and bool(m.valid.all()):
            return None  # every slot a real token and no padding: the lone row sees every key
        moves = self._moves()
        key = (m.layer, block.phase, block.q_len, block.kv_len)
        if moves["mask"] is None or moves["mask"][0] != key or moves["mask"][1] is not attention_mask:
            moves["mask"] = (key, attention_mask, self._build_mask(block, state, m, attention_mask))
        return moves["mask"][2]

    @staticmethod
    def _build_mask(block: Block, state: CallState, m: SlotMap, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, p = state.batch_size, state.prompt_len
        q_len, key_len = block.q_len, block.kv_len
        device = state.device if attention_mask is None else attention_mask.device
        extra = key_len - m.pos.shape[1]  # generated tokens in the cache
        kmap = torch.cat([m.pos, torch.arange(p, p + extra).expand(b, extra)], 1)
        kvalid = torch.cat([m.valid, torch.ones(b, extra, dtype=torch.bool)], 1)
        if block.phase is not Phase.DECODE:
            qmap, orig_q, orig_k = m.pos, p, p
        else:
            qmap, orig_q, orig_k = torch.arange(q_len).expand(b, q_len), q_len, p + extra
        allowed = _allowed(attention_mask, orig_q, orig_k, device).expand(b, -1, -1, -1)
        rows = torch.arange(b, device=device)[:, None, None]
        new = allowed[rows, 0, qmap[:, :, None].to(device), kmap[:, None, :].to(device)]  # (B, Q, K)
        new = new & kvalid[:, None, :].to(device)
        if block.phase is not Phase.DECODE:  # a prompt row left with no key (left padding) attends to itself
            empty = ~new.any(-1)
            if bool(empty.any()):
                own = torch.arange(q_len, device=device) + (key_len - q_len)
                new[empty] = torch.nn.functional.one_hot(own, key_len).bool()[None].expand(b, -1, -1)[empty]
        return _as_mask_of(new[:, None], attention_mask)
