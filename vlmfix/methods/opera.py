"""OPERA: over-trust penalty and retrospection-allocation (Huang et al., CVPR 2024, arXiv 2311.17911).

A decoding strategy: beam search (`num_beams` 5) whose beams are penalised for the *knowledge-aggregation
pattern* of their generated tokens' self-attention, with a roll-back when that pattern persists.

**Over-trust penalty.** For a beam whose generated tokens are x_0 .. x_{t-1}, take the self-attention
omega_{i,j} of generated token i on generated token j (`layers`, default the last decoder layer; the maximum
over heads, the mean over several layers), in a local window of the last k generated tokens (rows and
columns t-k .. t-1, the lower triangle: j <= i), scaled by sigma. The column-wise products

    P_j = prod_{i=j}^{t-1} sigma * omega_{i,j}        (t-k <= j <= t-1)

score each column; the beam's over-trust score is phi = max_j P_j, at column c = argmax_j P_j (the summary
token). Each beam keeps only its top `candidates` (N_can) next tokens Y, and a candidate's beam-search score
is the beam's score + log p(x_t | x_<t) - alpha * phi. The products are kept as running sums of logs (one new
row per step); phi is capped at e^69 (~1e30) so that fp32 scores stay finite.

**Retrospection-allocation.** When the best running beam's summary-token position c has been the same s for
the last r (`threshold`) steps, the row rolls back to the step that chose x_{s+1} (the beams, their scores
and candidate sets as they were then) and chooses again without the (beam, x_{s+1}) pair the best beam came
from. Roll-back positions never decrease within a row, and a row rolls back at most `max_rollbacks` times.

Defaults: num_beams 5, sigma 50, alpha 1, N_can 5, r 15 (the authors' published settings: README of
github.com/shikiw/OPERA, --beam 5 --scale_factor 50 --threshold 15 --num_attn_candidates 5
--penalty_weights 1). Choices where the paper leaves room (stated in docs/methods.md):

- the candidate's own attention row would need one more forward per candidate; the penalty here uses the
  window that ends at the beam's last generated token (the query each beam-search step computes anyway), so
  phi is one value per beam, the same for its N_can candidates (it re-ranks beams, not a beam's tokens);
- the window covers the generated tokens only (`window` = None: all of them; the paper's k otherwise);
- attention: the last decoder layer, maximum over heads;
- the overlap check is r consecutive steps with the same c (the paper's l = r), and on a roll-back the
  finished hypotheses stay in the pool; `max_rollbacks` (the paper's beta) defaults to 5 per row.

Neutral setting: alpha = 0 and threshold = None is HF's own beam search exactly (no candidate set, no
observed attention: every layer stays on the fast path). Limits: the dynamic cache only (the roll-back
rewrites cache slots; no static cache / compiled generation), no sampling, no contrast-branch method or
in-place pruning beside it, stopping by EOS and length only.

It runs as a transformers custom generation strategy: while attached, `model.generate(...)` (and
`fixed.generate`) run `OPERARuntime.beam_search` through `generate(custom_generate=...)` with `num_beams` 5
unless the call asks for more than one beam (a harness's num_beams=1 gets OPERA's 5); the attention it
needs comes from `ObservesQueries` (the last query row of each decoding step in its layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from vlmfix.core.errors import VlmfixError
from vlmfix.methods.base import (Block, CallState, MethodCall, MethodConfig, ObservesQueries, Phase, Queries, Record,
                                 Runtime, Target, check_layers, check_number, is_int, model_layers, raise_problems)
from vlmfix.methods.registry import register_method

#: phi is capped at e^LOG_CAP (fp32 scores stay finite whatever the window's products)
LOG_CAP = 69.0


@dataclass
class OPERA(MethodConfig):
    """Over-trust penalty and retrospection-allocation (defaults: the authors' published settings).

    - num_beams: beams per prompt (5), unless the generate call asks for more than one;
    - sigma: the attention scale (50); alpha: the penalty weight (>= 0; 0: no penalty);
    - candidates: N_can, the next tokens each beam keeps (5; >= 2);
    - window: k, the last generated tokens the pattern is read over (None: all of them);
    - threshold: r, the steps the summary-token position must repeat before a roll-back (15; None: never);
    - max_rollbacks: roll-backs per prompt at most (5);
    - layers: the decoder layers whose attention is read (default the last).
    """

    num_beams: int = 5
    sigma: float = 50.0
    alpha: float = 1.0
    candidates: int = 5
    window: int | None = None
    threshold: int | None = 15
    max_rollbacks: int = 5
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        def count(name: str, value: Any, lo: int, none: bool = False) -> str | None:
            if none and value is None or is_int(value) and value >= lo:
                return None
            return f"{name} must be an integer >= {lo}{' or None' if none else ''}, got {value!r}"

        raise_problems("OPERA", [
            count("num_beams", self.num_beams, 1),
            check_number("sigma", self.sigma, 0.0, lo_open=True),
            check_number("alpha", self.alpha, 0.0),
            count("candidates", self.candidates, 2),
            count("window", self.window, 1, none=True),
            count("threshold", self.threshold, 1, none=True),
            count("max_rollbacks", self.max_rollbacks, 0),
            None if self.layers is None else check_layers("layers", self.layers),
        ])

    @property
    def neutral(self) -> bool:
        """alpha = 0 and no roll-back: plain beam search."""
        return self.alpha == 0 and (self.threshold is None or self.max_rollbacks == 0)


@dataclass
class OPERARecord(Record):
    """What OPERA did in one call, per prompt (batch row before the beams): roll-backs (generated position of
    the summary token, step), and the penalty alpha * phi (largest over the prompt's beams) summed and at its
    maximum over the steps."""

    alpha: float
    num_beams: int
    rollbacks: list[list[tuple[int, int]]]
    steps: list[int]
    penalty_sum: torch.Tensor | None = None
    penalty_max: torch.Tensor | None = None
    state: CallState | None = field(default=None, repr=False, compare=False)

    acts: ClassVar[str] = "penalised beams for over-trust or rolled back"

    def acted(self) -> list[bool]:
        return [self.alpha > 0 and n > 0 or bool(r) for r, n in zip(self.rollbacks, self.steps)]

    def row(self, row: int) -> dict[str, Any]:
        out = {"beams": self.num_beams, "rollbacks": len(self.rollbacks[row]),
               "rollback_positions": [s for s, _ in self.rollbacks[row]], "penalised_steps": self.steps[row]}
        if self.penalty_sum is not None:
            out["penalty_mean"] = float(self.penalty_sum[row]) / max(1, self.steps[row])
            out["penalty_max"] = float(self.penalty_max[row])
        return out

    def notes(self, row: int) -> list[str]:
        if self.acted()[row]:
            return []
        return ["OPERA did nothing: alpha = 0 and no roll-back" if self.alpha == 0 and not self.steps[row]
                else "OPERA ran no decoding step here (generate was not called with it)"]

    def summary(self) -> str:
        """One line: roll-backs per prompt and the mean penalty."""
        parts = [f"prompt {r}: {len(rb)} roll-back(s) at {[s for s, _ in rb]}, "
                 f"mean penalty {self.row(r).get('penalty_mean', 0.0):.3g}" for r, rb in enumerate(self.rollbacks)]
        return "OPERA " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "alpha": self.alpha, "num_beams": self.num_beams,
                "rows": [{**self.row(r), "notes": self.notes(r)} for r in range(len(self.rollbacks))]}


class OPERACall(MethodCall, ObservesQueries):
    """One call: the per-beam window state (running column log-products, summary-token position and how many
    steps it repeated), filled by `observe` at each decoding step and read by the beam-search loop."""

    record: OPERARecord
    record_type = OPERARecord

    def __init__(self, runtime: "OPERARuntime", state: CallState):
        cfg = runtime.config
        self.layers = runtime.layer_set
        self.sigma, self.window = float(cfg.sigma), cfg.window
        #: set by the beam-search loop once its buffers exist (a forward outside it observes nothing)
        self.ready = False
        n = state.batch_size
        super().__init__(runtime, OPERARecord(float(cfg.alpha), 1, [[] for _ in range(n)], [0] * n))
        self.record.state = state

    def setup(self, rows: int, prompts: int, beams: int, steps: int, device: torch.device) -> None:
        """Buffers for `rows` = prompts x beams beams and `steps` generated tokens (the loop calls it)."""
        self.slots = torch.zeros(rows, steps, dtype=torch.long, device=device)
        self.seen = torch.zeros(rows, steps, device=device)
        self.log_products = torch.zeros(rows, steps, device=device)
        self.where = torch.zeros(rows, dtype=torch.long, device=device)
        self.repeats = torch.zeros(rows, dtype=torch.long, device=device)
        self.log_phi = torch.full((rows,), float("-inf"), device=device)
        rec = self.record
        rec.num_beams, rec.rollbacks, rec.steps = beams, [[] for _ in range(prompts)], [0] * prompts
        rec.penalty_sum = torch.zeros(prompts, device=device)
        rec.penalty_max = torch.zeros(prompts, device=device)
        self.ready = bool(self.layers) and self.runtime.observes

    # -- ObservesQueries ------------------------------------------------------------------------------
    def queries(self, block: Block, state: CallState) -> range | None:
        if not self.ready or block.phase is not Phase.DECODE or block.layer not in self.layers:
            return None
        return range(block.q_len - 1, block.q_len)

    def observe(self, block: Block, state: CallState, queries: Queries, probs: torch.Tensor) -> None:
        row = probs[:, :, -1, :].amax(1)  # (N, K): the new token's attention, the maximum over heads
        self.seen += row.gather(1, self.slots.clamp(max=row.shape[1] - 1))

    # -- the loop's side ------------------------------------------------------------------------------
    def update(self, fed: torch.Tensor) -> None:
        """After a decoding forward that fed generated token `fed[n]` to beam n: add its attention row to the
        column products, and find each beam's summary token (the window's largest product)."""
        omega = self.seen / len(self.layers)
        cols = torch.arange(omega.shape[1], device=omega.device)[None, :]
        upto = cols <= fed[:, None]
        self.log_products = torch.where(upto, self.log_products + torch.log(self.sigma * omega), self.log_products)
        valid = upto if self.window is None else upto & (cols > (fed - self.window)[:, None])
        self.log_phi, where = self.log_products.masked_fill(~valid, float("-inf")).max(1)
        self.repeats = torch.where(where == self.where, self.repeats + 1, 1)
        self.where = where
        self.seen.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        """Follow the beams the selection kept (flat indices, as the cache's reorder)."""
        for name in ("slots", "log_products", "where", "repeats", "log_phi"):
            setattr(self, name, getattr(self, name).index_select(0, index))


class OPERARuntime(Runtime):
    """OPERA bound to a model: its layers (default the last) and its decoding loop."""

    call = OPERACall

    def __init__(self, config: OPERA, target: Target):
        super().__init__(config, target)
        n = target.adapter.num_layers
        self.layers = model_layers("OPERA", "layers", (n - 1,) if config.layers is None else config.layers, n)
        self.layer_set = frozenset(self.layers)
        self.current: OPERACall | None = None

    @property
    def observes(self) -> bool:
        return not self.config.neutral

    def resolved(self) -> dict:
        return {"layers": list(self.layers)}

    def start(self, state: CallState) -> OPERACall:
        self.current = OPERACall(self, state)
        return self.current

    def check_combination(self, others: Sequence[Runtime]) -> None:
        for other in others:
            name = type(other.config).__name__
            if other.branches():
                raise VlmfixError(f"OPERA cannot run beside {name}: {name} adds contrast-branch rows to the batch, "
                                  "which OPERA's beam search (one cache row per beam, rewritten on roll-back) does "
                                  "not carry. Attach them separately.")
            if other.moved_layers():
                raise VlmfixError(f"OPERA cannot run beside {name} in the in-place form: OPERA maps generated tokens "
                                  "to cache slots, which in-place pruning removes. Use form='mask'.")
            if other.decoding() is not None:
                raise VlmfixError(f"OPERA and {name} each bring their own decoding loop: attach one of them")

    def decoding(self) -> tuple[Callable, Callable[[dict], dict]]:
        return self.beam_search, self.settings

    def settings(self, kwargs: dict) -> dict:
        """The generate call's arguments with OPERA's beams: `num_beams` unless the call asks for more than one
        (a harness's greedy num_beams=1 still gets OPERA's beams: OPERA is a beam search)."""
        beams = kwargs.get("num_beams")
        return {**kwargs, "num_beams": self.config.num_beams if beams is None or beams == 1 else beams}

    def beam_search(self, model: nn.Module, input_ids: torch.LongTensor, logits_processor: Any,
                    stopping_criteria: Any, generation_config: Any, **model_kwargs: Any) -> Any:
        """transformers' `custom_generate` signature: beam search with OPERA (see the module docstring)."""
        return _BeamSearch(self, model, input_ids, logits_processor, stopping_criteria, generation_config,
                           model_kwargs).run()


class _BeamSearch:
    """One OPERA beam search over a batch: each prompt its own `num_beams` beams, its own generated length
    (roll-backs shorten one prompt's beams while the others go on), transformers' beam-search bookkeeping
    (finished-hypothesis pool, length penalty, early stopping) per prompt."""

    def __init__(self, runtime: OPERARuntime, model: nn.Module, input_ids: torch.Tensor, logits_processor: Any,
                 stopping_criteria: Any, config: Any, model_kwargs: dict):
        from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

        self.cfg, self.model, self.kwargs = runtime.config, model, model_kwargs
        self.processors, self.config = logits_processor, config
        if config.do_sample:
            raise VlmfixError("OPERA is a beam search: call generate with do_sample=False")
        other = [type(c).__name__ for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        if other:
            raise VlmfixError(f"OPERA stops on EOS and length only; drop {', '.join(other)} (or detach OPERA)")
        if getattr(config, "cache_implementation", None) not in (None, "dynamic"):
            raise VlmfixError(self._static_message(config.cache_implementation))
        self.runtime = runtime
        self.nb = config.num_beams
        self.n, self.prompt = input_ids.shape
        self.b = self.n // self.nb
        self.max_length = config.max_length
        self.steps = self.max_length - self.prompt
        self.eos = config._eos_token_tensor
        self.device = input_ids.device
        self.input_ids = input_ids
        self.rollback = self.cfg.threshold is not None and self.cfg.max_rollbacks > 0

    @staticmethod
    def _static_message(what: Any) -> str:
        return (f"OPERA runs its own beam search whose roll-backs rewrite KV-cache slots, so it needs transformers' "
                f"default dynamic cache; a static / compiled cache ({what}) is not supported. Generate without "
                "cache_implementation=\"static\" (eager decoding).")

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> Any:
        m, cfg, nb, b, n = self.model, self.cfg, self.nb, self.b, self.n
        dev = self.device
        length_penalty, early_stopping = self.config.length_penalty, self.config.early_stopping
        n_eos = self.eos.shape[0] if self.eos is not None else 0
        # transformers' own fill value of unused positions (the same expression, precedence included)
        self.fill = fill = self.config._pad_token_tensor or self.eos[0] if self.eos is not None else -1

        running = torch.full((b, nb, self.max_length), fill, dtype=torch.long, device=dev)
        running[:, :, :self.prompt] = self.input_ids.view(b, nb, -1)
        finished = running.clone()
        running_scores = torch.zeros(b, nb, device=dev)
        running_scores[:, 1:] = -1e9
        finished_scores = torch.full((b, nb), -1e9, device=dev)
        # per beam: (generated length, parent beam) carried through transformers' helpers as "beam indices"
        finished_meta = torch.zeros(b, nb, 2, dtype=torch.long, device=dev)
        is_finished = torch.zeros(b, nb, dtype=torch.bool, device=dev)
        improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
        hits = torch.zeros(b, nb, dtype=torch.bool, device=dev)
        glen = torch.zeros(b, dtype=torch.long, device=dev)  # generated tokens per prompt

        out = m._prefill(self.input_ids, self.config, self.kwargs)
        self.call = self.runtime.current  # made by this prefill
        if self.call is None or self.call.record.state is None or self.call.record.state.batch_size != n:
            raise VlmfixError("OPERA's beam search found no call of its own prefill; generate on the attached model")
        self.call.setup(n, b, nb, max(self.steps, 1), dev)
        if self.rollback:
            self._history(dev)
        first = True
        while True:
            if not first:
                last = running.view(n, -1).gather(1, (self.prompt + glen.repeat_interleave(nb) - 1)[:, None])
                inputs = m.prepare_inputs_for_generation(last, next_sequence_length=1, **self.kwargs)
                out = m(**inputs, return_dict=True)
            self.kwargs = m._update_model_kwargs_for_generation(out, self.kwargs,
                                                                is_encoder_decoder=m.config.is_encoder_decoder)
            logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
            del out
            gen = glen.repeat_interleave(nb)
            seen = running.view(n, -1)[:, :self.prompt + int(glen.max())]
            log_probs = self.processors(seen, nn.functional.log_softmax(logits, dim=-1))
            if not first and self.call.ready:
                self.call.update(gen - 1)
                if self.rollback:
                    self._keep_kv(gen - 1)
            if cfg.neutral:
                table, tokens = log_probs.view(b, -1), None
                table = table.view(b, nb, -1).add(running_scores[:, :, None]).view(b, -1)
            else:
                table, tokens = self._candidates(log_probs, first, running_scores, glen)
            if self.rollback:
                table, tokens, glen, running, running_scores = self._retrospect(table, tokens, glen, running,
                                                                                running_scores, improvable)
            keep = min(max(2, 1 + n_eos) * nb, table.shape[1])
            top_mask = torch.arange(keep, device=dev) < nb
            top_scores, top_idx = torch.topk(table, k=keep)
            cols = table.shape[1] // nb
            parent = top_idx // cols
            token = top_idx % cols if tokens is None else tokens.gather(1, top_idx)
            top_seqs = running.gather(1, parent[:, :, None].expand(-1, -1, self.max_length)).clone()
            at = (self.prompt + glen).clamp(max=self.max_length - 1)
            top_seqs.scatter_(2, at[:, None, None].expand(-1, keep, 1), token[:, :, None])
            top_meta = torch.stack([(glen + 1)[:, None].expand(-1, keep), parent], -1)
            hits = (self.prompt + glen + 1 >= self.max_length)[:, None].expand(-1, keep).clone()
            if self.eos is not None:
                hits |= torch.isin(token, self.eos)
            running, running_scores, running_meta = m._get_running_beams_for_next_iteration(
                top_scores, top_seqs, top_meta, hits, nb)
            cur = (self.prompt + glen)[:, None]
            finished, finished_scores, finished_meta, is_finished = m._update_finished_beams(
                finished, top_seqs, finished_scores, top_scores, finished_meta, top_meta, improvable, is_finished,
                hits, top_mask, nb, cur, self.prompt, length_penalty, early_stopping)
            beam_idx = (running_meta[..., 1] + torch.arange(b, device=dev)[:, None] * nb).view(-1)
            cache = self.kwargs["cache"]
            if hasattr(m, "_reorder_cache"):
                self.kwargs["cache"] = m._reorder_cache(cache, beam_idx)
            else:
                cache.reorder_cache(beam_idx)
            if self.call.ready:
                self.call.reorder(beam_idx)
            glen = (glen + 1).clamp(max=self.steps)
            gen = glen.repeat_interleave(nb) - 1
            slot = self.kwargs["cache"].get_seq_length()
            if self.call.ready:
                self.call.slots.scatter_(1, gen[:, None], slot)
            if self.rollback:
                self.parents[torch.arange(n, device=dev), gen] = beam_idx - torch.arange(n, device=dev) // nb * nb
            improvable = m._check_early_stop_heuristic(improvable, running_scores, finished_scores, is_finished,
                                                       (self.prompt + glen)[:, None], self.max_length, self.prompt,
                                                       early_stopping, length_penalty)
            first = False
            if not m._beam_search_has_unfinished_sequences(improvable, is_finished, hits, early_stopping):
                break
        returned = self.config.num_return_sequences
        sequences = finished[:, :returned].reshape(b * returned, -1)
        lengths = finished_meta[:, :returned, 0].reshape(-1)
        sequences = sequences[:, :self.prompt + int(lengths.max())]
        if not self.config.return_dict_in_generate:
            return sequences
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

        scores = finished_scores[:, :returned].reshape(-1) if self.config.output_scores else None
        return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=scores, cache=self.kwargs["cache"])

    # -- the over-trust penalty -----------------------------------------------------------------------
    def _candidates(self, log_probs: torch.Tensor, first: bool, running_scores: torch.Tensor,
                    glen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, nb * N_can) beam-search scores of each beam's top-N_can tokens, penalised, and their tokens."""
        b, nb, c = self.b, self.nb, self.cfg.candidates
        scores, tokens = torch.topk(log_probs, k=c, dim=-1)
        if not first and self.cfg.alpha > 0:
            penalty = self.cfg.alpha * torch.exp(self.call.log_phi.clamp(max=LOG_CAP))
            scores = scores - penalty[:, None]
            rec, per = self.call.record, penalty.view(b, nb).amax(1)
            live = glen < self.steps
            rec.penalty_sum += per * live
            rec.penalty_max = torch.maximum(rec.penalty_max, per * live)
            rec.steps = [k + int(x) for k, x in zip(rec.steps, live.tolist())]
        table = scores.view(b, nb, c) + running_scores[:, :, None]
        return table.view(b, -1), tokens.view(b, -1)

    # -- retrospection-allocation ---------------------------------------------------------------------
    def _history(self, dev: torch.device) -> None:
        """Buffers the roll-back restores from, indexed by generated length: each prompt's candidate tables
        and beams, each beam's window state, each generated token's keys and values and the beam it came from."""
        cache = self.kwargs.get("cache")
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise VlmfixError(self._static_message(type(cache).__name__) + " OPERA's roll-back (threshold) needs "
                              "every cache layer to be a plain DynamicLayer (no sliding window); threshold=None "
                              "keeps the penalty alone.")
        t, n, b, w = self.steps + 1, self.n, self.b, self.nb * self.cfg.candidates
        self.tables = torch.full((b, t, w), float("-inf"), device=dev)
        self.table_tokens = torch.zeros(b, t, w, dtype=torch.long, device=dev)
        self.banned = torch.zeros(b, t, w, dtype=torch.bool, device=dev)
        self.beams = torch.zeros(b, t, self.nb, max(self.steps, 1), dtype=torch.long, device=dev)
        self.windows = torch.zeros(n, t, max(self.steps, 1), device=dev)
        self.where_then = torch.zeros(n, t, dtype=torch.long, device=dev)
        self.repeats_then = torch.zeros(n, t, dtype=torch.long, device=dev)
        self.parents = torch.zeros(n, max(self.steps, 1), dtype=torch.long, device=dev)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.last_back = [-1] * b

    def _keep_kv(self, fed: torch.Tensor) -> None:
        """Keep the keys and values the last forward wrote (generated token `fed[n]` of beam n)."""
        layers = self.kwargs["cache"].layers
        if self.kv is None:
            self.kv = [(layer.keys.new_zeros(self.n, layer.keys.shape[1], max(self.steps, 1), layer.keys.shape[3]),
                        layer.values.new_zeros(self.n, layer.values.shape[1], max(self.steps, 1),
                                               layer.values.shape[3])) for layer in layers]
        rows = torch.arange(self.n, device=fed.device)
        for (keys, values), layer in zip(self.kv, layers):
            keys[rows, :, fed] = layer.keys[:, :, -1]
            values[rows, :, fed] = layer.values[:, :, -1]

    def _retrospect(self, table, tokens, glen, running, running_scores, improvable):
        """Keep this step's tables; roll back the prompts whose best beam's summary token repeated r times."""
        b, nb, dev, call = self.b, self.nb, self.device, self.call
        rows = torch.arange(b, device=dev)
        g = glen.clamp(max=self.steps)
        self.tables[rows, g] = table
        self.table_tokens[rows, g] = tokens
        self.banned[rows, g] = False
        self.beams[rows, g] = running[:, :, self.prompt:self.prompt + self.beams.shape[-1]]
        flat, gf = torch.arange(self.n, device=dev), g.repeat_interleave(nb)
        self.windows[flat, gf] = call.log_products
        self.where_then[flat, gf] = call.where
        self.repeats_then[flat, gf] = call.repeats
        best = torch.arange(b, device=dev) * nb
        due = (call.repeats[best] >= self.cfg.threshold) & (glen < self.steps) & improvable[:, 0] & \
            (call.where[best] + 1 < glen)
        if not bool(due.any()):
            return table, tokens, glen, running, running_scores
        table, tokens = table.clone(), tokens.clone()
        for r in due.nonzero().flatten().tolist():
            s = int(call.where[best[r]])
            if len(call.record.rollbacks[r]) >= self.cfg.max_rollbacks or s < self.last_back[r]:
                continue
            self._roll_back(r, s, int(glen[r]), running)
            m = s + 1
            table[r], tokens[r] = self.tables[r, m].masked_fill(self.banned[r, m], float("-inf")), self.table_tokens[r, m]
            glen[r] = m
            self.last_back[r] = s
        return table, tokens, glen, running, running_scores

    def _roll_back(self, r: int, s: int, now: int, running: torch.Tensor) -> None:
        """Prompt r back to the step that chose generated token s + 1 (its beams, window state, cache)."""
        nb, call, m = self.nb, self.call, s + 1
        flat = torch.arange(r * nb, (r + 1) * nb, device=self.device)
        # the pair (beam then, token) the best beam came from, banned from that step's table
        lineage = torch.tensor([0], device=self.device)
        for g in range(now - 1, m - 1, -1):
            lineage = self.parents[flat[lineage], g]
        token = running[r, 0, self.prompt + m]
        cands = self.table_tokens[r, m].view(nb, -1)
        self.banned[r, m].view(nb, -1)[lineage[0]] |= cands[lineage[0]] == token
        call.record.rollbacks[r].append((s, now))
        # the beams as they were: generated tokens, window state
        running[r, :, self.prompt:self.prompt + self.beams.shape[-1]] = self.beams[r, m]
        running[r, :, self.prompt + m:] = self.fill
        call.log_products[flat] = self.windows[flat, m]
        call.where[flat] = self.where_then[flat, m]
        call.repeats[flat] = self.repeats_then[flat, m]
        beams = torch.arange(nb, device=self.device)
        # the cache: tokens 0..s of each beam back in slots prompt..prompt+s, the later ones masked;
        # transformers already extended the mask and positions by the next token's: it keeps its slot (the cache's end)
        start, end = self.prompt, self.kwargs["cache"].get_seq_length()
        mask = self.kwargs.get("attention_mask")
        if mask is None:  # transformers leaves it out for an unpadded batch: holes need one
            mask = self.kwargs["attention_mask"] = torch.ones(self.n, end + 1, dtype=torch.long, device=self.device)
        for g in range(s, -1, -1):
            src = flat[beams]
            for (keys, values), layer in zip(self.kv, self.kwargs["cache"].layers):
                layer.keys[flat, :, start + g] = keys[src, :, g]
                layer.values[flat, :, start + g] = values[src, :, g]
            beams = self.parents[src, g]
        mask[flat, start:start + m] = 1
        mask[flat, start + m:end] = 0
        call.slots[flat, :m] = torch.arange(start, start + m, device=self.device)
        positions = self.kwargs.get("position_ids")
        if positions is not None:  # the next token follows generated token s
            positions[..., flat, -1] = positions[..., flat, start - 1] + m + 1


register_method(name="opera", config=OPERA, runtime=OPERARuntime, summary="over-trust penalty and retrospection-"
                "allocation (Huang et al., CVPR 2024): beam search penalising attention aggregation, with roll-back")
