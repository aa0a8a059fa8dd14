"""Moving tokens in place, and the attention masks over slots: the one implementation that in-place
pruning (`vlmfix.methods.prune`) and token merging build on.

A call that subclasses `InPlaceMoves` appends its stages to `state.slot_maps` (`SlotMap`: the kept
slots' prompt positions `pos`, `valid`, the gather `index` into the previous stage's slots, `alive`,
and optionally `owner`, the merges; `slot_stage` builds one) before the stage's layer runs; its
runtime's `moved_layers()` names every decoder layer from its first stage on (layer 0 included: a
stage at layer 0 acts on the input embeddings, before the decoder). Then, for each of those layers, it

- gathers the hidden states entering a stage's layer to the kept slots (`before_layer`), then lets
  `rewrite(layer, state, hidden)` change them (merged features, for instance: by default unchanged);
- gathers the rotary (cos, sin) tables and `position_ids` to the kept slots (`take`, once per stage
  and table), so kept tokens keep their original positions;
- rebuilds the layer's attention mask over the slots from the model's own mask (`mask`, `slot_mask`);
- gives the `SlotView` that lets every other method name tokens by prompt position (`view`).

Batch rows may keep different numbers of tokens: shorter rows are filled with dropped tokens that stay
masked as keys (`valid` False).

`SlotMasks` is the mask part alone, which the mask form of pruning (nothing moves) shares: the mask of
a layer under a stage is built by the call's `_build_mask` once per layer geometry and model mask
object, and reused by the later layers (a decoding step builds it once, at its first such layer).
Inside a compiled decoding step it is built from the prefill's tensors, uncached. A decoding step's
mask is additive in the decoder's dtype (`as_mask_of`): SDPA on a CPU would otherwise convert a bool
mask in every layer. Whether a stage has filler slots is read once, when its layer's prefill inputs
are gathered, so that a lone decoding row with no padding gets no mask at all (`_sees_every_key`)
without a host read per layer call.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmfix.core.protocol import MovesTokens, ReplacesMask
from vlmfix.core.slots import SlotView
from vlmfix.core.state import Block, CallState, Phase, SlotMap

__all__ = ["InPlaceMoves", "SlotMasks", "allowed_mask", "as_mask_of", "slot_mask", "slot_stage", "take"]


def take(t: torch.Tensor, pos: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather `t` (..., B or 1, P, ...) along its sequence dim at per-row positions pos (B, S)."""
    seq_dim %= t.dim()
    moved = t.movedim((seq_dim - 1, seq_dim), (0, 1))
    moved = moved.expand(pos.shape[0], *moved.shape[1:])
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
    return moved[rows, pos.to(t.device)].movedim((0, 1), (seq_dim - 1, seq_dim))


def slot_stage(layer: int, prev: SlotMap | None, alive: torch.Tensor, owner: torch.Tensor | None = None) -> SlotMap:
    """The in-place stage from `layer` on keeping the prompt positions `alive` (B, prompt_len) of the slots of
    `prev` (None: every prompt position), with the merges `owner` (see `SlotMap`). Its `alive` is
    `alive & prev.alive`: a position dropped by an earlier stage stays dropped."""
    b, p = alive.shape
    if prev is None:
        every = torch.ones(b, p, dtype=torch.bool)
        prev = SlotMap(-1, torch.arange(p).expand(b, p), every, None, every)
    keep = prev.valid & alive.gather(1, prev.pos)  # (B, S_prev): slots that stay real
    width = int(keep.sum(1).max())
    index = torch.empty(b, width, dtype=torch.long)
    for r in range(b):
        real = keep[r].nonzero().flatten()
        filler = (~keep[r]).nonzero().flatten()[: width - len(real)]
        index[r] = torch.cat([real, filler]).sort().values
    return SlotMap(layer, prev.pos.gather(1, index), keep.gather(1, index), index, alive & prev.alive, owner)


