"""SparseVLM: text-guided visual token sparsification (Zhang et al., "SparseVLM: Visual Token Sparsification
for Efficient Vision-Language Model Inference", ICML 2025, arXiv 2410.04417).

Three parts, as the paper describes them. Only the paper's abstract and our notes of its method could be read
when this was written (no code was consulted): the formulas are our reading, and the choices where it leaves
room are marked "choice"; docs/methods.md lists them.

1. **Text raters.** Not every text token speaks for the image. From the decoder's input embeddings
   (entering layer 0) of a batch row's image tokens H_v (N x D) and of its candidate text tokens H_q
   (T x D), the relevance

       R = softmax_over_text(H_v H_q^T / sqrt(D)),    r_t = (1 / N) sum_v R_v,t,

   and the raters are the text tokens with r_t >= mean_t(r_t). Candidates (choice): the row's question
   (`RowLayout.query_positions`) after its last image token (a token before the image cannot attend to it);
   without one, the text after the image up to the row's last real token; without that, the last token.
2. **Progressive sparsification with rank-based counts.** At each stage layer L (default 2, 6, 15, LLaVA-1.5's
   32 layers), the image tokens still present are rated at layer L - 1 by the raters' attention, averaged
   over heads and raters (a `Scoring`, as FastV's and multi-stage's):

       s_j = (1 / |raters|) sum_{i in raters} mean_h A_h,i,j,

   optionally after `Debias` (arXiv 2508.17807). The paper decides how many tokens to delete from the rank
   of the raters-to-image attention matrix P (|raters| x n, mean over heads): a rank deficit means redundant
   tokens, and it deletes N = ceil(lambda (n - rank(P))) (lambda: `rank_scale`). Here a stage's budget (from
   `keep` / `keep_ratio` / `keeps` / `keep_ratios`, see `SparseVLM`) is a floor: the stage keeps
   max(budget, n - N) tokens, so the rank count decides where it deletes fewer than the budget asks; the
   record notes every such stage ("row r, layer L: ..."). `rank_scale=None` keeps the budgets as written.
3. **Token recycling.** Of the tokens a stage deletes, the best-rated share `recycle_ratio` (tau) is
   recycled: clustered by density peaks with k nearest neighbours (DPC-kNN) on their hidden states entering
   layer L, into ceil(`cluster_ratio` x recycled) clusters, each aggregated into one token (the mean of its
   members' hidden states; the paper says the pruned tokens are compressed into compact ones, we choose the
   mean). The recycled token sits at its cluster's centre (a token of the cluster: its position, hence its
   rotary position), and counts toward the stage's budget: a stage keeps budget - k top-rated tokens and
   k recycled ones. DPC-kNN: rho_i = exp(-mean_{j in kNN(i)} d_ij^2), delta_i = min distance to a denser
   token (the densest: its largest distance), centres = the k largest rho_i delta_i, every other token joins
   its nearest centre (ties: the earlier centre / position).

Both forms of `vlmfix.methods.prune` apply: "inplace" (deleted tokens leave the hidden states and the KV
cache; the recycled features are written into the centre's slot through `InPlaceMoves.rewrite`) and "mask"
(nothing moves: deleted tokens are masked out as keys from L on and the centre's features rewritten in
place; this form keeps the cache length, so it runs under a static cache / compiled generation). Merges are
`SlotMap.owner` (`CallState.merged_into`): every recycled token's members point to its centre.

Composition with VAR, GIFT and the decoding baselines is the pruners' (prompt positions through a
`SlotView`). Described, with its choices and defaults, in docs/methods.md ("SparseVLM").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from vlmfix.core.moves import InPlaceMoves
from vlmfix.core.protocol import MovesTokens
from vlmfix.core.slots import SlotView
from vlmfix.core.state import Block, CallState, RowLayout, SlotMap
from vlmfix.methods.base import HeatMaps, MethodConfig, Target, check_layers, check_number, is_int, raise_problems
from vlmfix.methods.debias import Debias
from vlmfix.methods.prune import (FIRST_STAGE_LAYER, InPlacePruneCall, MaskPruneCall, PruneCall, PruneRecord,
                                  PruneRuntime, Scoring, _pruner_problems, _ratio_budget)
from vlmfix.methods.registry import register_method

#: the paper's sparsification layers for LLaVA-1.5 (32 decoder layers), as we read it
SPARSE_LAYERS = (2, 6, 15)


# -- the raters -----------------------------------------------------------------------------------
def rater_candidates(row: RowLayout) -> torch.Tensor:
    """The text positions of batch row `row` that may rate its image: its question after its last image token,
    else its text after the image up to its last real token, else its last token (empty: a text-only row)."""
    if not row.has_image:
        return torch.zeros(0, dtype=torch.long)
    after, last = row.after_image, row.last
    if row.query_positions is not None:
        question = row.query_positions[(row.query_positions >= after) & (row.query_positions <= last)]
        if len(question):
            return question
    if after <= last:
        return torch.arange(after, last + 1)
    return torch.tensor([last])


def select_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The raters among T text tokens: image (N, D) and text (T, D) embeddings -> (T,) bool, r_t >= mean(r)
    with r = mean over the image tokens of softmax_over_text(image text^T / sqrt(D)) (float64)."""
    image, text = image.double(), text.double()
    rel = torch.softmax(image @ text.T / math.sqrt(image.shape[-1]), dim=-1).mean(0)
    return rel >= rel.mean()


