"""Pruning before the decoder: what VisionZip (`visionzip`) and DivPrune (`divprune`) share.

Both choose, per batch row, the visual tokens that enter the decoder at all; the others leave the
sequence before decoder layer 0 (a `SlotMap` at layer 0, `vlmfix.core.moves.slot_stage`), in place:
every decoder layer and its KV cache hold the kept tokens only, each at its original position (its
rotary position and `position_ids` are gathered with it; nothing is renumbered), and every other
method keeps naming tokens by prompt position through the `SlotView` (`vlmfix.core.moves.InPlaceMoves`).
A merge (VisionZip's contextual tokens) is recorded as the stage's `SlotMap.owner`.

Budget vocabulary (as FastV's, `vlmfix.methods.prune`): `keep` tokens or `keep_ratio` of the unit's
visual tokens (ceil, at least 1); the unit is the method's (DivPrune: a batch row's visual tokens;
VisionZip: one image the vision tower encodes). A `keep` at or above a unit's tokens prunes nothing there,
which the record notes (`PruneRecord.budget_notes`, one line per row).

Forms: `form="inplace"` as above (a static cache is refused at the prefill: it cannot hold every layer's
shortened KV cache); `form="mask"`: nothing moves, the pruned tokens are masked out as keys from layer 0
on (a merged token's features are still written at its position): the same tokens and logits, and the
form that runs under a static cache / compiled generation. With every layer's cache shortened, the
model's own decoding-step mask spans the cache's slots and reads its padding at the wrong columns, so the
in-place form builds a decoding step's mask itself (the kept real tokens, then the generated ones).

The record is a `PruneRecord` with one stage at layer 0 (`PruneStage`: the kept positions, each row's
budget, the method's scores), so `prune_record` / `kept_tokens` and the kept-token heat map read it as
any pruner's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from vlmfix.core.moves import InPlaceMoves, allowed_mask, as_mask_of, slot_mask, slot_stage
from vlmfix.core.slots import SlotView
from vlmfix.core.state import SlotMap
from vlmfix.methods.base import (Block, CallState, MethodCall, Phase, Runtime, Target, check_choice, check_number,
                                 is_int)
from vlmfix.methods.prune import FORMS, PruneRecord, PruneRuntime, PruneStage, _ratio_budget

#: the tokens kept when neither keep nor keep_ratio is given (the budget pruning papers compare at, of 576)
DEFAULT_KEEP = 128

__all__ = ["DEFAULT_KEEP", "PreDecoderCall", "PreDecoderRuntime", "budget_problems"]


def budget_problems(keep: Any, ratio: Any, form: Any) -> list[str | None]:
    """The checks of `keep` / `keep_ratio` (a positive int, a ratio in (0, 1], not both) and `form`."""
    return [
        check_choice("form", form, FORMS),
        None if keep is None or is_int(keep) and keep > 0 else
        f"keep must be a positive number of tokens (an int), got {keep!r}",
        None if ratio is None else check_number("keep_ratio", ratio, 0.0, 1.0, lo_open=True),
        None if keep is None or ratio is None else
        f"takes keep or keep_ratio, not both (got keep={keep!r}, keep_ratio={ratio!r}); set the other to None",
    ]


class PreDecoderCall(MethodCall, InPlaceMoves):
    """One call of a pre-decoder pruner: a subclass chooses (`_stage` records it); the gathers at layer 0 and
    the masks and views of every layer are `InPlaceMoves`'s."""

    record_type = PruneRecord
    record: PruneRecord

    def __init__(self, runtime: "PreDecoderRuntime", state: CallState, record: PruneRecord | None = None):
        b = state.batch_size
        if record is None:
            record = PruneRecord("inplace", (0,), [[0] * b], [None] * b, False,
                                 [len(r.image_positions) for r in state.rows])
        super().__init__(runtime, record)
        #: the mask form: nothing moves, the pruned tokens are masked out as keys from layer 0 on
        self.mask_form = runtime.config.form == "mask"
        record.form = runtime.config.form
        self._mask_dtype()  # the decoding steps' mask dtype, read now (not inside a compiled step)

    def _stage(self, state: CallState, kept: Sequence[torch.Tensor], budgets: Sequence[int],
               scores: Sequence[torch.Tensor], owner: torch.Tensor | None = None) -> None:
        """Record the kept prompt positions of each row (and the merges `owner`, (B, P)) as the stage at layer 0;
        nothing is staged when every row keeps all of its visual tokens."""
        rec = self.record
        rec.budgets = [list(budgets)]
        rec.active = any(len(k) < len(r.image_positions) for k, r in zip(kept, state.rows))
        if not rec.active:
            return
        alive = torch.ones(state.batch_size, state.prompt_len, dtype=torch.bool)
        for row, k in zip(state.rows, kept):
            alive[row.index, row.image_positions] = False
            alive[row.index, k] = True
        rec.stages.append(PruneStage(0, list(kept), list(budgets), list(scores)))
        if self.mask_form:
            every = torch.arange(state.prompt_len).expand(state.batch_size, -1)
            state.slot_maps.append(SlotMap(0, every, alive, None, alive, owner))
        else:
            state.slot_maps.append(slot_stage(0, None, alive, owner))

    def after_prefill(self, state: CallState) -> None:
        """Each row's key slots a decoding step may read (kept real tokens, no padding), on the model's device."""
        m = state.slot_map(0)
        if m is None:
            return
        if self.mask_form:
            self._alive = m.alive.to(state.device)
            return
        first = torch.tensor([r.pad_left for r in state.rows])[:, None]
        last = torch.tensor([r.last for r in state.rows])[:, None]
        self._keys = (m.valid & (m.pos >= first) & (m.pos <= last)).to(state.device)

    def _build_mask(self, block: Block, state: CallState, m: SlotMap,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
        """A prefill's: the model's mask (over prompt positions) read at the slots. A decoding step's is built here:
        with every layer's cache shortened from layer 0, the model's own mask spans the cache's slots and reads
        its padding at the wrong columns; the kept real tokens, then the generated ones (causal), are allowed."""
        if self.mask_form:
            if block.phase is not Phase.DECODE:
                return slot_mask(block, state, m, attention_mask, False, self._mask_dtype())
            # the model's mask (every generated token and the prompt), less the pruned prompt tokens
            b, p, key_len = state.batch_size, state.prompt_len, block.kv_len
            device = state.device if attention_mask is None else attention_mask.device
            keys = torch.ones(b, key_len, dtype=torch.bool, device=device)
            keys[:, :p] = self._alive
            allowed = allowed_mask(attention_mask, block.q_len, key_len, device) & keys[:, None, None, :]
            return as_mask_of(allowed, attention_mask, self._mask_dtype())
        if block.phase is not Phase.DECODE:
            return super()._build_mask(block, state, m, attention_mask)
        keys = self._keys
        b, slots = keys.shape
        q, extra = block.q_len, block.kv_len - slots
        step = torch.arange(q, device=keys.device)[:, None] + (extra - q)
        new = torch.arange(extra, device=keys.device)[None, :] <= step  # (Q, extra): causal among the new tokens
        allowed = torch.cat([keys[:, None, None, :].expand(b, 1, q, slots), new[None, None].expand(b, 1, q, extra)], -1)
        return as_mask_of(allowed, attention_mask, self._mask_dtype())

    def before_layer(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None if self.mask_form else super().before_layer(layer, state, args, kwargs)

    # a GIFT pre-pass (before the prefill) reads the whole prompt, as with FastV: no mask, no view
    def mask(self, block: Block, state: CallState, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if block.phase is Phase.PREPASS else super().mask(block, state, attention_mask)

    def view(self, block: Block, state: CallState) -> SlotView | None:
        return None if self.mask_form or block.phase is Phase.PREPASS else super().view(block, state)

    def _sees_every_key(self, block: Block, m: SlotMap, attention_mask: torch.Tensor | None) -> bool:
        return not self.mask_form and super()._sees_every_key(block, m, attention_mask)

    def _note_keep(self, row: int, n: int, unit: str) -> None:
        keep = self.runtime.keep
        if keep is not None and keep >= n:
            self.record.budget_notes.append(
                f"row {row}: keep {keep} >= the {n} visual tokens of {unit}, so nothing is pruned there (keep "
                "counts are sized for LLaVA-1.5's 576 tokens; keep_ratio scales with the image)")


class PreDecoderRuntime(Runtime):
    """A pre-decoder pruner bound to a model: `keep` or `ratio` (one of them None), every decoder layer moved."""

    def __init__(self, config: Any, target: Target):
        super().__init__(config, target)
        adapter = target.adapter
        implementation = adapter.text_config._attn_implementation
        if implementation not in (None, "eager", "sdpa"):
            raise ValueError(f"{type(config).__name__} needs the decoder on 'sdpa' or 'eager' attention (4-D masks), "
                             f"not {implementation!r}; load the model with attn_implementation='sdpa'.")
        adapter.check_pruning((0,), config.form)
        self._num_layers = adapter.num_layers
        self.ratio: float | None = None if config.keep_ratio is None else float(config.keep_ratio)
        self.keep: int | None = None if self.ratio is not None else int(config.keep or DEFAULT_KEEP)

    def budget(self, n: int) -> int:
        """The tokens a unit of `n` visual tokens keeps: min(keep, n), or ceil(ratio x n), at least 1 (as FastV's)."""
        return _ratio_budget(self.ratio, n) if self.ratio is not None else min(n, self.keep)

    def resolved(self) -> dict[str, Any]:
        return {"keep": self.keep} if self.config.keep is None and self.keep is not None else {}

    def moved_layers(self) -> tuple[int, ...]:
        return tuple(range(self._num_layers)) if self.config.form == "inplace" else self.read_layers

    def shortens_cache(self) -> bool:
        return self.config.form == "inplace"

    #: the decoder layers whose prefill inputs the mask form reads (DivPrune: layer 0's); none by default
    read_layers: ClassVar[tuple[int, ...]] = ()

    def check_combination(self, others: Sequence[Runtime]) -> None:
        other = next((r for r in others if isinstance(r, (PruneRuntime, PreDecoderRuntime))), None)
        if other is not None:
            raise ValueError(f"attach at most one pruner: {type(self.config).__name__} removes visual tokens before "
                             f"the decoder and {type(other.config).__name__} prunes too; attach one of them")
