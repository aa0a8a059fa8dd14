"""VAR: Visual Attention Redistribution (Kang et al., "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025).

For one batch row, layer l, query head h and query row i, with post-softmax fp32 attention A,
image positions I, sinks S_l (phi > tau over the prompt), visual sinks V_l = S_l & I and visual
non-sinks N_l = I \\ V_l:

- image-centric iff V_l is not empty, r = 1 - sum_V A / (sum_I A + 1e-6) >= rho and
  m = sum_I A >= m_min;
- then, with p the fraction of sink attention moved (the paper's semantics):
  A'_j = (1 - p) A_j for j in the source set (S_l, or V_l with sources="visual"),
  Omega = p * sum_{sources} A, and A'_j = A_j + Omega * A_j / sum_N A for j in N_l;
  nothing moves when sum_N A = 0 (in fp32: below the smallest normal number, 1.2e-38, where the
  ratio Omega / sum_N A could overflow). Rows still sum to 1.

Applies in layers FIRST_SINK_LAYER (2) .. L-2 (or `layers`), on prefill rows from the first token after the last
image token to the row's last real token (right padding is left alone), and on every decoding step.

Cost: the sets become, per layer and once per call, two small matrices over the prompt positions
(`VARRuntime._prepare`), so that selecting and redistributing every (head, row) pair of a layer
call is two batched products and a few element-wise ops, with no Python loop and no host read. The released reference code
multiplies sinks by p and moves 1 - p (its "p = 0.6" moves 40%); vlmfix follows the paper.

Described, with its choices and defaults, in docs/methods.md ("VAR").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from vlmfix.methods.base import (FIRST_SINK_LAYER, Block, Buffers, CallState, EditsQueries, HeatMaps, MethodCall,
                                 MethodConfig, Phase, Queries, Record, Runtime, Target, check_choice, check_layers,
                                 check_number, check_tau_field, model_layers, raise_problems)
from vlmfix.methods.registry import register_method

#: the smallest normal fp32 number: a pair's visual non-sinks must hold at least this much attention, so that
#: sum_sources A / sum_N A (<= 1 / TINY) and every product with it stay finite in fp32
TINY = float(torch.finfo(torch.float32).smallest_normal)


@dataclass
class VAR(MethodConfig):
    """Visual attention redistribution (paper defaults: tau 20, rho 0.5, p 0.6, m_min 0.2).

    - tau: sink threshold on phi (number, "scaled", "bos:F"; None = the one attach resolved for
      the model, i.e. its preset);
    - rho: minimum visual non-sink ratio of an image-centric head (0.5 hallucination benchmarks,
      0.8 general tasks, 0.9 vision-centric tasks);
    - p: fraction of the sinks' attention moved to the visual non-sinks;
    - m_min: minimum attention mass on the image of an image-centric head;
    - sources: "all" (text and visual sinks give attention, the paper) or "visual" (visual only);
    - layers: the layers it acts in (default 2 .. L-2), a non-empty list of ints.

    rho, p and m_min are finite numbers in [0, 1]; every mistake is refused at construction, a
    layer beyond the model's depth when attach binds the config.
    """

    tau: float | str | None = 20.0
    rho: float = 0.5
    p: float = 0.6
    m_min: float = 0.2
    sources: str = "all"
    layers: Sequence[int] | None = None


    def __post_init__(self) -> None:
        raise_problems("VAR", [
            check_tau_field("tau", self.tau),
            *(check_number(f, getattr(self, f), 0.0, 1.0) for f in ("rho", "p", "m_min")),
            check_choice("sources", self.sources, ("all", "visual")),
            None if self.layers is None else check_layers("layers", self.layers),
        ])

    @staticmethod
    def summary(state: CallState, index: int | None = None) -> dict[int, dict[str, list]]:
        """`VARRecord.summary` of the VAR attached in the call of `state` ({} when none was)."""
        return state.record(VAR, index).summary() if state.has_record(VAR) else {}

    @staticmethod
    def why_unchanged(state: CallState, index: int | None = None, tau_hint: str = "attach(..., tau=...)",
                      dims_hint: str = "attach(..., sink_dims=[...])") -> str:
        """`VARRecord.why_unchanged` of the VAR attached in the call of `state`, over the whole batch."""
        if not state.has_record(VAR):
            return "VAR was not attached in this call"
        return state.record(VAR, index).why_unchanged(None, tau_hint, dims_hint)


@dataclass
class VARRecord(Record):
    """What VAR did in one call, per VAR layer (`layers`, in order): the visual sinks V_l per batch
    row (`visual`, (n, B, P) bool), the image-centric (head, row) pairs it edited (`pairs`, (n, B)),
    and, summed over those pairs (heads, rows and decoding steps), sum_S A / sum_N A x A_j on the
    visual non-sinks j in N_l (`gain`, (n, B, P), 0 elsewhere; the decoding step sums it over every
    position into `summed`, one product, and `nonsink` = [j in N_l] keeps its visual non-sinks, where
    it is finite); with `weight` = p [j in N_l] that makes the attention each position received,
    `received` = gain x weight (the sum over positions is the attention mass moved). The tensors never
    require grad."""

    layers: tuple[int, ...]
    visual: torch.Tensor
    pairs: torch.Tensor
    summed: torch.Tensor
    weight: torch.Tensor
    nonsink: torch.Tensor
    frozen: bool = field(default=False, repr=False)
    #: the call's state (sink dims, tau and phi, for `why_unchanged`)
    state: CallState | None = field(default=None, repr=False, compare=False)

    acts: ClassVar[str] = "moved attention"

    @property
    def gain(self) -> torch.Tensor:
        return torch.where(self.nonsink > 0, self.summed, 0.0)

    @property
    def received(self) -> torch.Tensor:
        return self.gain * self.weight

    def freeze(self) -> None:
        """Copy the tensors out of the runtime's buffers (before a next call reuses them)."""
        if not self.frozen:
            self.visual, self.pairs, self.summed, self.weight, self.nonsink = (
                t.clone() for t in (self.visual, self.pairs, self.summed, self.weight, self.nonsink))
            self.frozen = True

    def summary(self) -> dict[int, dict[str, list]]:
        """Per layer: visual sinks per row, attention mass moved per row (= received by the visual
        non-sinks), image-centric (head, row) pairs per row."""
        visual, pairs, moved = self.visual.sum(-1).cpu(), self.pairs.cpu(), self.received.sum(-1).cpu()
        return {layer: {"visual_sinks": visual[k].long().tolist(), "moved": moved[k].tolist(),
                        "image_centric": pairs[k].long().tolist()} for k, layer in enumerate(self.layers)}

    def moved_map(self, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention received (B, P), visual sinks (B, P) bool) at `layer`, or summed / united over layers."""
        ks = [self.layers.index(layer)] if layer is not None else list(range(len(self.layers)))
        return self.received[ks].sum(0).cpu(), self.visual[ks].any(0).cpu()

    # -- the record protocol ------------------------------------------------------------------------
    def acted(self) -> list[bool]:
        """Rows where some attention moved to the visual non-sinks (in any layer, prefill or decoding)."""
        return (self.received.sum((0, 2)) > 0).tolist()

    def row(self, row: int) -> dict[str, Any]:
        """The attention mass moved in batch row `row`, summed over layers (1 = one head's whole row)."""
        return {"moved": float(sum(self.received.sum(-1)[:, row].tolist()))}  # summary()'s sums, added up

    def notes(self, row: int) -> list[str]:
        why = self.why_unchanged(row)
        return [f"VAR moved no attention: {why}"] if why else []

    def why_unchanged(self, row: int | None = None, tau_hint: str = "attach(..., tau=...)",
                      dims_hint: str = "attach(..., sink_dims=[...])") -> str:
        """Why VAR moved no attention (in batch row `row`, or in the whole call), in words ('' when it moved some);
        `tau_hint` and `dims_hint` say how the caller sets tau and the sink dims (a command names its flags)."""
        received = self.received if row is None else self.received[:, row]
        if float(received.sum()) > 0:
            return ""
        state = self.state
        if state is None or not state.sink_dims:
            return ("no sink dimensions (none in a preset, none found by discovery, none given), so phi is 0 "
                    f"everywhere; pass {dims_hint}")
        rows = state.rows if row is None else [state.rows[row]]
        visual = self.visual if row is None else self.visual[:, row]
        if not any(r.has_image for r in rows):
            return "no image in the prompt"
        if not bool(visual.any()):
            tau = state.tau if isinstance(state.tau, str) else f"{state.tau:.2f}"
            top = max((float(state.phi[k][r.index, r.image_positions].max()) for k in self.layers if k in state.phi
                       for r in rows if r.has_image), default=float("nan"))
            return (f"no visual sinks at tau={tau} in layers {self.layers[0]}-{self.layers[-1]}: the largest image "
                    f"phi is {top:.1f}; a lower tau ({tau_hint}) finds some")
        return ("no image-centric head: in every head with visual sinks, the visual non-sinks held less than rho "
                "of the image attention or the image less than m_min of the row (see the record's summary per layer)")

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        """`sinks.png` (phi at the layer with the most visual sinks in the batch row drawn, else the middle VAR layer) and
        `var_moved.png` (the attention VAR moved onto each patch, over every layer) when it moved some."""
        counts = self.visual[:, maps.row].sum(-1).tolist()
        layer = self.layers[max(range(len(counts)), key=lambda k: (counts[k], -k))] if max(counts) > 0 \
            else self.layers[len(self.layers) // 2]
        lines = [f"heat map, sink scores (layer {layer}): {maps.sinks('sinks.png', layer)}"]
        why = self.why_unchanged(maps.row, **maps.hints)
        if why:
            return lines + [f"VAR moved no attention: {why}; so no var_moved.png"]
        gain, visual = self.moved_map()
        where = f"layers {self.layers[0]}-{self.layers[-1]}"
        caption = ["total moved onto this grid: {total:.2f} attention rows (1 = all of one head's attention for one "
                   "query token), summed over heads, query rows and decoding steps"]
        path = maps.grid("var_moved.png", gain, f"Attention VAR moved onto each patch, {where}", vmin=0.0,
                         marked=visual, bar="attention received (attention rows)",
                         legend=[("outline", "white outline: visual sink it took attention from")], caption=caption)
        return lines + [f"heat map, attention moved by VAR: {path}"]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "layers": list(self.layers), "summary": self.summary(),
                "moved": [self.row(r)["moved"] for r in range(self.pairs.shape[1])]}


class VARCall(MethodCall, EditsQueries):
    """One call of VAR: the layers' matrices over the prompt (built once per layer at the prefill) and the record."""

    record: VARRecord
    record_type = VARRecord

    def __init__(self, runtime: "VARRuntime", state: CallState):
        self.layers, self._index, self.config = runtime.layers, runtime._index, runtime.config
        self.tau, self._constants = runtime.tau, runtime.constants
        buffers = runtime._buffers
        n, b, p, dev = len(self.layers), state.batch_size, state.prompt_len, state.device
        self._first = state.first_after_image
        self._prepared: set[int] = set()
        self._row_ok: dict[tuple, torch.Tensor] = {}
        #: per layer: rows [T, image I, non-sinks N, sources] (4, P) and update rows [-p sources, p N] (2, P)
        self._columns = buffers.zeros("columns", (n, b, 4, p), torch.float32, dev)
        self._update = buffers.zeros("update", (n, b, 2, p), torch.float32, dev)
        record = VARRecord(self.layers, buffers.zeros("visual", (n, b, p), torch.bool, dev),
                           buffers.zeros("pairs", (n, b), torch.float32, dev),
                           buffers.zeros("gain", (n, b, p), torch.float32, dev), self._update[:, :, 1],
                           self._columns[:, :, 2])
        #: per layer, the views a layer call uses (taken once here, not per call)
        self._views = [(self._columns[k], self._update[k], record.pairs[k].view(b, 1, 1),
                        record.summed[k].view(b, 1, p)) for k in range(n)]
        #: the layers with a visual sink, where eager decoding steps act (read once after the prefill)
        self._active: frozenset[int] = frozenset()
        record.state = state
        super().__init__(runtime, record)

    def after_prefill(self, state: CallState) -> None:
        """One host read per call: the layers with a visual sink, where eager decoding steps act."""
        if self.layers:
            has = self.record.visual.flatten(1).any(1).tolist()
            self._active = frozenset(layer for layer, h in zip(self.layers, has) if h)

    def _prepare(self, state: CallState, layer: int) -> None:
        """Fill layer `layer`'s matrices from its sinks S_l (once per call, in the prefill).

        columns . A gives per (head, row): t = (1 - rho) m - sum_V A, m = sum_I A, sum_N A and
        sum_sources A, where r = 1 - sum_V A / (m + 1e-6) >= rho <=> t >= -(1 - rho) 1e-6; and
        [1, sum_sources A / sum_N A] @ update is the relative change of each entry of an image-centric
        row. N_l is left empty in a batch row without visual sinks (sum_N A = 0: no pair selected).
        """
        k = self._index[layer]
        self._prepared.add(layer)
        cfg = self.config
        sinks = state.sink_mask(layer, self.tau)
        image = state.image_mask(sinks.device)
        visual = sinks & image
        source = (sinks if cfg.sources == "all" else visual).float()
        non = (image & ~visual & visual.any(-1, keepdim=True)).float()
        self.record.visual[k].copy_(visual)
        image_f = image.float()
        self._columns[k].copy_(torch.stack([(1 - cfg.rho) * image_f - visual.float(), image_f, non, source], 1))
        self._update[k].copy_(torch.stack([-cfg.p * source, cfg.p * non], 1))

    # -- the capability -----------------------------------------------------------------------------
    def queries(self, block: Block, state: CallState) -> range | None:
        layer = block.layer
        if self.config.p == 0 or self._first is None or layer not in self._index or block.phase is Phase.PREPASS:
            return None  # nothing VAR could move here: the fast path, exactly
        if block.phase is Phase.DECODE:
            if not torch.compiler.is_compiling() and layer not in self._active:
                return None  # no visual sink in this layer (read once after the prefill)
            return range(block.q_len)
        if layer not in self._prepared:
            self._prepare(state, layer)
        first = max(self._first - block.q_start, 0)
        return range(first, block.q_len) if first < block.q_len else None

    def edit(self, block: Block, state: CallState, queries: Queries, probs: torch.Tensor) -> torch.Tensor:
        """Selection and redistribution of every (head, row) pair of `probs` (B, H, R, K), in place.

        One product gives each pair's t, m, sum_N A, sum_sources A (see `_prepare`); the pair is
        chosen iff t >= -(1 - rho) 1e-6, m >= m_min and sum_N A > 0 (and, at the prefill, its row
        is text after the batch row's image, not padding). A chosen pair's prompt entries become
        A'_j = A_j * (1 - p [j in sources] + p [j in N_l] sum_sources A / sum_N A),
        the bracket minus 1 being a second product; other pairs are left exactly as they are.
        In place, or out of place when autograd records `probs` (the softmax's output, which its
        backward needs); the record is detached.
        """
        columns, update, pairs, gain = self._views[self._index[block.layer]]
        b, h, r, kv = probs.shape
        p = state.prompt_len
        a = probs[..., :p] if kv > p else probs
        flat = a.reshape(b, h * r, p)  # a view: the rows of a (B, H, R) block are contiguous up to the key stride
        if flat.requires_grad:  # autograd keeps the operands, and later layers and calls rewrite the buffers
            columns, update = columns.clone(), update.clone()
        # (B, 4, H * R): t, m, sum_N A, sum_sources A (four wide rows: a narrow (H R, 4) product is slow on CPUs)
        sums = torch.bmm(columns, flat.transpose(1, 2))
        limit, zero = self._constants(probs.device)
        chosen = (sums[:, :3] >= limit).all(1, keepdim=True)  # (B, 1, H * R)
        if block.phase is Phase.PREFILL:  # rows up to a row's image end, and its padding, stay as they are
            chosen = chosen & self._rows_after_image(state, queries, h, probs.device)
        # [1, sum_sources A / sum_N A] for chosen pairs, 0 for the others (divided by 1: no 0 / 0, nor in a gradient)
        ratio = sums[:, 2:]
        coef = torch.where(chosen, ratio / torch.where(chosen, ratio[:, :1], 1.0), zero)  # (B, 2, H * R)
        pairs.add_(chosen.sum((1, 2), keepdim=True))  # the record, from the rows before the edit
        gain.baddbmm_(coef[:, 1:].detach(), flat.detach())  # the record reads it on the visual non-sinks
        factor = torch.bmm(coef.transpose(1, 2), update).view(b, h, r, p)
        if flat.requires_grad:
            edited = torch.addcmul(a, a, factor)
            return torch.cat([edited, probs[..., p:]], -1) if kv > p else edited
        a.addcmul_(a, factor)
        return probs

    def _rows_after_image(self, state: CallState, queries: Queries, heads: int, device: torch.device) -> torch.Tensor:
        """(B, 1, H * R) bool: whether each prefill query is text after its batch row's image (once per query range)."""
        key = (queries.index.start, queries.index.stop, heads) if isinstance(queries.index, slice) else None
        got = self._row_ok.get(key) if key is not None else None
        if got is None:
            ok = state.text_after_image(queries.positions)  # (B, R)
            got = ok[:, None].expand(-1, heads, -1).reshape(len(state.rows), 1, -1).to(device)
            if key is not None:
                self._row_ok[key] = got
        return got


class VARRuntime(Runtime):
    """VAR bound to a model: resolved layers and tau, the buffers its calls reuse (see `VARCall`)."""

    uses_sinks = True
    call = VARCall

    def __init__(self, config: VAR, target: Target):
        from vlmfix.core.sinks import check_tau

        super().__init__(config, target)
        n = target.adapter.num_layers
        self.tau = target.tau if config.tau is None else check_tau(config.tau, target.adapter.hidden_size)
        layers = range(FIRST_SINK_LAYER, n - 1) if config.layers is None else config.layers
        self.layers = layers = model_layers("VAR", "layers", layers, n)
        self._index = {layer: k for k, layer in enumerate(layers)}
        self._buffers = Buffers()
        self._limits: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def resolved(self) -> dict:
        return {"tau": self.tau, "layers": list(self.layers)}

    def start(self, state: CallState) -> "VARCall":
        return VARCall(self, state)

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower bounds of (t, m, sum_N A): -(1 - rho) 1e-6, m_min and TINY; and 0 (made once per device)."""
        got = self._limits.get(device)
        if got is None:
            cfg = self.config
            got = self._limits[device] = (torch.tensor([[-(1 - cfg.rho) * 1e-6], [cfg.m_min], [TINY]], device=device),
                                          torch.zeros((), device=device))
        return got


register_method(name="var", config=VAR, runtime=VARRuntime, summary="visual attention redistribution (Kang et al., "
                "ICLR 2025): attention on sinks moves to the image's content tokens")
