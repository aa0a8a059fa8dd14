"""Attention-based visual token pruning: FastV and multi-stage (PyramidDrop-style).

FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", 2024; multi-stage: PyramidDrop.

At each stage layer L, the image tokens still present are scored by the attention they receive at
layer L - 1 (post-softmax fp32 rows, averaged over heads). For batch row b, image position j and the
scoring's query rows i with weights w_b,i (`Scoring`):

    s_b,j = sum_i w_b,i mean_h A_h,i,j / max(sum_i w_b,i, 1)

FastV's scoring (`LastToken`) weighs only each batch row's last real token (the last prompt token,
or the one before a right-padded row's padding); multi-stage's (`TextAfterImage`) the row's text
after its image, up to that token (padding excluded), or with `scoring="last"` FastV's (PyramidDrop's last
instruction token). The top tokens of s (optionally after `Debias`)
are kept, within the stage's budget, and the rest dropped from layer L on.

Parts, each with one job:
- a `Scoring` names the query rows a stage reads and their weights (`LastToken`, `TextAfterImage`);
- a runtime per method gives its scoring and its budget per stage (`FastVRuntime`: `keep` tokens or
  `keep_ratio` of the image; `StagedRuntime`: `keep_ratios[stage]` of the image), and what it
  resolved for the model (layers, trend, padding geometry);
- a call per form (`MaskPruneCall`, `InPlacePruneCall`) shares the scoring and the selection
  (`PruneCall`: it observes the scoring rows, selects, replaces the masks of layers >= L) and differs
  in what a stage does to the sequence:
  - "inplace": dropped tokens leave the hidden states at layer L (a forward pre-hook slices them),
    so the KV cache of layers >= L is shorter; the rotary (cos, sin) and `position_ids` given to
    every layer >= L are gathered to the kept slots, so kept tokens keep their original positions.
    The attention mask of those layers is rebuilt over the kept slots from the model's own mask.
    Batch rows may keep different numbers of tokens: shorter rows are filled with dropped tokens
    that stay masked as keys. These mechanics are `vlmfix.core.moves.InPlaceMoves`'s (token merging
    shares them); this module chooses the tokens;
  - "mask": nothing is removed; dropped tokens are masked out as keys from layer L on (reference).
Each stage is recorded as a `SlotMap` in `CallState.slot_maps` (slot -> original position, and
the positions still present), and in the call's `PruneRecord` (`prune_record(state)`).

Pruners that choose from the hidden states instead of attention rows (DART, vlmfix/methods/dart.py; the
random and pooling controls, vlmfix/methods/controls.py) share the rest: their runtime (a `KeepRuntime`:
`keep` / `keep_ratio`) gives `choose(state, row, hidden, budget)` -> `RowChoice` for one batch row at a
time, and `ChoosesFromHidden` calls it at the stage layer's prefill pre-hook, merges groups (the mean of
their hidden states at the kept position, recorded in `PruneStage.owner`) and commits the stage through
the same two forms (`HiddenMaskCall`, which rewrites that one layer's prefill inputs and keeps the cache
length, so static caches run it; `HiddenInPlaceCall`).

Cost: the scoring, the selection and the slot maps happen once per stage at the prefill. Decoding
steps carry no pruning hooks; the replaced mask of a step is built once (at the first pruned
layer) and reused by the later layers (`vlmfix.core.moves.SlotMasks`, which both forms use).
Under a static cache (compiled generation) only the mask form runs: in-place pruning shortens the
KV cache of the pruned layers, which a static cache cannot hold, and attach says so at the prefill.

Composition with VAR and GIFT: methods name tokens by prompt position. In the mask form nothing
moves; in the in-place form a `SlotView` (vlmfix/core/slots.py) hands every method its rows and keys in
prompt positions (the kept slots' scores scattered to their positions, the pruned ones at
probability 0), so VAR's sink / non-sink masks and GIFT's saliency and boost maps apply unchanged
and both forms give the same result. A pruned token is no longer a sink (its phi is 0 from layer L
on) and gets no attention; GIFT takes the gaze shift of a query token whose predecessor was
pruned against the nearest earlier present token. The pruner scores the raw attention rows: its
runtime runs first (`order` -1), so in a layer it observes the rows before VAR and GIFT edit them,
whatever the order given to attach. A GIFT pre-pass (a boost layer at or before a saliency layer)
does not prune: saliency read there is the full prompt's.

A query row left with no key it may attend to (left padding) attends to itself, so it cannot give
NaN. While a pruner is attached, a plain forward over a prompt returns logits for the kept slots
only (generate only reads the last one); a row's last real token sits in the slot whose position
(the last stage's `SlotMap.pos`) is the row's `RowLayout.last`.

Described, with its choices and defaults, in docs/methods.md ("Token pruning and its debiasing").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from vlmfix.core.moves import InPlaceMoves, SlotMasks, allowed_mask, as_mask_of, slot_mask, slot_stage
from vlmfix.core.state import RowLayout, SlotMap
from vlmfix.methods.base import (Block, CallState, HeatMaps, MethodCall, MethodConfig, MovesTokens, ObservesQueries,
                                 Phase, Queries, ReadsInputs, Record, Runtime, Target, check_choice, check_layers,
                                 check_number, is_int, raise_problems)
from vlmfix.methods.debias import Debias, Trend, content_size, padding_fractions, raster_positions
from vlmfix.methods.registry import register_method

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter

FORMS = ("inplace", "mask")
#: the first layer a stage may prune from: its tokens are scored at the layer before
FIRST_STAGE_LAYER = 1
#: FastV's K, the paper's setting: score at layer K - 1 = 1, drop from layer K = 2 on ("after layer 2")
FASTV_LAYER = 2


def _ratio_budget(ratio: float, n: int) -> int:
    """ceil(ratio x n) of a row's n image tokens, at least 1 (less 1e-9 first: a product that rounding puts just
    above an integer, 0.3 x 10 = 3.0000000000000004, keeps 3)."""
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


# -- scoring: which query rows of layer L - 1 score a stage's image tokens ------------------------------
class Scoring:
    """The query rows whose attention scores the image tokens of a stage (at layer L - 1), and each one's
    weight w_b,i per batch row (see the module docstring). Read-only: the call observes those rows."""

    #: in words, for reprs and reports
    describes: ClassVar[str] = ""

    def queries(self, block: Block, state: CallState) -> range | None:
        """The block's query rows (0 .. q_len - 1) to read; None for none."""
        raise NotImplementedError

    def weights(self, state: CallState, positions: torch.Tensor) -> torch.Tensor:
        """(B, R) float CPU: the weight of the query at prompt position `positions[i]` (R,) in batch row b
        (0 for other rows' queries, other methods' rows and padding)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describes}>"


class LastToken(Scoring):
    """FastV: each batch row's last real token (the last prompt token, or the one before its right padding)."""

    describes = "each batch row's last real token"

    def queries(self, block: Block, state: CallState) -> range | None:
        last = state.last_range
        return range(last.start - block.q_start, last.stop - block.q_start)

    def weights(self, state: CallState, positions: torch.Tensor) -> torch.Tensor:
        return (positions[None, :] == state.last_tokens()[:, None]).float()


