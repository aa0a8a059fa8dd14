"""The method protocol: what `attach` binds and what the attention function calls (peft-style).

A method has three parts, each with one job:

- a **config** (`MethodConfig` subclass): a dataclass the user writes, with the paper's defaults,
  checked in `__post_init__`. `attach` never modifies it; one config can be attached to several
  models. Its `name` and runtime class come from its registration (`vlmfix.methods.register_method`);
- a **runtime** (`Runtime` subclass) that `config.bind(target)` makes at attach: what was resolved
  for that model (layers, thresholds, presets, trends) and nothing about any call;
- a **call** (`MethodCall` subclass) that `runtime.begin(state)` makes at each prefill: that call's
  tensors and its `record` (a `Record`). It lives in `CallState.calls` only, so a call never sees
  another call's tensors, and a record stays valid after the next call starts.

A call declares what it does by the capabilities it subclasses. Each receives the layer call's
`Block` (layer, phase, first query position, query count, key count) and the `CallState`:

- `ObservesQueries`: `queries(block, state)` names the block's query rows it reads (a `range`, or
  None for none); those rows are computed in eager form (fp32 softmax) and `observe(block, state,
  queries, probs)` reads them; it changes nothing;
- `EditsQueries`: the same rows, handed to `edit(block, state, queries, probs)` after the softmax,
  which returns the edited probabilities;
- `BiasesScores`: the same rows, handed to `bias(block, state, queries, scores)` before the softmax
  (scaled and masked fp32 scores, masked entries at the fp32 minimum), which returns the new scores;
- `ReplacesMask`: `mask(block, state, attention_mask)` gives a replacement mask (pruning) or None;
- `MovesTokens`: in-place pruning: `before_layer` gathers the kept tokens entering a layer and `view`
  gives a `SlotView`, so that every other method keeps naming tokens by prompt position;
- `ReadsInputs`: `read_inputs(state, inputs)` sees the prefill's model inputs (pixel values);
- `CombinesLogits`: `combine(logits, branch)` merges the next-token logits of the real rows with those of
  the contrast branch its runtime declares (`Runtime.branches()`, e.g. the prompt without its image; see
  `vlmfix.core.contrast`: the branch rows are extra rows of the same forward, which a call's attention
  capabilities see only when its class asks for them, `MethodCall.batch_rows`).

Queries no call asks for stay on the model's own attention function (the fast path). A
runtime may also ask, from what it resolved, for a pre-pass over the prompt (`prepass_until`) or
for the tokens it moves in some layers (`moved_layers`).

On the vision side, before the decoder (`vlmfix.core.vision`):

- `ReadsVision`: `read_vision(state, images)` reads, once per prefill and per image, the vision tower at
  the layer its runtime names (`vision_layer`): queries, keys, attention (per head or mean), hidden states,
  and which image token each tower token feeds (`vlmfix.core.vision.VisionImage`), before the decoder;
- `EditsFeatures`: `edit_features(state, image, features)` may replace an image's (N, D) features after the
  multi-modal projector, before they enter the decoder. A `MovesTokens` call may act at decoder layer 0
  and record token merges (`SlotMap.owner`, `CallState.merged_into`; `vlmfix.core.moves.InPlaceMoves`).
  Families whose adapter does not map the tower to the image tokens refuse both at attach.

Words: a *row* is a batch row (one prompt of the batch, `RowLayout`); a *query* is a query row of
an attention block (one token's attention over the keys, `Queries`).

Timing: `begin` runs at the prefill before any layer; `MethodCall.after_prefill` once the prefill
forward is done (the one place a call may read a tensor value on the host). A decoding step
(`Phase.DECODE`) reads only tensors: no Python loop over rows or heads, no host read, no shape that
depends on data, so that it runs inside compiled generation. Runtimes run in ascending `order`
(equal orders keep the order given to attach).

A record answers for itself what the reports need (`Record`): whether the method acted on each
row, a row's summary and notes in words, its heat maps and its JSON; the CLI, the heat maps,
lmms-eval's sample log and the evaluation runner loop over records and name no method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

import torch

from vlmfix.core.state import Block, CallState, Phase, Queries

if TYPE_CHECKING:
    from pathlib import Path

    from vlmfix.adapters import Adapter
    from vlmfix.core.slots import SlotView

__all__ = ["Block", "BiasesScores", "CallState", "CombinesLogits", "EditsFeatures", "EditsQueries", "HeatMaps",
           "MethodCall", "MethodConfig", "MovesTokens", "ObservesQueries", "Phase", "Queries", "ReadsInputs", "ReadsVision",
           "Record", "ReplacesMask", "Runtime", "Target"]


@dataclass(frozen=True)
class Target:
    """What a config is bound to: the model's adapter and the sink threshold attach resolved."""

    adapter: "Adapter"
    tau: float | str