class Raters(Scoring):
    """SparseVLM's scoring: each batch row's raters (picked per call from the input embeddings, `mask` (B, P)),
    weighted equally."""

    describes = "each batch row's text raters (the question tokens most relevant to the image)"

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def queries(self, block: Block, state: CallState) -> range | None:
        if self.mask is None or not bool(self.mask.any()):
            return None
        cols = self.mask.any(0).nonzero().flatten()
        return range(int(cols[0]) - block.q_start, int(cols[-1]) + 1 - block.q_start)

    def weights(self, state: CallState, positions: torch.Tensor) -> torch.Tensor:
        return self.mask[:, positions].float()


# -- recycling ------------------------------------------------------------------------------------
def density_peaks(x: torch.Tensor, clusters: int, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of the m points x (m, D) into `clusters` clusters: (centres (k,) indices into x, assignment (m,)
    the cluster of each point, 0..k-1). Distances in float64, without the matmul shortcut (exact and
    symmetric); ties go to the lower index."""
    x = x.double()
    m = len(x)
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    nn = min(neighbours, m - 1)
    if nn > 0:
        near = dist.topk(nn + 1, largest=False).values[:, 1:]
        rho = torch.exp(-(near**2).mean(1))
    else:
        rho = torch.ones(m, dtype=torch.float64)
    order = torch.sort(-rho, stable=True).indices
    delta = torch.empty(m, dtype=torch.float64)
    delta[order[0]] = dist[order[0]].max()
    for k in range(1, m):
        delta[order[k]] = dist[order[k], order[:k]].min()
    centres = torch.sort(-(rho * delta), stable=True).indices[:clusters]
    assign = dist[:, centres].argmin(1)
    assign[centres] = torch.arange(len(centres))
    return centres, assign


# -- the record -------------------------------------------------------------------------------------
@dataclass
class SparseVLMRecord(PruneRecord):
    """A `PruneRecord` (stages, kept tokens, budgets, budget notes) and SparseVLM's own: each row's raters
    (`raters`, prompt positions; None for a text-only row), per stage and row the rank of P and the tokens the
    rank count would keep (`ranks`: (rank, n - N) or None), and the recycled groups (`groups`: per stage and
    row, {centre position: the sorted positions merged into it, the centre included})."""

    raters: list[torch.Tensor | None] = field(default_factory=list)
    ranks: list[list[tuple[int, int] | None]] = field(default_factory=list)
    groups: list[list[dict[int, list[int]]]] = field(default_factory=list)

    def row(self, row: int) -> dict[str, Any]:
        out = super().row(row)
        raters = self.raters[row] if row < len(self.raters) else None
        out["raters"] = 0 if raters is None else len(raters)
        out["recycled"] = sum(len(stage[row]) for stage in self.groups)
        return out

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        lines = self._kept_map(maps)
        recycled = sum(len(stage[maps.row]) for stage in self.groups) if self.groups else 0
        lines.append(f"sparsevlm: batch row {maps.row} kept {recycled} recycled token(s) (cluster centres, "
                     "counted as kept)")
        return lines + [f"pruner: {note}" for note in self.budget_notes]

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "raters": [None if r is None else r.tolist() for r in self.raters],
                "ranks": [[None if x is None else list(x) for x in stage] for stage in self.ranks],
                "groups": [[{str(c): g for c, g in row.items()} for row in stage] for stage in self.groups]}


# -- the calls ----------------------------------------------------------------------------------------
class SparseVLMCall(PruneCall):
    """SparseVLM's part of both forms: the raters (layer 0's inputs), the rank-based count (`_count`), and the
    recycling at each stage layer's inputs (`before_layer`), which completes the stage's `SlotMap`."""

    record_type = SparseVLMRecord

    record: SparseVLMRecord

    def __init__(self, runtime: "SparseVLMRuntime", state: CallState):
        super().__init__(runtime, state)
        config = runtime.config
        self.rank_scale, self.recycle_ratio, self.cluster_ratio = config.rank_scale, config.recycle_ratio, \
            config.cluster_ratio
        self.neighbours = int(config.neighbours)
        #: per stage layer: per row (recycle candidates, clusters); then (previous map, alive) until the layer
        self._plan: dict[int, dict[int, tuple[torch.Tensor, int]]] = {}
        self._pending: dict[int, tuple[SlotMap, torch.Tensor]] = {}
        #: per stage layer: per row (centre positions (k,), their features (k, D))
        self._merged: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self.record.raters = [None] * state.batch_size

    def _scoring(self, runtime: PruneRuntime) -> Scoring:
        return Raters()

    # -- raters (layer 0) and recycling (stage layers), at the prefill's layer inputs --------------------
    def before_layer(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if layer == 0 and self.record.active:
            self._pick_raters(state, hidden)
        if layer in self._pending:
            self._recycle(state, layer, hidden)
        return self._move(layer, state, args, kwargs)

    def _move(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        raise NotImplementedError

    def _pick_raters(self, state: CallState, hidden: torch.Tensor) -> None:
        mask = torch.zeros(state.batch_size, state.prompt_len, dtype=torch.bool)
        for row in state.rows:
            text = rater_candidates(row)
            if not len(text):
                continue
            h = hidden[row.index].detach()
            chosen = text[select_raters(h[row.image_positions.to(h.device)], h[text.to(h.device)]).cpu()]
            mask[row.index, chosen] = True
            self.record.raters[row.index] = chosen
        self.scoring.mask = mask

    # -- the rank-based count and the recycling plan (at layer L - 1) -------------------------------------
    def _count(self, state: CallState, stage: int, row: RowLayout, cand: torch.Tensor, scores: torch.Tensor,
               budget: int, per_head: torch.Tensor, weights: torch.Tensor) -> int:
        rec, layer, n = self.record, self.layers[stage], len(cand)
        while len(rec.ranks) <= stage:
            rec.ranks.append([None] * state.batch_size)
            rec.groups.append([{} for _ in state.rows])
        keep = min(budget, n)
        if self.rank_scale is not None and keep < n:
            p = per_head[row.index][weights[row.index] > 0][:, cand].double()  # raters x candidates
            rank = int(torch.linalg.matrix_rank(p)) if p.numel() else 0
            by_rank = n - min(n, math.ceil(self.rank_scale * (n - rank) - 1e-9))
            rec.ranks[stage][row.index] = (rank, by_rank)
            if by_rank > keep:
                rec.budget_notes.append(
                    f"row {row.index}, layer {layer}: the rank-based count kept {by_rank} of {n} tokens, more than "
                    f"the budget {keep} (rank of the raters' attention {rank}, rank_scale {self.rank_scale:g})")
                keep = by_rank
        clusters = 0
        if keep < n and self.recycle_ratio > 0:
            recycled = math.ceil(self.recycle_ratio * (n - keep) - 1e-9)
            clusters = min(math.ceil(self.cluster_ratio * recycled - 1e-9), recycled, keep - 1)
            if clusters < 1 and recycled > 0:
                rec.budget_notes.append(f"row {row.index}, layer {layer}: no token recycled (a budget of {keep} "
                                        "leaves no room beside the best-rated token)")
        if clusters < 1:
            return keep
        top = torch.topk(scores, keep - clusters).indices  # the call's own selection, as `_select` makes it
        rest = torch.ones(n, dtype=torch.bool)
        rest[top] = False
        rest = rest.nonzero().flatten()
        best = rest[torch.sort(-scores[rest], stable=True).indices[:recycled]]
        self._plan.setdefault(layer, {})[row.index] = (cand[best.sort().values], clusters)
        return keep - clusters

    def _add_stage(self, state: CallState, layer: int, prev: SlotMap, alive: torch.Tensor,
                   owner: torch.Tensor | None = None) -> None:
        if layer in self._plan:  # the recycled tokens need the hidden states entering the layer
            self._pending[layer] = (prev, alive)
        else:
            super()._add_stage(state, layer, prev, alive, owner)

    def _recycle(self, state: CallState, layer: int, hidden: torch.Tensor) -> None:
        """Cluster each row's recycle candidates on the hidden states entering `layer` (in the previous stage's
        slots), keep one token per cluster at its centre carrying the cluster's mean, and add the stage."""
        prev, alive = self._pending.pop(layer)
        owner = torch.full_like(alive, -1, dtype=torch.long)
        stage = self.layers.index(layer)
        kept = self.record.stages[stage]
        merged = []
        for r, (positions, clusters) in self._plan.pop(layer).items():
            slots = torch.searchsorted(prev.pos[r].contiguous(), positions)
            feats = hidden[r, slots.to(hidden.device)].detach()
            centres, assign = density_peaks(feats.cpu(), clusters, self.neighbours)
            index = assign.to(feats.device)
            sums = torch.zeros(len(centres), feats.shape[-1], device=feats.device).index_add_(0, index, feats.float())
            means = sums / torch.bincount(assign, minlength=len(centres)).to(feats.device)[:, None]
            centre_pos = positions[centres]
            alive[r, centre_pos] = True
            groups = {}
            for c, pos in enumerate(centre_pos.tolist()):
                members = positions[assign == c]
                owner[r, members[members != pos]] = pos
                groups[pos] = members.tolist()
            self.record.groups[stage][r] = groups
            kept.kept[r] = torch.cat([kept.kept[r], centre_pos]).sort().values
            kept.budget[r] += len(centres)
            merged.append((r, centre_pos, means.to(hidden.dtype)))
        self._merged[layer] = merged
        state.slot_maps.append(dataclasses.replace(self._next_map(state, layer, prev, alive), owner=owner))