def allowed_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """The model's mask as bool (B or 1, 1, Q, K), True = may attend (None means plain causal)."""
    if attention_mask is None:
        q = torch.arange(q_len, device=device) + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= q[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def as_mask_of(allowed: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`allowed` (bool, True = attend) in the form of the model's mask `like`: additive when it is float,
    or when `dtype` is given (a decoding step's mask, built once per step: SDPA on a CPU would otherwise
    convert a bool mask in every layer)."""
    if like is not None and like.dtype.is_floating_point:
        dtype = like.dtype
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def slot_mask(block: Block, state: CallState, m: SlotMap, attention_mask: torch.Tensor | None,
              queries_in_slots: bool, dtype: torch.dtype | None) -> torch.Tensor:
    """The model's mask read at the slots' prompt positions of `m` (keys; queries too when `queries_in_slots`),
    less the filler slots as keys; a prompt row left with no key attends to itself. A decoding step's mask
    is additive in `dtype` (when given; see `as_mask_of`), a prompt's keeps the model's form."""
    b, p = state.batch_size, state.prompt_len
    q_len, key_len = block.q_len, block.kv_len
    device = state.device if attention_mask is None else attention_mask.device
    slots = m.pos.shape[1]
    extra = key_len - slots  # generated tokens in the cache (in-place) / beyond the prompt (mask form)
    tail = torch.arange(p, p + extra).expand(b, extra)
    kmap = torch.cat([m.pos, tail], 1)
    kvalid = torch.cat([m.valid, torch.ones(b, extra, dtype=torch.bool)], 1)
    if queries_in_slots:
        qmap, orig_q, orig_k = m.pos, p, p
    else:
        qmap, orig_q, orig_k = torch.arange(q_len).expand(b, q_len), q_len, p + extra
    if attention_mask is not None and attention_mask.shape[-1] != orig_k:
        # a stage at layer 0 shortened every layer's cache, by which the model sized its decoding mask: its columns
        # are not positions. A row's keys are its real prompt tokens and the generated tokens, causally.
        keys = torch.cat([state.real_mask(device), torch.ones(b, extra, dtype=torch.bool, device=device)], 1)
        allowed = allowed_mask(None, orig_q, orig_k, device) & keys[:, None, None, :]
    else:
        allowed = allowed_mask(attention_mask, orig_q, orig_k, device).expand(b, -1, -1, -1)
    rows = torch.arange(b, device=device)[:, None, None]
    new = allowed[rows, 0, qmap[:, :, None].to(device), kmap[:, None, :].to(device)]  # (B, Q, K)
    new = new & kvalid[:, None, :].to(device)
    if block.phase is not Phase.DECODE:  # a prompt row left with no key (left padding) attends to itself
        empty = ~new.any(-1)  # (B, Q)
        if bool(empty.any()):
            own = torch.arange(q_len, device=device) + (key_len - q_len)
            new[empty] = torch.nn.functional.one_hot(own, key_len).bool()[None].expand(b, -1, -1)[empty]
    return as_mask_of(new[:, None], attention_mask, dtype if block.phase is Phase.DECODE else None)


class SlotMasks(ReplacesMask):
    """Mixin of a call that replaces the masks of the layers under its stages (`SlotMap`s): the caching, the
    compiled path and the no-mask case (see the module docstring); the mask itself is `_build_mask`'s."""

    def _slots(self) -> dict[str, Any]:
        """This call's caches: per stage, what its layers gather (rotary tables, position ids) and whether it
        has filler slots; the view and the mask of the last layer call."""
        got = getattr(self, "_slots_cache", None)
        if got is None:
            got = self._slots_cache = {"gathers": {}, "views": {}, "mask": None, "no_filler": {}}
        return got

    def _own(self, state: CallState, layer: int) -> SlotMap | None:
        """The stage in force at `layer`."""
        return state.slot_map(layer)

    def _mask_dtype(self) -> torch.dtype:
        """The decoder's dtype, that of decoding steps' masks (read once, outside any compiled step)."""
        dtype = getattr(self, "_dtype", None)
        if dtype is None:
            layers = self.runtime.target.adapter.decoder_layers  # type: ignore[attr-defined]  # a MethodCall's
            dtype = self._dtype = next(layers.parameters()).dtype
        return dtype

    def mask(self, block: Block, state: CallState, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        m = self._own(state, block.layer)
        if m is None:
            return None
        if torch.compiler.is_compiling():  # a compiled decoding step: the mask form, from the prefill's tensors
            return self._build_mask(block, state, m, attention_mask)
        if self._sees_every_key(block, m, attention_mask):
            return None
        cache = self._slots()
        key = (m.layer, block.phase, block.q_len, block.kv_len)
        # the model's mask object itself is held (not its id, which a freed mask's successor may reuse)
        if cache["mask"] is None or cache["mask"][0] != key or cache["mask"][1] is not attention_mask:
            cache["mask"] = (key, attention_mask, self._build_mask(block, state, m, attention_mask))
        return cache["mask"][2]

    def _sees_every_key(self, block: Block, m: SlotMap, attention_mask: torch.Tensor | None) -> bool:
        """Whether the layer call needs no mask at all (the model's own None stands)."""
        return False

    def _build_mask(self, block: Block, state: CallState, m: SlotMap,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class InPlaceMoves(SlotMasks, MovesTokens):
    """Mixin of a call that moves tokens in place from the stages it appended (see the module docstring)."""

    def rewrite(self, layer: int, state: CallState, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states (B, S, D) of the kept slots entering the stage at `layer`, after the gather."""
        return hidden

    def before_layer(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        m = self._own(state, layer)
        if m is None:
            return None
        cache = self._slots()
        gathers = cache["gathers"]
        kwargs = dict(kwargs)
        if m.layer == layer:
            cache["no_filler"][m.layer] = bool(m.valid.all())  # once per stage, at the prefill
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
            # per rotary table (Gemma 3's sliding and full layers have their own); both live through the forward
            key = ("pe", m.layer, id(pe[0]))
            if key not in gathers:
                gathers[key] = tuple(take(t, m.pos, -2) for t in pe)
            kwargs["position_embeddings"] = gathers[key]
        ids = kwargs.get("position_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == full:
            key = ("ids", m.layer)
            if key not in gathers:
                gathers[key] = take(ids, m.pos, -1)
            kwargs["position_ids"] = gathers[key]
        return args, kwargs

    def view(self, block: Block, state: CallState) -> SlotView | None:
        m = self._own(state, block.layer)
        if m is None:
            return None
        views = self._slots()["views"]
        key = (m.layer, block.phase, block.q_len, block.kv_len)
        if key not in views:
            views.clear()
            views[key] = SlotView(m, state.prompt_len, block.phase, block.q_len, block.kv_len)
        return views[key]

    def _sees_every_key(self, block: Block, m: SlotMap, attention_mask: torch.Tensor | None) -> bool:
        # every slot a real token and no padding: the lone row of a decoding step sees every key
        return block.phase is Phase.DECODE and block.q_len == 1 and attention_mask is None \
            and self._slots()["no_filler"].get(m.layer, False)

    def _build_mask(self, block: Block, state: CallState, m: SlotMap,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
        return slot_mask(block, state, m, attention_mask, block.phase is Phase.PREFILL, self._mask_dtype())