class MethodConfig:
    """Base class of method configs (plain dataclasses; `bind` makes the runtime).

    A config checks its own fields when it is constructed (`__post_init__`, with the helpers of
    `vlmfix.methods.base`: types and ranges, every mistake named in one `ValueError`); nothing is
    truncated or coerced. What depends on a model (a layer beyond its depth) is checked when `attach`
    binds it. `name` and `runtime` are set by `vlmfix.methods.register_method`.
    """

    name: ClassVar[str] = ""
    runtime: ClassVar[type["Runtime"] | None] = None

    def bind(self, target: Target) -> "Runtime":
        """The runtime of this config on the model of `target` (its registered runtime class)."""
        if self.runtime is None:
            raise TypeError(f"{type(self).__name__} is not registered: call vlmfix.methods.register_method(name=..., "
                            f"config={type(self).__name__}, runtime=...) once, where the method is defined")
        return self.runtime(self, target)


class HeatMaps(Protocol):
    """What a record draws its heat maps with (`vlmfix.viz.Canvas`): one image grid of batch row `row` of a call.

    - `state`: the call's `CallState`; `row`: the batch row drawn; `hints`: how the calling command sets
      tau and the sink dims (keys `tau_hint`, `dims_hint`);
    - `grid(file, values, title, ...)`: draws `values` (B, prompt_len, over prompt positions) on the row's
      image grid into `file` and returns its path (caption lines may name `{total}`, `{count}`, `{marked}`:
      the sum, the cells and the marked cells of the grid);
    - `sinks(file, layer)`: the sink scores phi at `layer`, sinks outlined (same return).
    """

    state: CallState
    row: int
    hints: dict[str, str]

    def grid(self, file: str, values: torch.Tensor, title: str, *, vmin: float | None = None,
             vmax: float | None = None, marked: torch.Tensor | None = None, bar: str | None = None,
             legend: Sequence[tuple[str, str]] = (), caption: Sequence[str] = (), alpha: float | None = None) -> "Path":
        ...

    def sinks(self, file: str, layer: int) -> "Path":
        ...


class Record:
    """What one method did in one call. Every report reads a method through these (none names its type).

    - `method`: the method's registered name (set by `MethodCall`);
    - `acts`: what `acted` reports, in words that follow "items where the method ..." ("" when the
      method does not say);
    - `acted()`: per batch row, whether the method changed anything there (None: it does not say);
      evaluation runs count these and warn when a method acted on no item;
    - `row(r)`: a plain-data summary of batch row r (JSON-able; lmms-eval's sample log, `vlmfix
      generate`), keys without the method's name (the caller prefixes it);
    - `notes(r)`: in words, why the method left row r alone or where it did not act as configured;
    - `heat_maps(maps)`: draws its heat maps of batch row `maps.row` and returns one line each (where a
      map is, or why there is none);
    - `to_json()`: the whole record as plain data;
    - `freeze()`: copy what views the runtime's reused buffers, before the next call rewrites them.
    """

    method: str = ""
    acts: ClassVar[str] = ""

    def acted(self) -> list[bool] | None:
        return None

    def row(self, row: int) -> dict[str, Any]:
        return {}

    def notes(self, row: int) -> list[str]:
        return []

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        return []

    def to_json(self) -> dict[str, Any]:
        rows = self.acted()
        n = len(rows) if rows is not None else 0
        return {"method": self.method, "rows": [{**self.row(r), "notes": self.notes(r)} for r in range(n)]}

    def freeze(self) -> None:
        """Copy what views reused buffers (nothing by default)."""


