"""Attention-based visual token pruning: FastV and multi-stage (PyramidDrop-style).

One scoring path for both: at each stage layer L, the image tokens still present are scored by the
attention they receive at layer L - 1 (fp32 eager rows, averaged over heads): FastV from each batch
row's last real token (the last prompt token, or the one before a right-padded row's padding),
multi-stage from the mean over the row's text query rows after the image (padding excluded). The
top tokens (optionally after `Debias`) are kept and the rest dropped from layer L on.

Forms:
- "inplace": dropped tokens leave the hidden states at layer L (a forward pre-hook slices them),
  so the KV cache of layers >= L is shorter; the rotary (cos, sin) and `position_ids` given to
  every layer >= L are gathered to the kept slots, so kept tokens keep their original positions.
  The attention mask of those layers is rebuilt over the kept slots from the model's own mask.
  Batch rows may keep different numbers of tokens: shorter rows are filled with dropped tokens
  that stay masked as keys.
- "mask": nothing is removed; dropped tokens are masked out as keys from layer L on (reference).
Each stage is recorded as a `SlotMap` in `CallState.slot_maps` (slot -> original position, and
the positions still present), and in the call's `PruneRecord` (`state.record(FastVPrune)`).

Cost: the scoring, the selection and the slot maps happen once per stage at the prefill. Decoding
steps carry no pruning hooks; the replaced mask of a step is built once (at the first pruned
layer) and reused by the later layers. Under a static cache (compiled generation) only the mask
form runs: in-place pruning shortens the KV cache of the pruned layers, which a static cache
cannot hold, and attach says so at the prefill.

Composition with VAR and GIFT: methods name tokens by prompt position. In the mask form nothing
moves; in the in-place form a `SlotView` (vlmfix/core/slots.py) hands every method its rows and keys in
prompt positions (the kept slots' scores scattered to their positions, the pruned ones at
probability 0), so VAR's sink / non-sink masks and GIFT's saliency and boost maps apply unchanged
and both forms give the same result. A pruned token is no longer a sink (its phi is 0 from layer L
on) and gets no attention; GIFT takes the gaze shift of a query token whose predecessor was
pruned against the nearest earlier present token. The pruner scores the raw attention rows: in a
layer it runs before VAR and GIFT, whatever the order given to attach. A GIFT pre-pass (a boost
layer at or before a saliency layer) does not prune: saliency read there is the full prompt's.

A query row left with no key it may attend to (left padding) attends to itself, so it cannot give
NaN. While a pruner is attached, a plain forward over a prompt returns logits for the kept slots
only (generate only reads the last one); a row's last real token sits in the slot whose position
(the last stage's `SlotMap.pos`) is the row's `RowLayout.last`.

Described, with its choices and defaults, in docs/methods.md ("Token pruning and its debiasing").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from vlmfix.core.slots import SlotView
from vlmfix.core.state import SlotMap
from vlmfix.methods.base import (MethodCall, Block, CallState, EditsQueries, MethodConfig, MovesTokens, Phase, ReadsInputs, ReplacesMask, Queries,
                   Runtime, Target, check_choice, check_layers, check_number, is_int, raise_problems)
from vlmfix.methods.debias import Debias, Trend, content_size, padding_fractions, raster_positions

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter

FORMS = ("inplace", "mask")


def _take(t: torch.Tensor, pos: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather `t` (..., B or 1, P, ...) along its sequence dim at per-row positions pos (B, S)."""
    seq_dim %= t.dim()
    moved = t.movedim((seq_dim - 1, seq_dim), (0, 1))
    moved = moved.expand(pos.shape[0], *moved.shape[1:])
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
    return moved[rows, pos.to(t.device)].movedim((0, 1), (seq_dim - 1, seq_dim))


