"""GIFT: gaze shift-guided cross-modal fusion enhancement ("Capturing Gaze Shifts for Guidance:
Cross-Modal Fusion Enhancement for VLM Hallucination Mitigation", arXiv 2510.22067).

The question is the text of the last user turn (`Adapter.question`: wherever the image stands, read
off the token ids with the family's chat markers; its positions need not be contiguous).

Saliency, once per sample from the prompt, at the saliency layer(s) l, over the question's rows i
after the row's last visual token (informative words only: under causal attention a token before the
image cannot attend to it, so it shows no gaze shift) and the image columns j:
  dA[l,h,i,j] = max(A[l,h,i,j] - A[l,h,i-1,j], 0)   (a "gaze shift": attention that rises on j;
  after token pruning, i-1 is the nearest earlier token still present)
  per layer keep the top floor(H/2) heads by sum_{i,j} dA; S_j = mean over layers, kept heads and
  kept rows of dA[., ., ., j]; clamp S to mean +- 3 std (population), min-max to [0, 1] -> S_hat
  (0 when flat), M_j = exp(alpha * S_hat_j) in [1, e^alpha].
Boost, in each boost layer on the last query row (each decoding step, and at the prefill each batch
row's last real token: the last prompt position, or before a right-padded row's padding):
  top floor(H/2) heads by image attention: A'_hj = A_hj * M_j on image columns;
  r = sum of A' / sum of A over those heads and image columns;
  top floor(H/2) heads by attention to the question (all its tokens, before the image too): those entries
  times beta * r;
  every modified row renormalised to sum 1. Head selections use the unmodified row.

Numerics: M_j overflows fp32 from alpha = 89 on (and r, beta r with it). Where no product can
overflow (beta > 0 and alpha + max(ln beta, 0) <= DIRECT_MAX = 60, which holds the paper's settings)
the boost is the formula's direct products; beyond, it is computed from the log factors log f_j (alpha S_hat_j on the image in the vis heads, log beta + log r on the
question in the query heads, 0 elsewhere): each row becomes A_j e^(log f_j - c) / sum_k A_k e^(log f_k - c),
c the largest log f_j of an entry with attention, and log r = log sum A M - log sum A takes its first
term from the largest present alpha S_hat the same way. That is the formula above (equal to it up to
rounding wherever M fits in fp32), finite for every alpha in [0, ALPHA_MAX] and every beta >= 0.
With beta = 0 a query head's question entries get 0; a row whose attention was all on them is left as
it is. alpha = inf is refused: the limit depends on which tokens tie at the top of S_hat.

Cost: the saliency map becomes, once per call, tensors over the prompt positions (image and question
columns, alpha S_hat), so the boost of a layer call is one batched product, two head rankings and a
few element-wise ops for all batch rows at once; a batch row without a map (no question, a question
wholly before the image, no informative word after the image, a flat map) selects no head and is left
exactly as it is, its record saying why. The flat-map test is a tensor too, so nothing is read on the
host. The boost works out of place (autograd may need the softmax's output); the saliency map is read
from detached attention, like sink sets and kept tokens: a constant of the call for gradients.

One prefill suffices when every saliency layer precedes every boost layer; otherwise `attach`
runs a pre-pass over the prompt that stops after the last saliency layer.

Described, with its choices and defaults, in docs/methods.md ("GIFT").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from vlmfix.core.state import RowLayout
from vlmfix.core.words import informative_tokens
from vlmfix.methods.base import (Block, Buffers, CallState, EditsQueries, HeatMaps, MethodCall, MethodConfig, Phase,
                                 Queries, Record, Runtime, Target, check_choice, check_layers, check_number,
                                 model_layers, raise_problems)
from vlmfix.methods.registry import register_method

#: the largest alpha GIFT takes: alpha S_hat, log r and log beta + log r stay far inside fp32's range
ALPHA_MAX = 1e30
#: the boost takes the formula's direct products while alpha + max(ln beta, 0) <= DIRECT_MAX (every M, r and
#: beta r then stays below e^60 ~ 1e26, far from fp32's 3e38), and log factors beyond
DIRECT_MAX = 60.0


def default_layers(num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The depth rule for models without a preset, scaled from LLaVA-1.5-7B (32 layers: saliency 11,
    boost 12..22): saliency at round(0.34 L), boost from the next layer to round(0.69 L), kept inside
    the model (a 2-layer model: saliency 0, boost 1)."""
    if num_layers < 2:
        raise ValueError(f"GIFT needs at least 2 decoder layers (a saliency layer before a boost layer), "
                         f"the model has {num_layers}")
    sal = min(max(1, round(0.34 * num_layers)), num_layers - 2) if num_layers >= 3 else 0
    return (sal,), tuple(range(sal + 1, min(num_layers, max(sal + 2, round(0.69 * num_layers) + 1))))