class MethodCall:
    """One call of one runtime: the tensors `begin` built for it and its `record` (see the module docstring).
    `record_type` is the class of its records (reports read its `acts` before any call)."""

    record_type: ClassVar[type[Record]] = Record
    #: the batch rows its attention capabilities see when a contrast branch runs (`vlmfix.core.contrast`):
    #: "real" (the B real rows; the default), "branch" (the B branch rows only) or "all" (2B: real rows first,
    #: `CallState.branch_flags()` marks the branch rows)
    batch_rows: ClassVar[str] = "real"

    def __init__(self, runtime: "Runtime", record: Record | None = None):
        self.runtime = runtime
        self.record = record
        if record is not None:
            record.method = runtime.config.name

    def after_prefill(self, state: CallState) -> None:
        """The prefill forward finished (decoding steps follow)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.runtime.config!r}>"


class Runtime:
    """A config bound to one model: `config` is the user's config, untouched; the rest what was resolved."""

    order: ClassVar[int] = 0
    #: ask attach to track the sink scores phi of the prefill residual stream
    uses_sinks: ClassVar[bool] = False
    #: needs the tokenizer (the user's question as words): attach refuses it without one
    needs_tokenizer: ClassVar[bool] = False
    #: the class of this runtime's calls (attach reads its capabilities before any call)
    call: ClassVar[type[MethodCall]] = MethodCall
    #: the vision tower's encoder layer a `ReadsVision` call reads (negative from the last; None: the layer that
    #: feeds the projector)
    vision_layer: int | None = None

    def __init__(self, config: MethodConfig, target: Target):
        self.config = config
        self.target = target
        self._last: Record | None = None

    def begin(self, state: CallState) -> MethodCall:
        """A new call's prefill starts: its call object (its tensors, its record). The previous call's
        record is frozen first (`Record.freeze`), so that reused buffers never rewrite it."""
        if self._last is not None:
            self._last.freeze()
        call = self.start(state)
        if call.record is not None and not isinstance(call.record, call.record_type) or \
                call.record_type is Record and type(call.record) not in (Record, type(None)):
            raise TypeError(f"{type(call).__name__}.record_type must name the class of its records "
                            f"({type(call.record).__name__}): reports read what the method does from it")
        self._last = call.record
        return call

    def start(self, state: CallState) -> MethodCall:
        """Build this call's object (what `begin` returns)."""
        return self.call(self)

    def resolved(self) -> dict[str, Any]:
        """The settings attach resolved for this model (what the config left as None), as plain data."""
        return {}

    def prepass_until(self) -> int | None:
        """The last layer of a pre-pass over the prompt this runtime needs before the prefill (None: none)."""
        return None

    def moved_layers(self) -> tuple[int, ...]:
        """Decoder layers whose prefill inputs this runtime's calls rewrite (`MovesTokens`; () for none)."""
        return ()

    def shortens_cache(self) -> bool:
        """Whether this runtime's calls remove tokens from the KV cache, which a static cache cannot hold: its call
        class's `MovesTokens.shortens_cache` (a runtime whose one call class serves both pruning forms decides by
        its form)."""
        return issubclass(self.call, MovesTokens) and self.call.shortens_cache

    def branches(self) -> tuple[str, ...]:
        """The contrast branch this runtime's calls combine logits with (`vlmfix.core.contrast`; () for none): one
        kind of `contrast.KINDS`, e.g. ("no_image",), each prompt without its image tokens. Its calls are then
        `CombinesLogits`."""
        return ()

    def decoding(self) -> tuple[Any, Any] | None:
        """This runtime's own decoding loop, or None: (a transformers `custom_generate` callable, a function from
        the generate call's keyword arguments to those the loop runs with, e.g. setting num_beams). While
        attached, `model.generate(...)` runs it (unless the call names its own `custom_generate`)."""
        return None

    def branch_settings(self) -> dict[str, Any]:
        """What the branch kind needs (`vlmfix.core.contrast`): "noised": {"noise_step", "seed"}; "disturbed":
        {"prefix_ids"} (the inserted instruction's token ids); {} for the others."""
        return {}

    def check_combination(self, others: Sequence["Runtime"]) -> None:
        """Raise ValueError when this method cannot run beside the `others` attached with it."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.config!r}>"


# -- capabilities of a call ----------------------------------------------------------------------
class _AsksQueries:
    def queries(self, block: Block, state: CallState) -> range | None:
        """The block's query rows (0 .. q_len - 1) this call reads in `block`; None for none (the fast path)."""
        raise NotImplementedError


