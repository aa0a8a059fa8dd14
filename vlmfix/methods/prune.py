"""Attention-based visual token pruning: FastV and multi-stage (PyramidDrop-style); specs/pruning.md.

One scoring path for both: at each stage layer L, the image tokens still present are scored by the
attention they receive at layer L - 1 (fp32 eager rows, averaged over heads): FastV from the last
prompt token, multi-stage from the mean over the text query rows after the image. The top tokens
(optionally after `Debias`) are kept and the rest dropped from layer L on.

Forms:
- "inplace": dropped tokens leave the hidden states at layer L (a forward pre-hook slices them),
  so the KV cache of layers >= L is shorter; the rotary (cos, sin) and `position_ids` given to
  every layer >= L are gathered to the kept slots, so kept tokens keep their original positions.
  The attention mask of those layers is rebuilt over the kept slots from the model's own mask.
  Batch rows may keep different numbers of tokens: shorter rows are filled with dropped tokens
  that stay masked as keys.
- "mask": nothing is removed; dropped tokens are masked out as keys from layer L on (reference).
Each stage is recorded as a `SlotMap` in `CallState.slot_maps` (slot -> original position, and
the positions still present).

Composition with VAR and GIFT: methods name tokens by prompt position. In the mask form nothing
moves; in the in-place form a `SlotView` (vlmfix/slots.py) hands every method its rows and keys in
prompt positions (the kept slots' scores scattered to their positions, the pruned ones at
probability 0), so VAR's sink / non-sink masks and GIFT's saliency and boost maps apply unchanged
and both forms give the same result. A pruned token is no longer a sink (its phi is 0 from layer L
on) and gets no attention; GIFT takes the gaze shift of a query token whose predecessor was
pruned against the nearest earlier present token. The pruner scores the raw attention rows: in a
layer it runs before VAR and GIFT, whatever the order given to attach. A GIFT pre-pass (a boost
layer at or before a saliency layer) does not prune: saliency read there is the full prompt's.

A query row left with no key it may attend to (left padding) attends to itself, so it cannot give
NaN. While a pruner is attached, a plain forward over a prompt returns logits for the kept slots
only (generate only reads the last one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from ..slots import SlotView
from ..state import CallState, SlotMap
from .base import Method
from .debias import Debias, Trend, content_size, padding_fractions

if TYPE_CHECKING:
    from ..adapters import Adapter

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


class _Pruner(Method):
    """Shared machinery of FastVPrune and StagedPrune (see the module docstring)."""

    name: ClassVar[str] = "prune"
    order: ClassVar[int] = -1  # scores the raw attention rows, before VAR / GIFT edit them
    scoring: ClassVar[str] = "last"  # "last": last prompt token; "text": text rows after the image

    debias: Debias | None
    form: str

    def __post_init__(self) -> None:
        if isinstance(self.debias, dict):  # from a YAML preset
            self.debias = Debias(**self.debias)

    # -- configuration ----------------------------------------------------------------------------
    def _stage_layers(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _budget(self, stage: int, n: int) -> int:
        raise NotImplementedError

    def _check_common(self, adapter: "Adapter") -> None:
        if self.form not in FORMS:
            raise ValueError(f"{type(self).__name__} form must be one of {FORMS}, got {self.form!r}")
        if self.debias is not None and not isinstance(self.debias, Debias):
            raise TypeError(f"{type(self).__name__} debias must be a vlmfix.Debias or None")
        implementation = adapter.text_config._attn_implementation
        if implementation not in (None, "eager", "sdpa"):
            raise ValueError(
                f"{type(self).__name__} needs the decoder on 'sdpa' or 'eager' attention (4-D masks), not "
                f"{implementation!r}; load the model with attn_implementation='sdpa'."
            )
        for layer in self._stage_layers():
            if not 1 <= layer < adapter.num_layers:
                raise ValueError(
                    f"{type(self).__name__} layer {layer} is out of range: it must be in 1 .. {adapter.num_layers - 1} "
                    f"(scores come from the layer before; the model has {adapter.num_layers} decoder layers)"
                )
        self._layers = self._stage_layers()
        self._first = min(self._layers)
        self._num_layers = adapter.num_layers
        self._geometry, self._background = _padding_geometry(adapter)
        names = " ".join(str(getattr(c, "_name_or_path", "") or "") for c in (adapter.config, adapter.text_config))
        self._trend: Trend | None = self.debias.resolve(names, self.preset_key) if self.debias else None

    @property
    def preset_key(self) -> str:
        return "fastv" if self.scoring == "last" else "staged"

    def check_combination(self, methods: Sequence[Method]) -> None:
        if any(isinstance(m, _Pruner) for m in methods if m is not self):
            raise ValueError("attach at most one pruner (FastVPrune or StagedPrune)")

    # -- per call ---------------------------------------------------------------------------------
    def _rec(self, state: CallState) -> dict[str, Any]:
        return state.records[self.name]

    def on_prefill(self, state: CallState) -> None:
        b, p = state.batch_size, state.prompt_len
        budgets = [[self._budget(s, len(r.image_positions)) for r in state.rows] for s in range(len(self._layers))]
        everything = torch.ones(b, p, dtype=torch.bool)
        state.records[self.name] = {
            "form": self.form,
            "layers": self._layers,
            "stages": [],  # per stage: {"layer", "kept": [original positions per row], "budget", "scores"}
            "budgets": budgets,
            "pad_frac": [None] * b,
            "active": any(bud < len(r.image_positions) for stage in budgets for bud, r in zip(stage, state.rows)),
            "masks": {},
            "views": {},
            "start": SlotMap(0, torch.arange(p).expand(b, p), everything, None, everything),
        }

    def on_inputs(self, state: CallState, inputs: dict[str, Any]) -> None:
        rec = self._rec(state)
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
            rec["pad_frac"][row.index] = frac
            if bool((frac > self.debias.padding_threshold).any()):
                rec["active"] = True

    # -- scoring (layer L - 1), in prompt positions (see `view`) -----------------------------------
    def eager_rows(self, state: CallState, layer: int, q_start: int, q_len: int) -> torch.Tensor | None:
        rec = self._rec(state)
        if state.phase != "prefill" or not rec["active"] or layer + 1 not in self._layers:
            return None
        if self.scoring == "last":
            return torch.tensor([q_len - 1])
        first = min(r.after_image for r in state.rows if r.has_image) - q_start
        return torch.arange(first, q_len) if first < q_len else None

    def probs(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Score image positions: mean over heads, then over the scoring rows of each batch row (the
        last prompt token, or the text after that row's image; other methods' rows are ignored);
        reads `probs`, changes nothing."""
        rec = self._rec(state)
        if state.phase != "prefill" or layer + 1 not in self._layers:
            return probs
        stage = self._layers.index(layer + 1)
        prev = state.slot_map(layer) or rec["start"]
        p = state.prompt_len
        if self.scoring == "last":
            start = torch.full((state.batch_size,), p - 1)
        else:
            start = torch.tensor([r.after_image if r.has_image else p for r in state.rows])
        weights = (positions.cpu()[None, :] >= start[:, None]).float()  # (B, R)
        per_head = probs[..., :p].mean(1).cpu()  # (B, R, P)
        scores = (per_head * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
        self._select(state, stage, scores * prev.alive, prev)
        return probs

    def _select(self, state: CallState, stage: int, scores: torch.Tensor, prev: SlotMap) -> None:
        rec = self._rec(state)
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
            budget = rec["budgets"][stage][row.index]
            if self.debias is not None:
                x = index.double() / max(len(img) - 1, 1)
                frac = rec["pad_frac"][row.index]
                s, content = self.debias.transform(s, x, None if frac is None else frac[index], self._trend)
                budget = min(budget, max(int(content.sum()), 1))
            budget = min(budget, len(cand))
            kept = cand[torch.topk(s, budget).indices].sort().values
            alive[row.index, cand] = False
            alive[row.index, kept] = True
            kept_rows.append(kept)
            budgets.append(budget)
        rec["stages"].append({"layer": self._layers[stage], "kept": kept_rows, "budget": budgets,
                              "scores": [scores[r.index, r.image_positions] for r in state.rows]})
        layer = self._layers[stage]
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
    def view(self, state: CallState, layer: int, q_len: int, kv_len: int) -> SlotView | None:
        if self.form != "inplace":
            return None
        m = state.slot_map(layer)
        if m is None:
            return None
        cache = self._rec(state)["views"]
        key = (m.layer, state.phase, state.step, q_len, kv_len)
        if key not in cache:
            cache.clear()
            cache[key] = SlotView(m, state.prompt_len, state.phase, q_len, kv_len)
        return cache[key]

    def hooked_layers(self) -> tuple[int, ...]:
        return tuple(range(self._first, self._num_layers)) if self.form == "inplace" else ()

    def before_layer(self, state: CallState, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
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
            kwargs["position_embeddings"] = tuple(_take(t, m.pos, -2) for t in pe)
        ids = kwargs.get("position_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == full:
            kwargs["position_ids"] = _take(ids, m.pos, -1)
        return args, kwargs

    # -- masks of layers >= L ---------------------------------------------------------------------
    def mask(self, state: CallState, layer: int, q_start: int, q_len: int, key_len: int,
             attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        m = state.slot_map(layer)
        if m is None:
            return None
        cache = self._rec(state)["masks"]
        key = (m.layer, state.phase, state.step, q_len, key_len)
        # the model's mask object itself is held (not its id, which a freed mask's successor may reuse)
        if cache.get("key") != key or cache.get("source") is not attention_mask:
            cache.update(key=key, source=attention_mask,
                         mask=self._build_mask(state, m, q_start, q_len, key_len, attention_mask, device))
        return cache["mask"]

    def _build_mask(self, state: CallState, m: SlotMap, q_start: int, q_len: int, key_len: int,
                    attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        b, p = state.batch_size, state.prompt_len
        slots = m.pos.shape[1]
        extra = key_len - slots  # generated tokens in the cache (in-place) / beyond the prompt (mask form)
        tail = torch.arange(p, p + extra).expand(b, extra)
        kmap = torch.cat([m.pos, tail], 1)
        kvalid = torch.cat([m.valid, torch.ones(b, extra, dtype=torch.bool)], 1)
        if state.phase == "prefill" and self.form == "inplace":
            qmap, orig_q, orig_k = m.pos, p, p
        else:
            qmap, orig_q, orig_k = torch.arange(q_len).expand(b, q_len), q_len, p + extra
        allowed = _allowed(attention_mask, orig_q, orig_k, device).expand(b, -1, -1, -1)
        rows = torch.arange(b, device=device)[:, None, None]
        new = allowed[rows, 0, qmap[:, :, None].to(device), kmap[:, None, :].to(device)]  # (B, Q, K)
        new = new & kvalid[:, None, :].to(device)
        empty = ~new.any(-1)  # (B, Q): let such rows attend to themselves
        if bool(empty.any()):
            own = torch.arange(q_len, device=device) + q_start
            new[empty] = torch.nn.functional.one_hot(own, key_len).bool()[None].expand(b, -1, -1)[empty]
        new = new[:, None]
        if attention_mask is not None and attention_mask.dtype.is_floating_point:
            dtype = attention_mask.dtype
            return torch.zeros(new.shape, dtype=dtype, device=device).masked_fill_(~new, torch.finfo(dtype).min)
        return new


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


def _check_ratio(owner: str, ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{owner} keep ratio must be in (0, 1], got {ratio}")


@dataclass
class FastVPrune(_Pruner):
    """FastV (paper: layer 2; budgets of 64 / 128 / 192 of LLaVA-1.5's 576).

    - layer: K; tokens are scored at layer K - 1 by the last prompt token and dropped from K on;
    - keep: image tokens kept per image row (128 when neither keep nor keep_ratio is given); or
      keep_ratio in (0, 1], the share of each row's image tokens (not both);
    - debias: a `Debias()` or None; form: "inplace" (speed) or "mask" (reference).
    """

    layer: int = 2
    keep: int | None = None
    keep_ratio: float | None = None
    debias: Debias | None = None
    form: str = "inplace"

    name: ClassVar[str] = "prune"
    default_keep: ClassVar[int] = 128
    scoring: ClassVar[str] = "last"

    def _stage_layers(self) -> tuple[int, ...]:
        return (int(self.layer),)

    def validate(self, adapter: "Adapter") -> None:
        if self.keep_ratio is not None:
            if self.keep is not None:
                raise ValueError(f"FastVPrune takes keep or keep_ratio, not both (got keep={self.keep}, "
                                 f"keep_ratio={self.keep_ratio}); set the other to None")
            _check_ratio("FastVPrune", self.keep_ratio)
            return self._check_common(adapter)
        if self.keep is None:
            self.keep = self.default_keep  # resolved at attach, as GIFT resolves its layers
        if isinstance(self.keep, bool) or int(self.keep) != self.keep or self.keep <= 0:
            raise ValueError(f"FastVPrune keep must be a positive number of tokens, got {self.keep!r}")
        self._check_common(adapter)

    def _budget(self, stage: int, n: int) -> int:
        if self.keep_ratio is not None:
            return min(n, max(1, math.ceil(self.keep_ratio * n - 1e-9)))
        return min(n, int(self.keep))


@dataclass
class StagedPrune(_Pruner):
    """Multi-stage pruning (PyramidDrop-style): at each of `layers`, keep `keep_ratios` (of the
    image's tokens, strictly decreasing) ranked by the mean attention of the text after the image."""

    layers: Sequence[int] = (2, 10, 20)
    keep_ratios: Sequence[float] = (0.32, 0.16, 0.08)
    debias: Debias | None = None
    form: str = "inplace"

    name: ClassVar[str] = "prune"
    scoring: ClassVar[str] = "text"

    def _stage_layers(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.layers)

    def validate(self, adapter: "Adapter") -> None:
        layers, ratios = self._stage_layers(), tuple(float(r) for r in self.keep_ratios)
        if not layers or len(layers) != len(ratios):
            raise ValueError(f"StagedPrune needs one keep ratio per layer, got layers {layers} and ratios {ratios}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"StagedPrune layers must be strictly increasing, got {layers}")
        for r in ratios:
            _check_ratio("StagedPrune", r)
        if any(b >= a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"StagedPrune keep_ratios must be strictly decreasing, got {ratios}")
        self._ratios = ratios
        self._check_common(adapter)

    def _budget(self, stage: int, n: int) -> int:
        return min(n, max(1, math.ceil(self._ratios[stage] * n - 1e-9)))


def kept_tokens(state: CallState, row: int = 0, stage: int = -1) -> torch.Tensor:
    """Original positions of the image tokens batch row `row` kept after `stage` (all when no pruning ran)."""
    rec = state.records.get(_Pruner.name)
    if rec is None:
        raise ValueError("no pruner was attached in this call")
    if not rec["stages"]:
        return state.rows[row].image_positions
    return rec["stages"][stage]["kept"][row]


__all__ = ["FastVPrune", "StagedPrune", "kept_tokens"]
