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

A query row left with no key it may attend to (left padding) attends to itself, so it cannot give
NaN. While a pruner is attached, a plain forward over a prompt returns logits for the kept slots
only (generate only reads the last one). Pruning cannot yet be combined with VAR or GIFT (their
indices would have to follow the kept tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from ..state import CallState
from .base import Method
from .debias import Debias, Trend, content_size, padding_fractions

if TYPE_CHECKING:
    from ..adapters import Adapter

FORMS = ("inplace", "mask")


@dataclass
class _Map:
    """After a stage: for each batch row, the original position of every slot (pos), whether that
    slot may be attended as a key (valid), the gather index into the previous stage's slots (index),
    and which original positions are still present (alive, (B, prompt_len))."""

    layer: int
    pos: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor | None
    alive: torch.Tensor


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
        others = [m for m in methods if m is not self]
        if any(isinstance(m, _Pruner) for m in others):
            raise ValueError("attach at most one pruner (FastVPrune or StagedPrune)")
        clash = [type(m).__name__ for m in others if m.name in ("var", "gift")]
        if clash:
            raise ValueError(
                f"{type(self).__name__} cannot be combined with {', '.join(clash)} yet: their token indices do not "
                "follow the pruned tokens. Attach them separately."
            )

    # -- per call ---------------------------------------------------------------------------------
    def _rec(self, state: CallState) -> dict[str, Any]:
        return state.records[self.name]

    def on_prefill(self, state: CallState) -> None:
        b, p = state.batch_size, state.prompt_len
        budgets = [[self._budget(s, len(r.image_positions)) for r in state.rows] for s in range(len(self._layers))]
        state.records[self.name] = {
            "form": self.form,
            "layers": self._layers,
            "stages": [],  # per stage: {"layer", "kept": [original positions per row], "budget", "scores"}
            "budgets": budgets,
            "pad_frac": [None] * b,
            "active": any(bud < len(r.image_positions) for stage in budgets for bud, r in zip(stage, state.rows)),
            "maps": [],
            "masks": {},
            "start": _Map(0, torch.arange(p).expand(b, p), torch.ones(b, p, dtype=torch.bool), None,
                          torch.ones(b, p, dtype=torch.bool)),
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

    def _current(self, state: CallState, layer: int) -> _Map | None:
        """The slot map that applies at `layer` (None before the first stage or when inactive)."""
        rec = self._rec(state)
        if not rec["active"]:
            return None
        current = None
        for m in rec["maps"]:
            if m.layer <= layer:
                current = m
        return current

    # -- scoring (layer L - 1) --------------------------------------------------------------------
    def eager_rows(self, state: CallState, layer: int, q_start: int, q_len: int) -> torch.Tensor | None:
        rec = self._rec(state)
        if state.phase != "prefill" or not rec["active"] or layer + 1 not in self._layers:
            return None
        if self.scoring == "last":
            return torch.tensor([q_len - 1])
        pos = (self._current(state, layer) or rec["start"]).pos
        after = [r.after_image for r in state.rows if r.has_image]
        rows = (pos >= min(after)).any(0).nonzero().flatten()
        return rows if len(rows) else None

    def probs(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        rec = self._rec(state)
        if state.phase != "prefill" or layer + 1 not in self._layers:
            return probs
        stage = self._layers.index(layer + 1)
        prev = self._current(state, layer) or rec["start"]
        b = probs.shape[0]
        if self.scoring == "last":
            weights = torch.ones(b, len(positions))
        else:
            after = torch.tensor([r.after_image if r.has_image else state.prompt_len for r in state.rows])
            weights = (prev.pos[:, positions.cpu()] >= after[:, None]).float()
        per_head = probs.mean(1).cpu()  # (B, R, K)
        slot_scores = (per_head * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
        scores = torch.zeros(b, state.prompt_len)
        keys = slot_scores.shape[1]
        scores.scatter_(1, prev.pos[:, :keys], slot_scores * prev.valid[:, :keys])
        self._select(state, stage, scores, prev)
        return probs

    def _select(self, state: CallState, stage: int, scores: torch.Tensor, prev: _Map) -> None:
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
            rec["maps"].append(_Map(layer, prev.pos, alive, None, alive))
            return
        keep = prev.valid & alive.gather(1, prev.pos)  # (B, S_prev): slots that stay real
        width = int(keep.sum(1).max())
        index = torch.empty(state.batch_size, width, dtype=torch.long)
        for b in range(state.batch_size):
            real = keep[b].nonzero().flatten()
            filler = (~keep[b]).nonzero().flatten()[: width - len(real)]
            index[b] = torch.cat([real, filler]).sort().values
        rec["maps"].append(_Map(layer, prev.pos.gather(1, index), keep.gather(1, index), index, alive))

    # -- in-place: slicing the prefill inputs of layers >= L ---------------------------------------
    def hooked_layers(self) -> tuple[int, ...]:
        return tuple(range(self._first, self._num_layers)) if self.form == "inplace" else ()

    def before_layer(self, state: CallState, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        m = self._current(state, layer)
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
             attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        m = self._current(state, layer)
        if m is None:
            return None
        cache = self._rec(state)["masks"]
        key = (m.layer, state.phase, state.step, q_len, key_len, id(attention_mask))
        if key not in cache:
            cache.clear()
            cache[key] = self._build_mask(state, m, q_start, q_len, key_len, attention_mask)
        return cache[key]

    def _build_mask(self, state: CallState, m: _Map, q_start: int, q_len: int, key_len: int,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, p = state.batch_size, state.prompt_len
        device = attention_mask.device if attention_mask is not None else torch.device("cpu")
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
        rows = torch.arange(b)[:, None, None]
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
    - keep: image tokens kept per image row; or keep_ratio in (0, 1] (then keep must be None);
    - debias: a `Debias()` or None; form: "inplace" (speed) or "mask" (reference).
    """

    layer: int = 2
    keep: int | None = 128
    keep_ratio: float | None = None
    debias: Debias | None = None
    form: str = "inplace"

    name: ClassVar[str] = "prune"
    scoring: ClassVar[str] = "last"

    def _stage_layers(self) -> tuple[int, ...]:
        return (int(self.layer),)

    def validate(self, adapter: "Adapter") -> None:
        if self.keep_ratio is not None:
            if self.keep is not None and self.keep != FastVPrune.keep:
                raise ValueError("FastVPrune takes keep or keep_ratio, not both")
            self.keep = None
            _check_ratio("FastVPrune", self.keep_ratio)
        elif self.keep is None or int(self.keep) <= 0:
            raise ValueError(f"FastVPrune keep must be a positive number of tokens, got {self.keep}")
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