class TextAfterImage(Scoring):
    """Multi-stage: the mean over each batch row's text after its image, up to its last real token."""

    describes = "the mean over each batch row's text after its image"

    def queries(self, block: Block, state: CallState) -> range | None:
        first = state.first_after_image
        if first is None:
            return None
        first, stop = first - block.q_start, state.last_range.stop - block.q_start
        return range(first, stop) if first < stop else None

    def weights(self, state: CallState, positions: torch.Tensor) -> torch.Tensor:
        return state.text_after_image(positions).float()


class HiddenStates(Scoring):
    """No attention rows: the pruner chooses from the hidden states entering its stage's layer
    (`ChoosesFromHidden`: DART, the random and pooling controls)."""

    describes = "no attention rows: the hidden states entering the stage's layer"

    def queries(self, block: Block, state: CallState) -> range | None:
        return None

    def weights(self, state: CallState, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(state.batch_size, len(positions))


# -- the record ---------------------------------------------------------------------------------------
@dataclass
class PruneStage:
    """One pruning stage: from `layer` on, batch row b keeps the image tokens at prompt positions
    `kept[b]` (`budget[b]` of them), ranked by `scores[b]` (the raw scores, before any `Debias`, over
    that row's image tokens). `owner` (B, prompt_len) or None: a merging pruner's groups, the kept
    position each dropped position was merged into (-1 for none; `SlotMap.owner`)."""

    layer: int
    kept: list[torch.Tensor]
    budget: list[int]
    scores: list[torch.Tensor]
    owner: torch.Tensor | None = None

    def groups(self, row: int) -> dict[int, list[int]]:
        """{kept position: the positions merged into it} of batch row `row` ({} without merging)."""
        if self.owner is None:
            return {}
        found: dict[int, list[int]] = {}
        for pos in (self.owner[row] >= 0).nonzero().flatten().tolist():
            found.setdefault(int(self.owner[row, pos]), []).append(pos)
        return found


@dataclass
class PruneRecord(Record):
    """What a pruner did in one call: its form, stage layers, budgets per stage and row, each row's image
    tokens (`image_tokens`), the stages run (`stages`), each row's padding fractions (or None), whether
    it had anything to drop (`active`), and `budget_notes`: where the configured budget did not apply as
    written (a `keep` at or above a row's image tokens, a padding cap that lowered it), one line each,
    starting with "row {r}:" or "row {r}, layer {L}:"."""

    form: str
    layers: tuple[int, ...]
    budgets: list[list[int]]
    pad_frac: list[torch.Tensor | None]
    active: bool
    image_tokens: list[int]
    stages: list[PruneStage] = field(default_factory=list)
    budget_notes: list[str] = field(default_factory=list)

    acts: ClassVar[str] = "pruned image tokens"

    def kept(self, row: int = 0, stage: int = -1) -> torch.Tensor | None:
        """Prompt positions of the image tokens batch row `row` kept after `stage` (None: nothing was pruned)."""
        return self.stages[stage].kept[row] if self.stages else None

    def raw_scores(self, stage: int = 0) -> list[torch.Tensor] | None:
        """The raw scores (before any `Debias`) each batch row's image tokens got at `stage`, over its image
        tokens in raster order (empty for a text-only row); None when nothing was pruned. What
        `vlmfix.eval.calibrate` averages."""
        return self.stages[stage].scores if self.stages else None

    # -- the record protocol ------------------------------------------------------------------------
    def acted(self) -> list[bool]:
        """Rows that kept fewer image tokens after the last stage than they had."""
        if not self.stages:
            return [False] * len(self.image_tokens)
        return [len(kept) < n for kept, n in zip(self.stages[-1].kept, self.image_tokens)]

    def row(self, row: int) -> dict[str, Any]:
        """The image tokens batch row `row` kept (all of its image tokens when nothing was pruned)."""
        kept = self.kept(row)
        return {"kept": self.image_tokens[row] if kept is None else len(kept)}

    def notes(self, row: int) -> list[str]:
        return [n for n in self.budget_notes if n.startswith((f"row {row}:", f"row {row},"))]

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        """`kept_tokens.png`: the image tokens batch row 0 kept after the last stage (bright, outlined) and
        dropped (dark); then the budget notes."""
        lines = self._kept_map(maps)
        return lines + [f"pruner: {note}" for note in self.budget_notes]

    def _kept_map(self, maps: HeatMaps) -> list[str]:
        if not self.stages:
            return ["pruner: nothing pruned in this call; so no kept_tokens.png"]
        state = maps.state
        layout = state.rows[0]
        if not layout.has_image:
            return ["pruner: batch row 0 holds no image; so no kept_tokens.png"]
        values = torch.zeros(state.batch_size, state.prompt_len)
        values[0, self.stages[-1].kept[0]] = 1.0
        grid = layout.segments[0].grid_positions().flatten() if layout.segments else layout.image_positions
        title = (f"Image tokens the pruner kept from layer {self.stages[-1].layer} on: {int(values[0, grid].sum())} "
                 f"of {len(grid)}")
        path = maps.grid("kept_tokens.png", values, title, vmin=0.0, vmax=1.0, marked=values > 0,
                         legend=[("kept", "bright, white outline: kept image token; dark: dropped")], alpha=0.45)
        return [f"heat map, kept image tokens: {path}"]

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "form": self.form, "layers": list(self.layers), "budgets": self.budgets,
                "stages": [{"layer": s.layer, "budget": list(s.budget), "kept": [k.tolist() for k in s.kept],
                            **({"merged": [{str(k): v for k, v in s.groups(r).items()} for r in range(len(s.kept))]}
                               if s.owner is not None else {})}
                           for s in self.stages]}