class ObservesQueries(_AsksQueries):
    """Capability: read post-softmax fp32 attention rows (B, H, R, K) of some queries, changing nothing."""

    def observe(self, block: Block, state: CallState, queries: Queries, probs: torch.Tensor) -> None:
        raise NotImplementedError


class EditsQueries(_AsksQueries):
    """Capability: edit post-softmax fp32 attention rows (B, H, R, K) of some queries."""

    def edit(self, block: Block, state: CallState, queries: Queries, probs: torch.Tensor) -> torch.Tensor:
        """The edited rows of `probs` (keys in prompt positions then generated tokens): `probs` itself, or a new
        tensor. Written in place only when `probs.requires_grad` is False (the usual inference case, where it
        saves the copies); otherwise it is the softmax's output, which autograd needs. A record keeps
        detached values (a record never requires grad)."""
        raise NotImplementedError


class BiasesScores(_AsksQueries):
    """Capability: change the pre-softmax scores (B, H, R, K) of some queries (scaled by 1/sqrt(d), masked
    entries at the fp32 minimum, which a bias must leave masked)."""

    def bias(self, block: Block, state: CallState, queries: Queries, scores: torch.Tensor) -> torch.Tensor:
        """The new scores: `scores` itself (in place when it does not require grad) or a new tensor."""
        raise NotImplementedError


class ReplacesMask:
    """Capability: replace the attention mask of a layer call."""

    def mask(self, block: Block, state: CallState, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError


class MovesTokens:
    """Capability: remove tokens from the hidden states of the runtime's `moved_layers` (in-place pruning), or
    rewrite a layer's prefill inputs without removing any (`shortens_cache` False: a mask-form pruner that
    chooses from the hidden states; static caches run it)."""

    #: whether the call removes tokens from the KV cache (which a static cache cannot hold)
    shortens_cache: ClassVar[bool] = True

    def before_layer(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """New (args, kwargs) for the layer's prefill forward, or None to leave them."""
        raise NotImplementedError

    def view(self, block: Block, state: CallState) -> "SlotView | None":
        """The slot translation of this layer call when tokens were moved, else None."""
        raise NotImplementedError


class ReadsInputs:
    """Capability: read the prefill's model inputs (pixel values, ...)."""

    def read_inputs(self, state: CallState, inputs: dict[str, Any]) -> None:
        raise NotImplementedError


class CombinesLogits:
    """Capability of a call whose runtime declares `branches()`: combine, at each step (the prefill's last
    position and every decoding step), the real rows' next-token logits with their branch's."""

    def combine(self, logits: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """(B, V) fp32 logits of the real rows and (B, V) of their branch rows -> the (B, V) scores `generate`
        sees for the real rows. Tensor ops only (it runs at every decoding step)."""
        raise NotImplementedError


# -- vision-side capabilities (vlmfix.core.vision): before the decoder ------------------------------
class ReadsVision:
    """Capability: read the vision tower once per prefill, per image (`vlmfix.core.vision.VisionImage`): the
    tower's queries and keys at one encoder layer (its attention computed from them, per head or mean over
    heads), that layer's output hidden states, and the image's projected features. The runtime names the
    layer by `Runtime.vision_layer` (an int, negative from the last layer; None: the adapter's
    `vision_feature_layer`, the one feeding the projector). Called before the decoder's first layer and
    before any `EditsFeatures` call."""

    def read_vision(self, state: CallState, images: Sequence[Any]) -> None:
        raise NotImplementedError


class EditsFeatures:
    """Capability: replace an image's features after the multi-modal projector, before they are scattered into
    the decoder's input embeddings (same shape: one feature per image token)."""

    def edit_features(self, state: CallState, image: Any, features: torch.Tensor) -> torch.Tensor | None:
        """The new features (N, D) of `image` (a `VisionImage`), or None to leave them; `features` are those
        the previous `EditsFeatures` call left (the projector's own for the first)."""
        raise NotImplementedError


#: every capability a call may have
CAPABILITIES = (ObservesQueries, EditsQueries, BiasesScores, ReplacesMask, MovesTokens, ReadsInputs, CombinesLogits,
                ReadsVision, EditsFeatures)