def half(n: int) -> int:
    """floor(H/2), at least 1."""
    return max(1, n // 2)


@dataclass
class GIFT(MethodConfig):
    """GIFT (defaults: the model preset in configs/models; LLaVA-1.5-7B: alpha 5, saliency layer 11,
    boost layers 12..22; models without a preset: `default_layers` and alpha 5).

    - alpha: boost strength, M in [1, e^alpha]; a finite number in [0, ALPHA_MAX = 1e30] (the boost
      is computed in log space, so no alpha overflows); 0 turns GIFT off exactly;
    - saliency_layers / boost_layers: 0-indexed decoder layers, non-empty lists of ints (None:
      preset or depth rule);
    - beta: factor on r for the boost of the question's columns, a finite number >= 0 (the paper's beta = 1);
    - use_spacy: informative words by spaCy POS tags (True), the built-in word list (False), or
      spaCy when installed (None).

    Every mistake is refused at construction; a layer beyond the model's depth when attach binds it.
    """

    alpha: float | None = None
    saliency_layers: Sequence[int] | None = None
    boost_layers: Sequence[int] | None = None
    beta: float = 1.0
    use_spacy: bool | None = None


    def __post_init__(self) -> None:
        raise_problems("GIFT", [
            None if self.alpha is None else check_number("alpha", self.alpha, 0.0, ALPHA_MAX),
            *(None if getattr(self, f) is None else check_layers(f, getattr(self, f))
              for f in ("saliency_layers", "boost_layers")),
            check_number("beta", self.beta, 0.0),
            check_choice("use_spacy", self.use_spacy, (None, True, False)),
        ])

    @staticmethod
    def saliency(state: CallState, row: int = 0, index: int | None = None) -> torch.Tensor | None:
        """S_hat over the image tokens of batch row `row` in the call of `state` (None: no map for that row)."""
        return state.record(GIFT, index).saliency(row)


@dataclass
class GIFTRow:
    """One batch row as GIFT saw it (host tensors): the question's positions, which of its tokens are
    informative, the saliency rows (its informative tokens after the row's last visual token), why it was
    left alone."""

    positions: torch.Tensor | None
    informative: torch.Tensor | None
    gaze_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    note: str = ""

    @property
    def acting(self) -> bool:
        """Whether GIFT acts on this row: its question has an informative token after the image."""
        return len(self.gaze_rows) > 0


@dataclass
class GIFTRecord(Record):
    """What GIFT found in one call: per batch row its question, informative tokens and saliency rows (`rows`), the
    saliency S_hat over prompt positions (`saliency_map`, (B, P), on the image tokens) and whether the
    row got a boost map (`has_map`, (B,) bool; False for a flat map or no informative word)."""

    alpha: float
    rows: list[GIFTRow]
    image_positions: list[torch.Tensor]
    saliency_map: torch.Tensor
    has_map: torch.Tensor
    frozen: bool = field(default=False, repr=False)

    acts: ClassVar[str] = "boosted attention"

    def freeze(self) -> None:
        """Copy the tensors out of the runtime's buffers (before a next call reuses them)."""
        if not self.frozen:
            self.saliency_map, self.has_map = self.saliency_map.clone(), self.has_map.clone()
            self.frozen = True

    def saliency(self, row: int = 0) -> torch.Tensor | None:
        """S_hat over the image tokens of batch row `row` (None when that row got no saliency)."""
        if not self.rows[row].acting:
            return None
        return self.saliency_map[row, self.image_positions[row].to(self.saliency_map.device)].cpu()

    def note(self, row: int = 0) -> str:
        """Why batch row `row` was not boosted ('' when it was)."""
        info = self.rows[row]
        if info.note:
            return info.note
        return "" if bool(self.has_map[row]) else "flat saliency (max == min): no boost"

    # -- the record protocol ------------------------------------------------------------------------
    def acted(self) -> list[bool]:
        """Rows that got a boost map (a question with an informative word, a saliency that is not flat), alpha > 0."""
        return [bool(ok) and self.alpha > 0 for ok in self.has_map.tolist()]

    def row(self, row: int) -> dict[str, Any]:
        """Whether batch row `row` got a boost map."""
        return {"boosted": bool(self.has_map[row])}

    def notes(self, row: int) -> list[str]:
        note = self.note(row)
        return [note] if note else []

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        """`gift_saliency.png`: S_hat over the image of batch row 0, or why there is none."""
        s_hat = self.saliency(0)
        if s_hat is None:
            return [f"GIFT: {self.note(0)}; so no gift_saliency.png"]
        values = torch.zeros(self.saliency_map.shape)
        values[0, self.image_positions[0]] = s_hat.float()
        caption = [(f"decoding multiplies the attention on each patch by exp(alpha x S_hat), alpha {self.alpha}, in "
                    "the half of the heads that look at the image most")] if self.alpha else []
        path = maps.grid("gift_saliency.png", values, "GIFT saliency: where the question's gaze shifted", vmin=0.0,
                         vmax=1.0, bar="saliency S_hat (0 to 1)", caption=caption)
        return [f"heat map, GIFT saliency: {path}"]

    def to_json(self) -> dict[str, Any]:
        """The alpha and, per batch row, whether it was boosted, its notes, its question's positions and S_hat over
        its image tokens (None: no saliency)."""
        rows = []
        for r, info in enumerate(self.rows):
            s_hat = self.saliency(r)
            rows.append({**self.row(r), "notes": self.notes(r),
                         "question": None if info.positions is None else info.positions.tolist(),
                         "saliency": None if s_hat is None else s_hat.tolist()})
        return {"method": self.method, "alpha": self.alpha, "rows": rows}


class GIFTCall(MethodCall, EditsQueries):
    """One call of GIFT: the question tokens it reads, the gaze shifts of its saliency layers, and the boost's
    matrices over the prompt (built once, from the saliency map, before the first boost)."""

    record_type = GIFTRecord

    record: GIFTRecord

    def __init__(self, runtime: "GIFTRuntime", state: CallState):
        self.alpha, self.beta, self._log_beta = runtime.alpha, runtime.beta, runtime._log_beta
        self._direct, self._sal, self._boost, self._top = runtime._direct, runtime._sal, runtime._boost, runtime._top
        use_spacy = runtime.config.use_spacy
        rows: list[GIFTRow] = []
        for row in state.rows:
            if not row.has_image:
                rows.append(GIFTRow(row.query_positions, None, note=row.note))
            elif row.query_positions is None:
                rows.append(GIFTRow(None, None, note="the last user turn holds no text (no question): no saliency, "
                                                     "no boost"))
            else:
                rows.append(self._question_row(row, use_spacy))
        buffers = runtime._buffers
        b, p, dev = state.batch_size, state.prompt_len, state.device
        #: the rows GIFT acts on (an informative question token after the image)
        self._acting = [i for i, info in enumerate(rows) if info.acting]
        self._shifts: dict[int, dict[int, torch.Tensor]] = {}  # saliency layer -> batch row -> (N_img,)
        self._built = False
        if self._direct:
            #: (B, P, 3) columns [image, M on the image, question] and (B, 2, P) rows [(M - 1) on the image,
            #: question] of the rows with a map
            self._columns = buffers.zeros("columns", (b, p, 3), torch.float32, dev)
            self._update = buffers.zeros("update", (b, 2, p), torch.float32, dev)
        else:
            #: (B, P, 2) columns [image, question] (head ranking); (B, P) alpha S_hat on the image, and the image
            #: and question positions of the rows with a map
            self._columns = buffers.zeros("columns", (b, p, 2), torch.float32, dev)
            self._gain = buffers.zeros("gain", (b, p), torch.float32, dev)
            self._image = buffers.zeros("image", (b, p), torch.bool, dev)
            self._question = buffers.zeros("question", (b, p), torch.bool, dev)
        record = GIFTRecord(self.alpha, rows, [r.image_positions for r in state.rows],
                            buffers.zeros("saliency", (b, p), torch.float32, dev),
                            buffers.zeros("has_map", (b,), torch.bool, dev))
        #: which rows have a map (the buffer the record views until it is frozen), read by each boost
        self._has_map = record.has_map
        super().__init__(runtime, record)

    @staticmethod
    def _question_row(row: RowLayout, use_spacy: bool | None) -> GIFTRow:
        """The question of an image row: its informative tokens, and the saliency rows among them."""
        positions = row.query_positions
        informative = torch.tensor(informative_tokens(row.query_pieces, use_spacy), dtype=torch.bool)
        after = positions > row.image_positions[-1]
        gaze = positions[informative & after]
        note = ""
        if not bool(after.any()):
            note = ("the question precedes the image: under causal attention its tokens cannot attend to the image, "
                    "so they show no gaze shift; no saliency, no boost (ask the question after the image)")
        elif not len(gaze):
            where = "" if bool(after.all()) else "'s text after the image"
            note = f"no informative word in the question{where}: saliency is flat, attention unchanged"
        return GIFTRow(positions, informative, gaze, note)

    # -- the capability -----------------------------------------------------------------------------
    def queries(self, block: Block, state: CallState) -> range | None:
        if not self.alpha or not self._acting:
            return None  # nothing to boost: the fast path, exactly
        layer = block.layer
        if block.phase is Phase.DECODE:
            return range(block.q_len) if layer in self._boost else None
        lo, hi = block.q_len, 0
        if layer in self._sal and not self._built:
            info = self.record.rows
            starts = [state.previous_token(layer, b, int(info[b].gaze_rows[0])) for b in self._acting]
            lo = max(min(starts) - block.q_start, 0)  # from the token before the first saliency row
            hi = min(max(int(info[b].gaze_rows[-1]) for b in self._acting) + 1 - block.q_start, block.q_len)
        if layer in self._boost and block.phase is Phase.PREFILL:  # each batch row's last real token
            last = state.last_range
            lo, hi = min(lo, last.start - block.q_start), max(hi, last.stop - block.q_start)
        return range(lo, hi) if lo < hi else None

    def edit(self, block: Block, state: CallState, queries: Queries, probs: torch.Tensor) -> torch.Tensor:
        layer = block.layer
        if block.phase is not Phase.DECODE and layer in self._sal and not self._built:
            self._gaze_shifts(state, layer, queries.positions, probs)
            if set(self._shifts) == self._sal:
                self._build_map(state)
        if layer in self._boost and block.phase is not Phase.PREPASS:
            if not self._built:
                self._build_map(state)
            if block.phase is Phase.DECODE:
                return self._boosted(probs)
            # the prefill: each batch row's last real token (`queries` asks for them all)
            batch, heads = torch.arange(probs.shape[0]), torch.arange(probs.shape[1])
            at = torch.searchsorted(queries.positions, state.last_tokens())
            index = tuple(i.to(probs.device) for i in (batch[:, None], heads[None, :], at[:, None]))
            return probs.index_put(index, self._boosted(probs[index].unsqueeze(2)).squeeze(2))
        return probs

    # -- saliency (prefill or pre-pass, once per call) ----------------------------------------------
    def _gaze_shifts(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> None:
        per_row = self._shifts.setdefault(layer, {})
        where = {p: k for k, p in enumerate(positions.tolist())}
        for b in self._acting:
            gaze = self.record.rows[b].gaze_rows.tolist()
            cur = torch.tensor([where[i] for i in gaze], device=probs.device)
            # pruning may have removed i - 1 (an image token): the nearest earlier token still present
            prev = torch.tensor([where[state.previous_token(layer, b, i)] for i in gaze], device=probs.device)
            row = state.rows[b]
            a = probs[b].detach()[:, :, row.image_positions.to(probs.device)]  # (H, R, N_img)
            shift = (a[:, cur] - a[:, prev]).clamp_min(0)  # (H, kept rows, N_img)
            heads = shift.sum((1, 2)).topk(half(shift.shape[0])).indices
            per_row[b] = shift[heads].mean((0, 1))  # (N_img,)

    def _build_map(self, state: CallState) -> None:
        """S_hat and M per batch row, into the call's matrices (rows without a map stay zero)."""
        self._built = True
        rec = self.record
        for b in self._acting:
            parts = [self._shifts[layer][b] for layer in sorted(self._shifts) if b in self._shifts[layer]]
            if not parts:
                continue
            s = torch.stack(parts).mean(0)
            mean, std = s.mean(), s.std(unbiased=False)
            s = s.clamp(mean - 3 * std, mean + 3 * std)
            lo, hi = s.min(), s.max()
            ok = hi > lo  # a flat map gives S_hat = 0, M = 1: nothing to boost (a tensor: no host read)
            s_hat = torch.where(ok, (s - lo) / torch.where(ok, hi - lo, 1.0), 0.0)
            image = state.rows[b].image_positions.to(s.device)
            question = rec.rows[b].positions.to(s.device)
            rec.saliency_map[b, image] = s_hat
            rec.has_map[b] = ok
            self._columns[b, image, 0] = 1.0
            if self._direct:
                m = torch.exp(self.alpha * s_hat)
                self._columns[b, image, 1] = m
                self._columns[b, question, 2] = 1.0
                self._update[b, 0, image] = (m - 1) * ok
                self._update[b, 1, question] = ok.float()
            else:
                self._columns[b, question, 1] = 1.0
                self._gain[b, image] = self.alpha * s_hat
                self._image[b, image] = ok
                self._question[b, question] = ok

    # -- boost ------------------------------------------------------------------------------------
    def _boosted(self, probs: torch.Tensor) -> torch.Tensor:
        """The boost of rows `probs` (B, H, R, K), all batch rows at once (in place unless autograd records
        `probs`): by direct products where none can overflow, else from log factors."""
        return self._boosted_direct(probs) if self._direct else self._boosted_log(probs)

    def _boosted_direct(self, probs: torch.Tensor) -> torch.Tensor:
        """The boost by the formula's products (alpha + max(ln beta, 0) <= DIRECT_MAX, beta > 0).

        columns @ A gives per (head, row) its image mass, boosted image mass sum A M and question mass;
        the top floor(H/2) heads by image mass (vis) and by question mass (qry) are ranked on that
        unmodified row. With r = sum_vis sum A M / sum_vis sum A over the image, each entry becomes
        A_j f_j, f_j - 1 = vis (M_j - 1) [j in I] + qry (beta r - 1) [j in Q], i.e. one product
        [vis, qry (beta r - 1)] @ update; the row is divided by its new sum 1 + sum_j A_j (f_j - 1) > 0.
        Unselected heads and rows without a map have f = 1 and a sum of exactly 1: they are unchanged.
        """
        b, h, r, k = probs.shape
        p = self._columns.shape[1]
        a = probs[..., :p]
        grad = a.requires_grad  # autograd keeps the operands, and later layers and calls rewrite the buffers
        columns, update = (self._columns.clone(), self._update.clone()) if grad else (self._columns, self._update)
        mass = torch.bmm(a.reshape(b, h * r, p), columns).view(b, h, r, 3)  # image, boosted image, question
        ranked = mass[..., ::2]  # (B, H, R, 2): image and question mass, ranked over the heads at once
        kth = h - self._top + 1  # the top-th largest is the (H - top + 1)-th smallest
        chosen = (ranked >= ranked.kthvalue(kth, dim=1, keepdim=True).values).float()  # [vis, qry] per (head, row)
        sums = (chosen[..., :1] * mass[..., :2]).sum(1, keepdim=True)  # (B, 1, R, 2) over the vis heads
        # r = 1 where the vis heads give the image no attention at all (a sliding window that ends after it)
        ratio = torch.where(sums[..., :1] > 0, sums[..., 1:] / sums[..., :1].clamp_min(1e-30), 1.0)
        coef = torch.cat([chosen[..., :1], chosen[..., 1:] * (ratio * self.beta - 1.0)], -1)  # [vis, qry (beta r - 1)]
        change = a * torch.bmm(coef.view(b, h * r, 2), update).view(b, h, r, p)
        total = change.sum(-1, keepdim=True) + 1.0
        if grad:
            new = a + change
            return (torch.cat([new, probs[..., p:]], -1) if k > p else new) / total
        a.add_(change)
        return probs.div_(total)

    def _boosted_log(self, probs: torch.Tensor) -> torch.Tensor:
        """The boost from log factors (any alpha up to ALPHA_MAX, any beta >= 0): a new tensor.

        columns @ A gives per (head, row) its image and question mass, on which the top floor(H/2)
        heads by image mass (vis) and by question mass (qry) are ranked. With g_j = alpha S_hat_j,
        log r = log sum_vis,I A e^g - log sum_vis,I A (Q: the question's positions; 0 where the vis heads give the image no
        attention: a sliding window that ends after it), each entry gets the log factor
        log f_j = vis g_j [j in I] + qry (log beta + log r) [j in Q], and the row becomes
        A_j e^(log f_j - c) / sum_k A_k e^(log f_k - c), c = max log f_j over entries with A_j > 0, so
        that no factor exceeds 1 and the sum is at least one entry's attention (see the module's
        "Numerics"). Unselected heads, rows without a map and rows whose every entry beta = 0
        removed are returned exactly as they are.
        """
        b, h, r, k = probs.shape
        p = self._columns.shape[1]
        a = probs[..., :p]
        columns = self._columns.clone() if a.requires_grad else self._columns  # autograd keeps it; calls rewrite it
        mass = torch.bmm(a.reshape(b, h * r, p), columns).view(b, h, r, 2)  # image, question
        kth = h - self._top + 1  # the top-th largest is the (H - top + 1)-th smallest
        chosen = (mass >= mass.kthvalue(kth, dim=1, keepdim=True).values) & self._has_map.view(b, 1, 1, 1)
        vis, qry = chosen[..., :1], chosen[..., 1:]
        g, image, question = self._gain.view(b, 1, 1, p), self._image.view(b, 1, 1, p), self._question.view(b, 1, 1, p)
        # log r, sum A e^g taken relative to its largest present e^g (B, 1, R, 1)
        present = vis & image & (a > 0)
        top = torch.where(present, g, -math.inf).amax((1, 3), keepdim=True)
        has = top > -math.inf
        top = torch.where(has, top, 0.0)
        boosted = (a * torch.where(present, (g - top).clamp_max(0.0).exp(), 0.0)).sum((1, 3), keepdim=True)
        plain = (mass[..., :1] * vis).sum(1, keepdim=True)
        log_r = torch.where(has, top + torch.where(has, boosted, 1.0).log() - torch.where(has, plain, 1.0).log(), 0.0)
        log_f = torch.where(qry & question, log_r + self._log_beta, torch.where(vis, g, 0.0))
        if k > p:  # generated tokens: factor 1
            log_f = F.pad(log_f, (0, k - p))
        c = torch.where(probs > 0, log_f, -math.inf).amax(-1, keepdim=True)
        live = c > -math.inf  # False only where beta = 0 removed every entry with attention
        scaled = probs * (log_f - torch.where(live, c, 0.0)).clamp_max(0.0).exp()
        total = torch.where(live, scaled.sum(-1, keepdim=True), 1.0)
        return torch.where((vis | qry) & live, scaled / total, probs)


class GIFTRuntime(Runtime):
    """GIFT bound to a model: resolved alpha, beta and layers, the buffers its calls reuse (see `GIFTCall`).
    It reads the question's words (the last user turn's text, found with the chat template's markers; its
    informative tokens are words), so attach refuses it without a tokenizer."""

    needs_tokenizer = True
    call = GIFTCall

    def __init__(self, config: GIFT, target: Target):
        super().__init__(config, target)
        adapter = target.adapter
        n = adapter.num_layers
        preset = (adapter.preset or {}).get("gift")
        if preset:
            lo, hi = preset["boost_layers"]
            sal, boost, alpha = tuple(preset["saliency_layers"]), tuple(range(lo, hi + 1)), preset["alpha"]
        else:
            (sal, boost), alpha = default_layers(n), 5.0
        self.alpha = float(alpha if config.alpha is None else config.alpha)
        self.beta = float(config.beta)
        self._log_beta = math.log(self.beta) if self.beta > 0 else -math.inf
        #: the boost's evaluation: direct products, or log factors where a product could overflow (or beta = 0)
        self._direct = self.beta > 0 and self.alpha + max(self._log_beta, 0.0) <= DIRECT_MAX
        sal = sal if config.saliency_layers is None else config.saliency_layers
        boost = boost if config.boost_layers is None else config.boost_layers
        self.saliency_layers = model_layers("GIFT", "saliency_layers", sal, n)
        self.boost_layers = model_layers("GIFT", "boost_layers", boost, n)
        self._sal, self._boost = frozenset(self.saliency_layers), frozenset(self.boost_layers)
        self._buffers = Buffers()
        self._top = half(adapter.num_heads)

    def resolved(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "saliency_layers": list(self.saliency_layers),
                "boost_layers": list(self.boost_layers)}

    @property
    def needs_prepass(self) -> bool:
        """True when a boost layer comes at or before the last saliency layer."""
        return min(self._boost) <= max(self._sal)

    def prepass_until(self) -> int | None:
        """The last saliency layer when a boost layer precedes it (and alpha > 0), else None."""
        return max(self._sal) if self.alpha > 0 and self.needs_prepass else None

    def start(self, state: CallState) -> GIFTCall:
        return GIFTCall(self, state)


register_method(name="gift", config=GIFT, runtime=GIFTRuntime, summary="gaze shift-guided cross-modal fusion "
                "enhancement (arXiv 2510.22067): attention on the image regions the question looked at is boosted")