# -- the calls: scoring and selection shared, one class per form ------------------------------------------
class PruneCall(MethodCall, ObservesQueries, SlotMasks, ReadsInputs):
    """One call of a pruner: it observes the scoring rows at each layer L - 1 (`Scoring`), selects the
    kept tokens of stage L (budgets, `Debias`, padding fractions from the inputs) and replaces the masks
    of the layers from L on (`SlotMasks.mask`: cached, compile-aware). What a stage does to the sequence
    is the form's (`MaskPruneCall`, `InPlacePruneCall`: `_next_map`, `_build_mask`)."""

    record_type = PruneRecord

    record: PruneRecord

    def __init__(self, runtime: "PruneRuntime", state: CallState):
        self.scoring, self.layers, self.debias, self.trend = self._scoring(runtime), runtime.layers, runtime.debias, \
            runtime.trend
        self._geometry, self._background = runtime.geometry, runtime.background
        self._stage = {layer: k for k, layer in enumerate(self.layers)}
        b, p = state.batch_size, state.prompt_len
        budgets = [[runtime.budget(s, len(r.image_positions)) for r in state.rows] for s in range(len(self.layers))]
        everything = torch.ones(b, p, dtype=torch.bool)
        self._start = SlotMap(0, torch.arange(p).expand(b, p), everything, None, everything)
        #: per row, each visual token's x of the position trend (per frame for a video)
        self._raster = [raster_positions(r) for r in state.rows] if self.debias is not None else []
        active = any(bud < len(r.image_positions) for stage in budgets for bud, r in zip(stage, state.rows))
        keep = runtime.keep
        notes = [f"row {r.index}: keep {keep} >= its {len(r.image_positions)} image tokens, so nothing is pruned "
                 "(keep counts are sized for LLaVA-1.5's 576 tokens; keep_ratio scales with the image)"
                 for r in state.rows if r.has_image and keep is not None and keep >= len(r.image_positions)]
        super().__init__(runtime, self.record_type(runtime.config.form, self.layers, budgets, [None] * b, active,
                                                   [len(r.image_positions) for r in state.rows], budget_notes=notes))
        self._mask_dtype()  # the decoding steps' mask dtype, read now (not inside a compiled step)

    def _scoring(self, runtime: "PruneRuntime") -> Scoring:
        """This call's scoring: the runtime's (a subclass may make one per call)."""
        return runtime.scoring

    def read_inputs(self, state: CallState, inputs: dict[str, Any]) -> None:
        """Each row's padding fractions, from its pixel values (`Debias(padding=True)` on a padding processor)."""
        rec = self.record
        if self.debias is None or not self.debias.padding or self._geometry != "pad" or self._background is None:
            return
        pixels = inputs.get("pixel_values")
        if pixels is None or pixels.ndim != 4:
            return
        image = 0
        for row in state.rows:
            if not row.has_image:
                continue
            fracs = []
            for seg in row.segments:
                size = content_size(pixels[image + seg.image_index], self._background.to(pixels.device))
                fracs.append(padding_fractions(size, (seg.rows, seg.cols), "pad").flatten())
            image += len({seg.image_index for seg in row.segments})
            frac = torch.zeros(len(row.image_positions))
            grid = torch.cat([seg.grid_positions().flatten() for seg in row.segments])
            frac[torch.searchsorted(row.image_positions, grid)] = torch.cat(fracs)
            rec.pad_frac[row.index] = frac
            if bool((frac > self.debias.padding_threshold).any()):
                rec.active = True

    # -- scoring (layer L - 1), in prompt positions (after in-place pruning, through the `SlotView`) ---------
    def queries(self, block: Block, state: CallState) -> range | None:
        if block.phase is not Phase.PREFILL or not self.record.active or block.layer + 1 not in self._stage:
            return None
        return self.scoring.queries(block, state)

    def observe(self, block: Block, state: CallState, queries: Queries, probs: torch.Tensor) -> None:
        """Score the image positions of stage `block.layer + 1` (mean over heads, then the scoring's weighted
        mean over each batch row's query rows) and select its kept tokens; changes nothing."""
        stage = self._stage[block.layer + 1]
        prev = state.slot_map(block.layer) or self._start
        p = state.prompt_len
        weights = self.scoring.weights(state, queries.positions)  # (B, R)
        per_head = probs[..., :p].detach().mean(1).cpu()  # (B, R, P): the one host read of a stage
        scores = (per_head * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
        self._select(state, stage, scores * prev.alive, prev, per_head, weights)

    def _select(self, state: CallState, stage: int, scores: torch.Tensor, prev: SlotMap, per_head: torch.Tensor,
                weights: torch.Tensor) -> None:
        """Per row: the top `budget` of its image tokens still present (after `Debias`, within the padding
        cap; `_count` may change the count), recorded as a `PruneStage` and, through `_add_stage`, as the
        stage's `SlotMap`. `per_head` (B, R, P) and `weights` (B, R) are the scoring rows read."""
        rec = self.record
        alive = prev.alive
        kept_rows, budgets = [], []
        for row in state.rows:
            img = row.image_positions
            if not len(img):
                kept_rows.append(img)
                budgets.append(0)
                continue
            cand = img[alive[row.index, img]]
            index = torch.searchsorted(img, cand)
            s = scores[row.index, cand]
            budget = rec.budgets[stage][row.index]
            if self.debias is not None:
                x = self._raster[row.index][index]
                frac = rec.pad_frac[row.index]
                s, content = self.debias.transform(s, x, None if frac is None else frac[index], self.trend)
                capped = min(budget, max(int(content.sum()), 1))
                if capped < budget:
                    rec.budget_notes.append(
                        f"row {row.index}, layer {self.layers[stage]}: budget {budget} lowered to {capped} by the "
                        f"padding cap (only {capped} candidate patches are not padding)")
                budget = capped
            budget = min(self._count(state, stage, row, cand, s, budget, per_head, weights), len(cand))
            kept_rows.append(cand[torch.topk(s, budget).indices].sort().values)
            budgets.append(budget)
        self._commit(state, stage, prev, kept_rows, budgets, [scores[r.index, r.image_positions] for r in state.rows])

    def _count(self, state: CallState, stage: int, row: RowLayout, cand: torch.Tensor, scores: torch.Tensor,
               budget: int, per_head: torch.Tensor, weights: torch.Tensor) -> int:
        """The top-scored tokens batch row `row` keeps of its candidates `cand` (scored `scores`, after any
        `Debias`) at `stage`: the budget (FastV, multi-stage); a subclass may decide otherwise."""
        return budget

    def _commit(self, state: CallState, stage: int, prev: SlotMap, kept: list[torch.Tensor], budgets: list[int],
                scores: list[torch.Tensor], owner: torch.Tensor | None = None) -> None:
        """Stage `stage` keeps, per row, the image positions `kept[b]` (`budgets[b]` of them; `scores[b]` over its
        image tokens for the record) of those `prev` left, merging by `owner` (or None): recorded as a
        `PruneStage` and, through the form, as the stage's `SlotMap`."""
        alive = prev.alive.clone()
        for row, k in zip(state.rows, kept):
            alive[row.index, row.image_positions] = False
            alive[row.index, k] = True
        layer = self.layers[stage]
        self.record.stages.append(PruneStage(layer, kept, budgets, scores, owner))
        self._add_stage(state, layer, prev, alive, owner)

    def _add_stage(self, state: CallState, layer: int, prev: SlotMap, alive: torch.Tensor,
                   owner: torch.Tensor | None = None) -> None:
        """Append the `SlotMap` of the stage at `layer` (keeping the prompt positions `alive`, merging by `owner`)
        to the call."""
        state.slot_maps.append(self._next_map(state, layer, prev, alive, owner))

    def _next_map(self, state: CallState, layer: int, prev: SlotMap, alive: torch.Tensor,
                  owner: torch.Tensor | None = None) -> SlotMap:
        """The `SlotMap` of a stage at `layer` that keeps the prompt positions `alive` (B, P), with the merges
        `owner` (or None)."""
        raise NotImplementedError


class MaskPruneCall(PruneCall):
    """The mask form: nothing moves; the dropped tokens are masked out as keys from each stage on."""

    def _next_map(self, state: CallState, layer: int, prev: SlotMap, alive: torch.Tensor,
                  owner: torch.Tensor | None = None) -> SlotMap:
        return SlotMap(layer, prev.pos, alive, None, alive, owner)

    def after_prefill(self, state: CallState) -> None:
        """The prompt positions still present after each stage, on the model's device, for the decoding
        steps' masks."""
        self._alive = {m.layer: m.alive.to(state.device) for m in state.slot_maps}

    def _build_mask(self, block: Block, state: CallState, m: SlotMap,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
        if block.phase is not Phase.DECODE:
            return slot_mask(block, state, m, attention_mask, False, self._dtype)
        # the model's mask (every generated token and the prompt), less the dropped prompt tokens
        b, p, key_len = state.batch_size, state.prompt_len, block.kv_len
        device = state.device if attention_mask is None else attention_mask.device
        keys = torch.ones(b, key_len, dtype=torch.bool, device=device)
        keys[:, :p] = self._alive[m.layer]
        allowed = allowed_mask(attention_mask, block.q_len, key_len, device) & keys[:, None, None, :]
        return as_mask_of(allowed, attention_mask, self._dtype)


class InPlacePruneCall(InPlaceMoves, PruneCall):
    """The in-place form: the dropped tokens leave the hidden states (and the KV cache) at each stage;
    the gathers, the masks over the kept slots and the `view` that translates slots back to prompt
    positions for every other method are `InPlaceMoves`'s."""

    def _next_map(self, state: CallState, layer: int, prev: SlotMap, alive: torch.Tensor,
                  owner: torch.Tensor | None = None) -> SlotMap:
        return slot_stage(layer, prev, alive, owner)


@dataclass
class RowChoice:
    """What a pruner that chooses from hidden states kept in one batch row: the image positions `kept` (sorted), a
    score per image token (`scores`, over the row's image tokens in raster order, for the record), and for a
    merging pruner `merged_into` (over the row's image tokens: the kept position each one is merged into, -1
    for none) ; `note`: where the budget did not apply as written (a line starting "row {r}:"), or None."""

    kept: torch.Tensor
    scores: torch.Tensor
    merged_into: torch.Tensor | None = None
    note: str | None = None


class ChoosesFromHidden(MovesTokens):
    """Mixin of a one-stage `PruneCall` that chooses at its stage layer's prefill pre-hook, from the hidden states
    entering that layer (`PruneRuntime.choose`, one batch row at a time, so that a row's choice never depends on
    the others), instead of from attention rows. A merged group enters the layer as one token at its kept
    position holding the mean (fp32) of the group's hidden states. The form decides the rest: `HiddenMaskCall`
    masks the dropped tokens as keys (it rewrites the prefill's inputs at that one layer, the cache keeps its
    length: static caches run it), `HiddenInPlaceCall` removes them (`InPlaceMoves`)."""

    def before_layer(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        changed = False
        if layer == self.layers[0] and self.record.active and not self.record.stages:
            hidden = args[0] if args else kwargs["hidden_states"]
            merged = self._choose(state, hidden)
            if merged is not None:
                if args:
                    args = (merged, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": merged}
                changed = True
        return self._then(layer, state, args, kwargs, changed)

    def _then(self, layer: int, state: CallState, args: tuple, kwargs: dict,
              changed: bool) -> tuple[tuple, dict] | None:
        """The form's part of `before_layer`, after the choice."""
        raise NotImplementedError

    def _choose(self, state: CallState, hidden: torch.Tensor) -> torch.Tensor | None:
        """Choose every row's kept tokens from `hidden` (B, prompt_len, D) and commit the stage; the hidden states
        with each merged group's mean at its kept position, or None when nothing was merged."""
        if hidden.shape[1] != state.prompt_len:
            raise RuntimeError(f"{type(self.runtime.config).__name__} chooses before any other pruning stage: layer "
                               f"{self.layers[0]} holds {hidden.shape[1]} slots, not the prompt's {state.prompt_len}")
        rec, runtime = self.record, self.runtime
        h = hidden.detach()
        kept, budgets, scores = [], [], []
        owner = None
        for row in state.rows:
            img = row.image_positions
            if not len(img):
                kept.append(img)
                budgets.append(0)
                scores.append(torch.zeros(0))
                continue
            got = runtime.choose(state, row, h[row.index], rec.budgets[0][row.index])  # type: ignore[attr-defined]
            kept.append(got.kept)
            budgets.append(len(got.kept))
            scores.append(got.scores)
            if got.note:
                rec.budget_notes.append(got.note)
            if got.merged_into is not None:
                if owner is None:
                    owner = torch.full((state.batch_size, state.prompt_len), -1, dtype=torch.long)
                owner[row.index, img] = got.merged_into
        self._commit(state, 0, self._start, kept, budgets, scores, owner)
        return None if owner is None else _group_means(h, owner)


def _group_means(hidden: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """`hidden` (B, P, D) with each kept position that others merge into (`owner` (B, P), -1 for none) replaced by
    the mean (fp32) of its group's hidden states (itself and the positions merged into it)."""
    b, p, _ = hidden.shape
    target = torch.where(owner >= 0, owner, torch.arange(p)).to(hidden.device)
    sums = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    sums.scatter_add_(1, target[:, :, None].expand_as(hidden), hidden.float())
    count = torch.zeros(b, p, dtype=torch.float32, device=hidden.device).scatter_add_(
        1, target, torch.ones(b, p, device=hidden.device))
    heads = (count > 1)[:, :, None]
    return torch.where(heads, sums / count.clamp_min(1)[:, :, None], hidden.float()).to(hidden.dtype)


class HiddenMaskCall(ChoosesFromHidden, MaskPruneCall):
    """A hidden-state pruner in mask form: nothing is removed; a merged group's mean is written at its kept position
    entering the stage layer, and the dropped tokens are masked out as keys from there on."""

    shortens_cache = False

    def view(self, block: Block, state: CallState) -> None:
        return None

    def _then(self, layer: int, state: CallState, args: tuple, kwargs: dict,
              changed: bool) -> tuple[tuple, dict] | None:
        return (args, kwargs) if changed else None


class HiddenInPlaceCall(ChoosesFromHidden, InPlacePruneCall):
    """A hidden-state pruner in the in-place form: the dropped tokens leave the hidden states and the KV cache
    from the stage layer on (`InPlaceMoves`)."""

    def _then(self, layer: int, state: CallState, args: tuple, kwargs: dict,
              changed: bool) -> tuple[tuple, dict] | None:
        moved = InPlaceMoves.before_layer(self, layer, state, args, kwargs)
        return moved if moved is not None else (args, kwargs) if changed else None


def _padding_geometry(adapter: "Adapter") -> tuple[str, torch.Tensor | None]:
    """("pad" | "crop" | "none", normalised padding colour or None) for the adapter's family/processor."""
    if adapter.family == "Qwen2-VL":
        return "none", None
    if adapter.family != "LLaVA-1.5":
        return "crop", None
    ip = getattr(adapter.processor, "image_processor", None)
    if ip is None or not getattr(ip, "do_pad", False):
        return "crop", None
    mean = torch.tensor([float(x) for x in ip.image_mean])
    std = torch.tensor([float(x) for x in ip.image_std])
    colour = torch.tensor([int(x * 255) for x in ip.image_mean]) / 255.0
    return "pad", (colour - mean) / std




# -- runtimes: what a pruner resolved for a model (its scoring, its budget, the call of its form) -----------
class PruneRuntime(Runtime):
    """A pruner bound to a model: its stage `layers`, its `scoring` and `budget` (the subclass's), the
    call class of its form (`call`: `MaskPruneCall` or `InPlacePruneCall`), the `Debias` and its resolved
    `trend`, and the padding `geometry` / `background` colour of the model's processor."""

    order = -1  # observes the raw attention rows, before VAR / GIFT edit them
    #: the call class attach reads before any call (set per runtime, by its form)
    call: ClassVar[type[MethodCall]] = PruneCall
    #: the query rows that score a stage's image tokens
    scoring: ClassVar[Scoring]
    #: the call class of each form
    forms: ClassVar[dict[str, type[PruneCall]]] = {"mask": MaskPruneCall, "inplace": InPlacePruneCall}

    #: the first layer a stage may act at (attention scorers read the layer before theirs)
    first_layer: ClassVar[int] = FIRST_STAGE_LAYER

    def __init__(self, config: MethodConfig, target: Target):
        super().__init__(config, target)
        adapter = target.adapter
        name = type(config).__name__
        implementation = adapter.text_config._attn_implementation
        if implementation not in (None, "eager", "sdpa"):
            raise ValueError(
                f"{name} needs the decoder on 'sdpa' or 'eager' attention (4-D masks), not "
                f"{implementation!r}; load the model with attn_implementation='sdpa'."
            )
        layers = config.stage_layers()
        for layer in layers:
            if not self.first_layer <= layer < adapter.num_layers:
                why = "scores come from the layer before; " if self.first_layer else ""
                raise ValueError(
                    f"{name} layer {layer} is out of range: it must be in {self.first_layer} .. "
                    f"{adapter.num_layers - 1} ({why}the model has {adapter.num_layers} decoder layers)"
                )
        adapter.check_pruning(layers, config.form)
        self.layers: tuple[int, ...] = layers
        self.call = self.forms[config.form]  # type: ignore[misc]  # per runtime: attach reads its capabilities
        self._num_layers = adapter.num_layers
        self.geometry, self.background = _padding_geometry(adapter)
        self.debias: Debias | None = getattr(config, "debias", None)
        names = " ".join(str(getattr(c, "_name_or_path", "") or "") for c in (adapter.config, adapter.text_config))
        self.trend: Trend | None = self.debias.resolve(names, config.preset_key) if self.debias else None
        #: a fixed token count per row (FastV's `keep`), which the call's notes compare with each row's; else None
        self.keep: int | None = None

    def budget(self, stage: int, n: int) -> int:
        """The image tokens a row with `n` of them keeps at stage `stage` (before the padding cap)."""
        raise NotImplementedError

    def choose(self, state: CallState, row: "RowLayout", hidden: torch.Tensor, budget: int) -> RowChoice:
        """A hidden-state pruner's choice (`ChoosesFromHidden`) for batch row `row` from its hidden states `hidden`
        (prompt_len, D) entering the stage layer, keeping `budget` of its image tokens."""
        raise NotImplementedError

    def start(self, state: CallState) -> PruneCall:
        return self.call(self, state)

    def resolved(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": list(self.layers)}
        if self.keep is not None and self.config.keep is None:
            out["keep"] = self.keep
        if self.trend is not None:
            out["trend"] = {"family": self.trend.family, **self.trend.named()}
        return out

    def moved_layers(self) -> tuple[int, ...]:
        if issubclass(self.call, InPlaceMoves):
            return tuple(range(min(self.layers), self._num_layers))
        # a mask-form hidden-state pruner rewrites the prefill's inputs of its one layer
        return (min(self.layers),) if issubclass(self.call, MovesTokens) else ()

    def check_combination(self, others: Sequence[Runtime]) -> None:
        found = [type(r.config).__name__ for r in others if isinstance(r, PruneRuntime)]
        if found:
            raise ValueError(f"attach at most one pruner: {type(self.config).__name__} was given with "
                             f"{', '.join(found)}")


class KeepRuntime(PruneRuntime):
    """A one-stage pruner bound to a model with FastV's budget: `keep` tokens or `keep_ratio` of each row's image
    (its config has `keep`, `keep_ratio` and `default_keep`; `keep_problems` checks them)."""

    def __init__(self, config: MethodConfig, target: Target):
        super().__init__(config, target)
        ratio = config.keep_ratio  # type: ignore[attr-defined]
        self.ratio: float | None = None if ratio is None else float(ratio)
        keep = config.keep  # type: ignore[attr-defined]
        self.keep = None if ratio is not None else (config.default_keep if keep is None else keep)  # type: ignore

    def budget(self, stage: int, n: int) -> int:
        return _ratio_budget(self.ratio, n) if self.ratio is not None else min(n, int(self.keep))


class FastVRuntime(KeepRuntime):
    """FastV bound to a model: one stage, scored by each row's last real token; `keep` tokens or `keep_ratio`
    of each row's image."""

    scoring = LastToken()


#: StagedPrune's `scoring` choices: the text after the image (default), or each row's last real token (PDrop's
#: last instruction token)
STAGED_SCORINGS: dict[str, Scoring] = {"text": TextAfterImage(), "last": LastToken()}


class StagedRuntime(PruneRuntime):
    """Multi-stage pruning bound to a model: scored by the text after the image (or, `scoring="last"`, by each
    row's last real token); `keep_ratios[stage]` of each row's image at each stage."""

    scoring = TextAfterImage()

    def __init__(self, config: "StagedPrune", target: Target):
        super().__init__(config, target)
        self.ratios = tuple(float(r) for r in config.keep_ratios)
        self.scoring = STAGED_SCORINGS[config.scoring]  # type: ignore[misc]  # per runtime, by the config

    def budget(self, stage: int, n: int) -> int:
        return _ratio_budget(self.ratios[stage], n)


# -- configs --------------------------------------------------------------------------------------
def keep_problems(keep: Any, ratio: Any) -> list[str | None]:
    """The checks of a `keep` / `keep_ratio` budget (`KeepRuntime`): a positive int, a ratio in (0, 1], not both."""
    return [
        None if keep is None or is_int(keep) and keep > 0 else
        f"keep must be a positive number of tokens (an int), got {keep!r}",
        None if ratio is None else check_number("keep_ratio", ratio, 0.0, 1.0, lo_open=True),
        None if keep is None or ratio is None else
        f"takes keep or keep_ratio, not both (got keep={keep!r}, keep_ratio={ratio!r}); set the other to None",
    ]


def _pruner_problems(config: "FastVPrune | StagedPrune") -> list[str | None]:
    """The checks FastVPrune and StagedPrune share: `form`, and `debias` (a mapping, as a YAML preset
    gives it, becomes a `Debias` here, checked as such)."""
    debias = None
    if isinstance(config.debias, dict):
        try:
            config.debias = Debias(**config.debias)
        except (TypeError, ValueError) as err:
            debias = f"debias {dict(config.debias)!r} is not a valid Debias: {err}"
    elif config.debias is not None and not isinstance(config.debias, Debias):
        debias = f"debias must be a vlmfix.Debias, a mapping of its fields, or None, got {config.debias!r}"
    return [debias, check_choice("form", config.form, FORMS)]


@dataclass
class FastVPrune(MethodConfig):
    """FastV (paper: layer 2; budgets of 64 / 128 / 192 of LLaVA-1.5's 576).

    - layer: K; tokens are scored at layer K - 1 by each row's last real token and dropped from K on;
    - keep: image tokens kept per image row (128 when neither keep nor keep_ratio is given); or
      keep_ratio in (0, 1], the share of each row's image tokens (not both);
    - debias: a `Debias()` or None; form: "inplace" (speed) or "mask" (reference; the form that
      runs under a static cache / compiled generation).

    Every mistake is refused at construction; a layer beyond the model's depth when attach binds it.
    """

    layer: int = FASTV_LAYER
    keep: int | None = None
    keep_ratio: float | None = None
    debias: Debias | None = None
    form: str = "inplace"

    preset_key: ClassVar[str] = "fastv"  # the trend presets' pruner name
    default_keep: ClassVar[int] = 128

    def __post_init__(self) -> None:
        keep, ratio = self.keep, self.keep_ratio
        raise_problems("FastVPrune", [
            f"layer must be an int, got {self.layer!r}" if not is_int(self.layer) else
            None if self.layer >= FIRST_STAGE_LAYER else
            f"layer {self.layer} is out of range: it must be >= {FIRST_STAGE_LAYER} (scores come from the layer before)",
            *keep_problems(keep, ratio),
            *_pruner_problems(self),
        ])

    def stage_layers(self) -> tuple[int, ...]:
        return (int(self.layer),)

    def scorer(self) -> "FastVPrune":
        """This pruner as trend calibration runs it (`vlmfix.eval.calibrate`): without debiasing, in mask form,
        keeping 1 token so that every image with two or more is scored (the kept count does not change the
        scores)."""
        return dataclasses.replace(self, debias=None, form="mask", keep=1, keep_ratio=None)


@dataclass
class StagedPrune(MethodConfig):
    """Multi-stage pruning (PyramidDrop-style): at each of `layers`, keep `keep_ratios` (of the
    image's tokens, strictly decreasing) ranked by the mean attention of the text after the image.

    layers: a non-empty, strictly increasing list of ints >= 1; keep_ratios: one number in (0, 1] per
    layer; debias and form as FastVPrune's; scoring: "text" (the mean over the text after the image) or "last"
    (each row's last real token, PyramidDrop's last instruction token: the `pdrop` preset). Every mistake is refused at construction; a layer beyond
    the model's depth when attach binds it."""

    layers: Sequence[int] = (2, 10, 20)
    keep_ratios: Sequence[float] = (0.32, 0.16, 0.08)
    debias: Debias | None = None
    form: str = "inplace"
    scoring: str = "text"

    preset_key: ClassVar[str] = "staged"

    def __post_init__(self) -> None:
        layers, ratios = self.layers, self.keep_ratios
        problems = [check_layers("layers", layers, lo=FIRST_STAGE_LAYER), *_pruner_problems(self),
                    check_choice("scoring", self.scoring, tuple(STAGED_SCORINGS))]
        layers_ok = problems[0] is None
        if layers_ok and any(b <= a for a, b in zip(layers, layers[1:])):
            problems[0] = f"layers must be strictly increasing, got {list(layers)}"
        if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__len__"):
            problems.append(f"keep_ratios must be a list of numbers in (0, 1], got {ratios!r}")
        else:
            wrong = [check_number("keep ratio", r, 0.0, 1.0, lo_open=True) for r in ratios]
            problems += wrong
            if layers_ok and len(ratios) != len(layers):
                problems.append(f"needs one keep ratio per layer, got layers {list(layers)} and keep_ratios "
                                f"{list(ratios)}")
            elif not any(wrong) and any(b >= a for a, b in zip(ratios, ratios[1:])):
                problems.append(f"keep_ratios must be strictly decreasing, got {list(ratios)}")
        raise_problems("StagedPrune", problems)

    def stage_layers(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.layers)

    def scorer(self) -> "StagedPrune":
        """This pruner as trend calibration runs it (`vlmfix.eval.calibrate`): without debiasing, in mask form
        (its first stage scores every image with two or more tokens)."""
        return dataclasses.replace(self, debias=None, form="mask")


def prune_record(state: CallState) -> PruneRecord:
    """The record of the pruner attached in the call of `state` (attach takes at most one)."""
    found = next((rec for rec in state.records if isinstance(rec, PruneRecord)), None)
    if found is None:
        raise ValueError("no pruner was attached in this call")
    return found


def kept_tokens(state: CallState, row: int = 0, stage: int = -1) -> torch.Tensor:
    """Original positions of the image tokens batch row `row` kept after `stage` (all when no pruning ran)."""
    kept = prune_record(state).kept(row, stage)
    return state.rows[row].image_positions if kept is None else kept


__all__ = ["ChoosesFromHidden", "FastVPrune", "FastVRuntime", "HiddenInPlaceCall", "HiddenMaskCall", "HiddenStates",
           "InPlacePruneCall", "KeepRuntime", "LastToken", "MaskPruneCall", "PruneCall", "PruneRecord", "PruneRuntime",
           "PruneStage", "RowChoice", "Scoring", "StagedPrune", "StagedRuntime", "TextAfterImage", "keep_problems",
           "kept_tokens", "prune_record"]


register_method(name="fastv", config=FastVPrune, runtime=FastVRuntime,
                summary="FastV (Chen et al., 2024): drop the image tokens the last prompt token attends least, "
                        "after layer 2")
register_method(name="staged", config=StagedPrune, runtime=StagedRuntime,
                summary="multi-stage pruning (PyramidDrop-style): drop image tokens at several layers, ranked by "
                        "the text after the image")