def _allowed(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """The model's mask as bool (B or 1, 1, Q, K), True = may attend (None means plain causal)."""
    if attention_mask is None:
        q = torch.arange(q_len, device=device) + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= q[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


@dataclass
class PruneStage:
    """One pruning stage: from `layer` on, batch row b keeps the image tokens at prompt positions
    `kept[b]` (`budget[b]` of them), ranked by `scores[b]` (over that row's image tokens)."""

    layer: int
    kept: list[torch.Tensor]
    budget: list[int]
    scores: list[torch.Tensor]


@dataclass
class PruneRecord:
    """What a pruner did in one call: its form, stage layers, budgets per stage and row, the stages
    run (`stages`), each row's padding fractions (or None), whether it had anything to drop, and
    `notes`: where the configured budget did not apply as written (a `keep` at or above a row's image
    tokens, a padding cap that lowered it), one line each."""

    form: str
    layers: tuple[int, ...]
    budgets: list[list[int]]
    pad_frac: list[torch.Tensor | None]
    active: bool
    stages: list[PruneStage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def kept(self, row: int = 0, stage: int = -1) -> torch.Tensor | None:
        """Prompt positions of the image tokens batch row `row` kept after `stage` (None: nothing was pruned)."""
        return self.stages[stage].kept[row] if self.stages else None


class PrunerRuntime(Runtime, MethodCall, EditsQueries, ReplacesMask, MovesTokens, ReadsInputs):
    """FastVPrune and StagedPrune bound to a model (see the module docstring)."""

    order = -1  # scores the raw attention rows, before VAR / GIFT edit them

    def __init__(self, config: "FastVPrune | StagedPrune", target: Target, layers: tuple[int, ...],
                 budget: Any, scoring: str):
        super().__init__(config, target)
        adapter = target.adapter
        self.form, self.debias, self.scoring, self._budget = config.form, config.debias, scoring, budget
        name = type(config).__name__
        implementation = adapter.text_config._attn_implementation
        if implementation not in (None, "eager", "sdpa"):
            raise ValueError(
                f"{name} needs the decoder on 'sdpa' or 'eager' attention (4-D masks), not "
                f"{implementation!r}; load the model with attn_implementation='sdpa'."
            )
        for layer in layers:
            if not 1 <= layer < adapter.num_layers:
                raise ValueError(
                    f"{name} layer {layer} is out of range: it must be in 1 .. {adapter.num_layers - 1} "
                    f"(scores come from the layer before; the model has {adapter.num_layers} decoder layers)"
                )
        adapter.check_pruning(layers, self.form)
        self.layers = layers
        self._first = min(layers)
        self._num_layers = adapter.num_layers
        self._geometry, self._background = _padding_geometry(adapter)
        #: FastV's token count (None for a ratio or a StagedPrune): the per-call notes compare it with each row's
        self._keep = config.fixed_keep if isinstance(config, FastVPrune) else None
        names = " ".join(str(getattr(c, "_name_or_path", "") or "") for c in (adapter.config, adapter.text_config))
        self.trend: Trend | None = self.debias.resolve(names, config.preset_key) if self.debias else None

    def resolved(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": list(self.layers)}
        if self._keep is not None and self.config.keep is None:
            out["keep"] = self._keep
        if self.trend is not None:
            out["trend"] = {"family": self.trend.family, **self.trend.named()}
        return out

    acts = "pruned image tokens"

    def acted(self, record: PruneRecord) -> list[bool]:
        """Rows that kept fewer image tokens after the last stage than they had."""
        if not record.stages:
            return [False] * len(record.pad_frac)
        last, first = record.stages[-1], record.stages[0]
        return [len(kept) < len(scores) for kept, scores in zip(last.kept, first.scores)]

    def check_combination(self, others: Sequence[Runtime]) -> None:
        if any(isinstance(r, PrunerRuntime) for r in others):
            raise ValueError("attach at most one pruner (FastVPrune or StagedPrune)")

    # -- per call ---------------------------------------------------------------------------------
    def start(self, state: CallState):  # TEMPORARY shim: the runtime is its own call
        self.record = self._begin(state)
        return self

    def _begin(self, state: CallState) -> PruneRecord:
        b, p = state.batch_size, state.prompt_len
        budgets = [[self._budget(s, len(r.image_positions)) for r in state.rows] for s in range(len(self.layers))]
        everything = torch.ones(b, p, dtype=torch.bool)
        self._start = SlotMap(0, torch.arange(p).expand(b, p), everything, None, everything)
        #: (key, the model's mask object, the replacement) of the last layer call; per stage, gathered positions
        self._mask: tuple[tuple, torch.Tensor | None, torch.Tensor] | None = None
        self._gathers: dict[tuple, Any] = {}
        self._views: dict[tuple, SlotView] = {}
        #: per row, each visual token's x of the position trend (per frame for a video)
        self._raster = [raster_positions(r) for r in state.rows] if self.debias is not None else []
        active = any(bud < len(r.image_positions) for stage in budgets for bud, r in zip(stage, state.rows))
        keep = self._keep
        notes = [f"row {r.index}: keep {keep} >= its {len(r.image_positions)} image tokens, so nothing is pruned "
                 "(keep counts are sized for LLaVA-1.5's 576 tokens; keep_ratio scales with the image)"
                 for r in state.rows if r.has_image and keep is not None and keep >= len(r.image_positions)]
        return PruneRecord(self.form, self.layers, budgets, [None] * b, active, notes=notes)

    def after_prefill(self, state: CallState) -> None:
        """The prompt positions still present after each stage, on the model's device, for the
        decoding steps' masks (mask form)."""
        self._alive = {m.layer: m.alive.to(state.device) for m in state.slot_maps}
        self._no_filler = {m.layer: self.form == "inplace" and bool(m.valid.all()) for m in state.slot_maps}
        self._dtype = next(self.target.adapter.decoder_layers.parameters()).dtype

    def read_inputs(self, state: CallState, inputs: dict[str, Any]) -> None:
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

    # -- scoring (layer L - 1), in prompt positions (see `view`) -----------------------------------
    def queries(self, block: Block, state: CallState) -> range | None:
        if block.phase is not Phase.PREFILL or not self.record.active or block.layer + 1 not in self.layers:
            return None
        last = state.last_range
        if self.scoring == "last":  # each batch row's last real token
            return range(last.start - block.q_start, last.stop - block.q_start)
        first, stop = state.first_after_image - block.q_start, last.stop - block.q_start
        return range(first, stop) if first < stop else None

    def edit(self, block: Block, state: CallState, rows: Queries, probs: torch.Tensor) -> torch.Tensor:
        """Score image positions: mean over heads, then over the scoring rows of each batch row (its
        last real token, or its text after the image up to that token; other methods' rows and
        padding are ignored); reads `probs`, changes nothing."""
        if block.phase is not Phase.PREFILL or block.layer + 1 not in self.layers:
            return probs
        stage = self.layers.index(block.layer + 1)
        prev = state.slot_map(block.layer) or self._start
        p = state.prompt_len
        if self.scoring == "last":
            weights = (rows.positions[None, :] == state.last_tokens()[:, None]).float()  # (B, R)
        else:
            weights = state.text_after_image(rows.positions).float()
        per_head = probs[..., :p].detach().mean(1).cpu()  # (B, R, P): the one host read of a stage
        scores = (per_head * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
        self._select(state, stage, scores * prev.alive, prev)
        return probs

    def _select(self, state: CallState, stage: int, scores: torch.Tensor, prev: SlotMap) -> None:
        rec = self.record
        alive = prev.alive.clone()
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
                    rec.notes.append(f"row {row.index}, layer {self.layers[stage]}: budget {budget} lowered to "
                                     f"{capped} by the padding cap (only {capped} candidate patches are not padding)")
                budget = capped
            budget = min(budget, len(cand))
            kept = cand[torch.topk(s, budget).indices].sort().values
            alive[row.index, cand] = False
            alive[row.index, kept] = True
            kept_rows.append(kept)
            budgets.append(budget)
        layer = self.layers[stage]
        rec.stages.append(PruneStage(layer, kept_rows, budgets, [scores[r.index, r.image_positions] for r in state.rows]))
        if self.form == "mask":
            state.slot_maps.append(SlotMap(layer, prev.pos, alive, None, alive))
            return
        keep = prev.valid & alive.gather(1, prev.pos)  # (B, S_prev): slots that stay real
        width = int(keep.sum(1).max())
        index = torch.empty(state.batch_size, width, dtype=torch.long)
        for b in range(state.batch_size):
            real = keep[b].nonzero().flatten()
            filler = (~keep[b]).nonzero().flatten()[: width - len(real)]
            index[b] = torch.cat([real, filler]).sort().values
        state.slot_maps.append(SlotMap(layer, prev.pos.gather(1, index), keep.gather(1, index), index, alive))

    # -- in-place: the view in prompt positions, and slicing the prefill inputs of layers >= L ------
    def view(self, block: Block, state: CallState) -> SlotView | None:
        if self.form != "inplace":
            return None
        m = state.slot_map(block.layer)
        if m is None:
            return None
        key = (m.layer, block.phase, block.q_len, block.kv_len)
        view = self._views.get(key)
        if view is None:
            self._views.clear()
            view = self._views[key] = SlotView(m, state.prompt_len, block.phase, block.q_len, block.kv_len)
        return view

    def moved_layers(self) -> tuple[int, ...]:
        return tuple(range(self._first, self._num_layers)) if self.form == "inplace" else ()

    def before_layer(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        m = state.slot_map(layer)
        if m is None:
            return None
        kwargs = dict(kwargs)
        if m.layer == layer:
            hidden = args[0] if args else kwargs["hidden_states"]
            index = m.index.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1])
            hidden = hidden.gather(1, index)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        full = state.prompt_len
        pe = kwargs.get("position_embeddings")
        if pe is not None and pe[0].shape[-2] == full:
            # per rotary table (Gemma 3's sliding and full layers have their own); both live through the forward
            kwargs["position_embeddings"] = self._gathered(("pe", m.layer, id(pe[0])),
                                                           lambda: tuple(_take(t, m.pos, -2) for t in pe))
        ids = kwargs.get("position_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == full:
            kwargs["position_ids"] = self._gathered(("ids", m.layer), lambda: _take(ids, m.pos, -1))
        return args, kwargs

    def _gathered(self, key: tuple, make: Any) -> Any:
        """What `make()` gives, once per stage and call (every layer of a stage gathers the same)."""
        if key not in self._gathers:
            self._gathers[key] = make()
        return self._gathers[key]

    # -- masks of layers >= L ---------------------------------------------------------------------
    def mask(self, block: Block, state: CallState, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        m = state.slot_map(block.layer)
        if m is None:
            return None
        if torch.compiler.is_compiling():  # a compiled decoding step: the mask form, from the prefill's tensors
            return self._build_mask(block, state, m, attention_mask)
        if block.phase is Phase.DECODE and block.q_len == 1 and attention_mask is None and self._no_filler[m.layer]:
            return None  # in place, every slot a real token and no padding: the lone row sees every key
        key = (m.layer, block.phase, block.q_len, block.kv_len)
        # the model's mask object itself is held (not its id, which a freed mask's successor may reuse)
        if self._mask is None or self._mask[0] != key or self._mask[1] is not attention_mask:
            self._mask = (key, attention_mask, self._build_mask(block, state, m, attention_mask))
        return self._mask[2]

    def _build_mask(self, block: Block, state: CallState, m: SlotMap,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, p = state.batch_size, state.prompt_len
        q_len, key_len = block.q_len, block.kv_len
        device = state.device if attention_mask is None else attention_mask.device
        if block.phase is Phase.DECODE and self.form == "mask":
            # the model's mask (every generated token and the prompt), less the dropped prompt tokens
            keys = torch.ones(b, key_len, dtype=torch.bool, device=device)
            keys[:, :p] = self._alive[m.layer]
            allowed = _allowed(attention_mask, q_len, key_len, device) & keys[:, None, None, :]
            return _as_mask_of(allowed, attention_mask, self._dtype)
        slots = m.pos.shape[1]
        extra = key_len - slots  # generated tokens in the cache (in-place) / beyond the prompt (mask form)
        tail = torch.arange(p, p + extra).expand(b, extra)
        kmap = torch.cat([m.pos, tail], 1)
        kvalid = torch.cat([m.valid, torch.ones(b, extra, dtype=torch.bool)], 1)
        if block.phase is Phase.PREFILL and self.form == "inplace":
            qmap, orig_q, orig_k = m.pos, p, p
        else:
            qmap, orig_q, orig_k = torch.arange(q_len).expand(b, q_len), q_len, p + extra
        allowed = _allowed(attention_mask, orig_q, orig_k, device).expand(b, -1, -1, -1)
        rows = torch.arange(b, device=device)[:, None, None]
        new = allowed[rows, 0, qmap[:, :, None].to(device), kmap[:, None, :].to(device)]  # (B, Q, K)
        new = new & kvalid[:, None, :].to(device)
        if block.phase is not Phase.DECODE:  # a prompt row left with no key (left padding) attends to itself
            empty = ~new.any(-1)  # (B, Q)
            if bool(empty.any()):
                own = torch.arange(q_len, device=device) + (key_len - q_len)
                new[empty] = torch.nn.functional.one_hot(own, key_len).bool()[None].expand(b, -1, -1)[empty]
        return _as_mask_of(new[:, None], attention_mask, self._dtype if block.phase is Phase.DECODE else None)


def _as_mask_of(allowed: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`allowed` (bool, True = attend) in the form of the model's mask `like`: additive when it is float,
    or when `dtype` is given (a decoding step's mask, built once per step: SDPA on a CPU would otherwise
    convert a bool mask in every layer)."""
    if like is not None and like.dtype.is_floating_point:
        dtype = like.dtype
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


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

    layer: int = 2
    keep: int | None = None
    keep_ratio: float | None = None
    debias: Debias | None = None
    form: str = "inplace"

    name = "fastv"
    preset_key: ClassVar[str] = "fastv"  # the trend presets' pruner name
    default_keep: ClassVar[int] = 128

    def __post_init__(self) -> None:
        keep, ratio = self.keep, self.keep_ratio
        raise_problems("FastVPrune", [
            f"layer must be an int, got {self.layer!r}" if not is_int(self.layer) else None if self.layer >= 1 else
            f"layer {self.layer} is out of range: it must be >= 1 (scores come from the layer before)",
            None if keep is None or is_int(keep) and keep > 0 else
            f"keep must be a positive number of tokens (an int), got {keep!r}",
            None if ratio is None else check_number("keep_ratio", ratio, 0.0, 1.0, lo_open=True),
            None if keep is None or ratio is None else
            f"takes keep or keep_ratio, not both (got keep={keep!r}, keep_ratio={ratio!r}); set the other to None",
            *_pruner_problems(self),
        ])

    def stage_layers(self) -> tuple[int, ...]:
        return (int(self.layer),)

    @property
    def fixed_keep(self) -> Any:
        """The image tokens kept per row when no `keep_ratio` is given (`keep`, else `default_keep`), else None."""
        return None if self.keep_ratio is not None else (self.default_keep if self.keep is None else self.keep)

    def bind(self, target: Target) -> PrunerRuntime:
        ratio = self.keep_ratio
        if ratio is not None:
            def budget(stage: int, n: int) -> int:
                return min(n, max(1, math.ceil(ratio * n - 1e-9)))
        else:
            keep = self.fixed_keep

            def budget(stage: int, n: int) -> int:
                return min(n, int(keep))
        return PrunerRuntime(self, target, self.stage_layers(), budget, "last")


@dataclass
class StagedPrune(MethodConfig):
    """Multi-stage pruning (PyramidDrop-style): at each of `layers`, keep `keep_ratios` (of the
    image's tokens, strictly decreasing) ranked by the mean attention of the text after the image.

    layers: a non-empty, strictly increasing list of ints >= 1; keep_ratios: one number in (0, 1] per
    layer; debias and form as FastVPrune's. Every mistake is refused at construction; a layer beyond
    the model's depth when attach binds it."""

    layers: Sequence[int] = (2, 10, 20)
    keep_ratios: Sequence[float] = (0.32, 0.16, 0.08)
    debias: Debias | None = None
    form: str = "inplace"

    name = "staged"
    preset_key: ClassVar[str] = "staged"

    def __post_init__(self) -> None:
        layers, ratios = self.layers, self.keep_ratios
        problems = [check_layers("layers", layers, lo=1), *_pruner_problems(self)]
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

    def bind(self, target: Target) -> PrunerRuntime:
        layers, ratios = self.stage_layers(), tuple(float(r) for r in self.keep_ratios)

        def budget(stage: int, n: int) -> int:
            return min(n, max(1, math.ceil(ratios[stage] * n - 1e-9)))
        return PrunerRuntime(self, target, layers, budget, "text")


PRUNERS = (FastVPrune, StagedPrune)


def prune_record(state: CallState) -> PruneRecord:
    """The record of the pruner attached in the call of `state`."""
    for cls in PRUNERS:
        if state.has_record(cls):
            return state.record(cls)
    raise ValueError("no pruner was attached in this call")


def kept_tokens(state: CallState, row: int = 0, stage: int = -1) -> torch.Tensor:
    """Original positions of the image tokens batch row `row` kept after `stage` (all when no pruning ran)."""
    kept = prune_record(state).kept(row, stage)
    return state.rows[row].image_positions if kept is None else kept


__all__ = ["FastVPrune", "PruneRecord", "PruneStage", "StagedPrune", "kept_tokens", "prune_record"]


PrunerRuntime.call = PrunerRuntime  # TEMPORARY shim
from vlmfix.methods.registry import register_method  # noqa: E402  TEMPORARY shim

register_method(name="fastv", config=FastVPrune, runtime=PrunerRuntime)
register_method(name="staged", config=StagedPrune, runtime=PrunerRuntime)