class MaskSparseVLMCall(SparseVLMCall, MaskPruneCall, MovesTokens):
    """The mask form: nothing moves; deleted tokens are masked out as keys, recycled features are written at
    their centres' positions (the cache keeps its length: this form runs under a static cache)."""

    shortens_cache = False

    def _move(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        merged = self._merged.get(layer)
        if not merged:
            return None
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        for r, pos, feats in merged:
            hidden[r, pos.to(hidden.device)] = feats
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def view(self, block: Block, state: CallState) -> SlotView | None:
        return None


class InPlaceSparseVLMCall(SparseVLMCall, InPlacePruneCall):
    """The in-place form: deleted tokens leave the hidden states and the cache (`InPlaceMoves`); recycled
    features are written into their centres' slots after the gather (`rewrite`)."""

    def _move(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return InPlaceMoves.before_layer(self, layer, state, args, kwargs)

    def rewrite(self, layer: int, state: CallState, hidden: torch.Tensor) -> torch.Tensor:
        merged = self._merged.get(layer)
        if not merged:
            return hidden
        m = state.slot_map(layer)
        for r, pos, feats in merged:
            slots = torch.searchsorted(m.pos[r].contiguous(), pos)
            hidden[r, slots.to(hidden.device)] = feats
        return hidden


# -- the runtime and the config -----------------------------------------------------------------------
class SparseVLMRuntime(PruneRuntime):
    """SparseVLM bound to a model: its stage layers, each stage's budget (the floor the rank count may raise),
    the call of its form; layer 0's inputs are read for the raters."""

    forms = {"mask": MaskSparseVLMCall, "inplace": InPlaceSparseVLMCall}

    def __init__(self, config: "SparseVLM", target: Target):
        super().__init__(config, target)
        self.keep = config.fixed_keep

    def budget(self, stage: int, n: int) -> int:
        """`keeps[stage]` / `keep_ratios[stage]`; or, for a final `keep` / `keep_ratio` K, the geometric schedule
        ceil(n (K / n)^((stage + 1) / stages)), which ends at K."""
        c = self.config
        if n == 0:
            return 0
        if c.keeps is not None:
            return min(n, int(c.keeps[stage]))
        if c.keep_ratios is not None:
            return _ratio_budget(float(c.keep_ratios[stage]), n)
        final = _ratio_budget(float(c.keep_ratio), n) if c.keep_ratio is not None else min(n, int(self.keep))
        share = (final / n) ** ((stage + 1) / len(self.layers))
        return min(n, max(final, math.ceil(n * share - 1e-9)))

    def moved_layers(self) -> tuple[int, ...]:
        if issubclass(self.call, InPlaceMoves):
            return (0, *range(min(self.layers), self._num_layers))
        return (0, *self.layers)


def _schedule_problems(name: str, values: Any, count: int | None, number: bool) -> list[str | None]:
    """A per-stage schedule: one value per stage, strictly decreasing; counts positive ints, ratios in (0, 1]."""
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
        return [f"{name} must be a non-empty list, got {values!r}"]
    wrong = [check_number(name[:-1], v, 0.0, 1.0, lo_open=True) if number else
             None if is_int(v) and v > 0 else f"{name} must hold positive ints, got {v!r}" for v in values]
    if any(wrong):
        return wrong
    if count is not None and len(values) != count:
        return [f"needs one of {name} per layer, got {len(values)} for {count} layers"]
    if any(b >= a for a, b in zip(values, values[1:])):
        return [f"{name} must be strictly decreasing, got {list(values)}"]
    return []


@dataclass
class SparseVLM(MethodConfig):
    """SparseVLM (Zhang et al., ICML 2025; see the module docstring).

    - layers: the stage layers (strictly increasing ints >= 1; default 2, 6, 15);
    - budget, one of: keep (image tokens left after the last stage, recycled ones included; 128 when none is
      given), keep_ratio (that share of each row's image), keeps (tokens per stage) or keep_ratios (shares per
      stage), both strictly decreasing;
    - rank_scale: lambda of the rank-based count N = ceil(lambda (n - rank P)); a stage keeps
      max(budget, n - N); None: the budgets as written;
    - recycle_ratio: tau, the share of a stage's deleted tokens recycled (0: none); cluster_ratio: clusters per
      recycled token; neighbours: k of DPC-kNN;
    - debias: a `Debias()` or None; form: "inplace" (speed) or "mask" (reference; runs under a static cache).
    """

    layers: Sequence[int] = SPARSE_LAYERS
    keep: int | None = None
    keep_ratio: float | None = None
    keeps: Sequence[int] | None = None
    keep_ratios: Sequence[float] | None = None
    rank_scale: float | None = 1.0
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1
    neighbours: int = 5
    debias: Debias | None = None
    form: str = "inplace"

    preset_key: ClassVar[str] = "sparsevlm"  # the trend presets' pruner name
    default_keep: ClassVar[int] = 128

    def __post_init__(self) -> None:
        layers = self.layers
        problems = [check_layers("layers", layers, lo=FIRST_STAGE_LAYER)]
        count = None
        if problems[0] is None:
            count = len(layers)
            if any(b <= a for a, b in zip(layers, layers[1:])):
                problems[0] = f"layers must be strictly increasing, got {list(layers)}"
        given = [k for k in ("keep", "keep_ratio", "keeps", "keep_ratios") if getattr(self, k) is not None]
        if len(given) > 1:
            problems.append(f"takes one budget, got {', '.join(given)}; set the others to None")
        keep = self.keep
        problems += [
            None if keep is None or is_int(keep) and keep > 0 else
            f"keep must be a positive number of tokens (an int), got {keep!r}",
            None if self.keep_ratio is None else check_number("keep_ratio", self.keep_ratio, 0.0, 1.0, lo_open=True),
            *_schedule_problems("keeps", self.keeps, count, False),
            *_schedule_problems("keep_ratios", self.keep_ratios, count, True),
            None if self.rank_scale is None else check_number("rank_scale", self.rank_scale, 0.0, lo_open=True),
            check_number("recycle_ratio", self.recycle_ratio, 0.0, 1.0),
            check_number("cluster_ratio", self.cluster_ratio, 0.0, 1.0, lo_open=True),
            None if is_int(self.neighbours) and self.neighbours >= 1 else
            f"neighbours must be an int >= 1, got {self.neighbours!r}",
            *_pruner_problems(self),
        ]
        raise_problems("SparseVLM", problems)

    def stage_layers(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.layers)

    @property
    def fixed_keep(self) -> Any:
        """The final image tokens kept per row when no other budget is given (`keep`, else `default_keep`),
        else None."""
        if any(getattr(self, k) is not None for k in ("keep_ratio", "keeps", "keep_ratios")):
            return None
        return self.default_keep if self.keep is None else self.keep

    def scorer(self) -> "SparseVLM":
        """This pruner as trend calibration runs it (`vlmfix.eval.calibrate`): without debiasing, in mask form,
        keeping 1 token at its one stage (the first stage's scores do not depend on the count)."""
        return dataclasses.replace(self, layers=self.stage_layers()[:1], debias=None, form="mask", keep=1,
                                   keep_ratio=None, keeps=None, keep_ratios=None, rank_scale=None)


__all__ = ["InPlaceSparseVLMCall", "MaskSparseVLMCall", "Raters", "SparseVLM", "SparseVLMCall", "SparseVLMRecord",
           "SparseVLMRuntime", "density_peaks", "rater_candidates", "select_raters"]


register_method(name="sparsevlm", config=SparseVLM, runtime=SparseVLMRuntime,
                summary="SparseVLM (Zhang et al., ICML 2025): text raters rate the image tokens, rank-based counts "
                        "prune them over layers 2, 6, 15, and the best pruned ones are recycled into a few merged "
                        "tokens")
