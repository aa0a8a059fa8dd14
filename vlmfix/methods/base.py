"""The method protocol: what a new method implements, in one module (peft-style).

A method has two halves:

- a **config** (`MethodConfig` subclass): a dataclass the user writes, with the paper's defaults.
  `attach` never modifies it; the same config can be attached to several models;
- a **runtime** (`Runtime` subclass) that `config.bind(target)` returns at attach: it holds what was
  resolved for that model (layers, thresholds, presets, trends) and, per call, the tensors it needs
  and a typed record of what it did (`state.record(VAR)`).

A runtime declares what it does by the capabilities it subclasses, each a small interface whose
calls receive one `Block` (layer, phase, query start and length, key length):

- `EditsRows`: `rows(block, state)` names the block rows it edits (a `range`, or None for none);
  those rows are computed in eager form (fp32 softmax) and handed to `edit(block, state, rows,
  probs)` after the softmax; every other row stays on the model's own attention function;
- `ReplacesMask`: `mask(block, state, attention_mask)` gives a replacement mask (pruning) or None;
- `MovesTokens`: in-place pruning, which gathers the kept tokens entering some layers and gives a
  `SlotView` so that other methods keep seeing prompt positions;
- `ReadsInputs`: `read_inputs(state, inputs)` sees the prefill's model inputs (pixel values);
- `NeedsPrepass`: `prepass_until()` asks for a pre-pass over the prompt up to a layer.

Per call, `begin(state)` runs at the prefill (build the call's tensors, return the fresh record)
and `after_prefill(state)` once the prefill forward is done (the one place a runtime may read a
tensor value on the host). A decoding step (`Phase.DECODE`) reads only tensors: no Python loop over
rows or heads, no host read, no shape that depends on data, so that it runs inside compiled
generation. Runtimes run in ascending `order` (equal orders keep the order given to attach).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Sequence

import torch

from ..state import Block, CallState, Phase, Rows

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..slots import SlotView

__all__ = ["Block", "Buffers", "CallState", "EditsRows", "MethodConfig", "MovesTokens", "NeedsPrepass", "Phase",
           "ReadsInputs", "ReplacesMask", "Rows", "Runtime", "Target", "check_choice", "check_layers", "check_number",
           "check_tau_field", "is_int", "is_number", "raise_problems"]


@dataclass(frozen=True)
class Target:
    """What a config is bound to: the model's adapter and the sink threshold attach resolved."""

    adapter: "Adapter"
    tau: float | str


class MethodConfig:
    """Base class of method configs (plain dataclasses; `bind` makes the runtime).

    A config checks its own fields when it is constructed (`__post_init__`, with the helpers below:
    types and ranges, every mistake named in one `ValueError`); nothing is truncated or coerced.
    What depends on a model (a layer beyond its depth) is checked when `attach` binds it.
    """

    name: ClassVar[str] = "method"

    def bind(self, target: Target) -> "Runtime":
        raise NotImplementedError


# -- field checks for `__post_init__`: each gives a message (None when the value is fine) -------------
def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (int, float or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_number(name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False) -> str | None:
    """`value` is a finite number >= lo (> lo when `lo_open`) and, given `hi`, <= hi."""
    if hi is None:
        where = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        where = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if not is_number(value):
        return f"{name} must be a finite number {where}, got {value!r}"
    if (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        return f"{name} must be {where}, got {value!r}"
    return None


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> str | None:
    """`value` is one of `choices`."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        return f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
    return None


def check_layers(name: str, value: Any, lo: int = 0) -> str | None:
    """`value` is a non-empty list of distinct integer layer indices >= `lo` (an empty one would do nothing)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        return f"{name} must be a list of layer indices (ints), got {value!r}"
    items = list(value)
    if not items:
        return f"{name} is empty (it would do nothing): give at least one layer"
    wrong = [x for x in items if not is_int(x)]
    if wrong:
        return f"{name} must hold integer layer indices, got {', '.join(map(repr, wrong))}"
    low = [int(x) for x in items if x < lo]
    if low:
        return f"{name} must be >= {lo}, got {', '.join(map(str, low))}"
    if len(set(int(x) for x in items)) < len(items):
        return f"{name} lists a layer more than once: {list(items)}"
    return None


def check_tau_field(name: str, value: Any) -> str | None:
    """A sink threshold field: None (the one attach resolves), a finite number > 0, "scaled" or "bos:F"
    (`vlmfix.sinks.check_tau`; "scaled" is resolved against the model's width at bind)."""
    from ..sinks import check_tau

    if value is None or isinstance(value, str) and value.strip().lower() == "scaled":
        return None
    if not isinstance(value, str) and not is_number(value):
        return f"{name} must be None, a finite number > 0, 'scaled' or 'bos:F', got {value!r}"
    try:
        check_tau(value)
    except ValueError as err:
        return str(err)
    return None


def raise_problems(owner: str, problems: Iterable[str | None]) -> None:
    """Raise one ValueError naming every mistake found in a config of type `owner` (none: return)."""
    found = [p for p in problems if p]
    if len(found) == 1:
        raise ValueError(f"{owner}: {found[0]}")
    if found:
        raise ValueError(f"{owner} has {len(found)} mistakes: " + "; ".join(found))


class Runtime:
    """A config bound to one model. `config` is the user's config, untouched; `record` the current call's."""

    order: ClassVar[int] = 0
    #: ask attach to track the sink scores phi of the prefill residual stream
    uses_sinks: ClassVar[bool] = False
    #: needs the tokenizer (the user's question as words): attach refuses it without one
    needs_tokenizer: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, target: Target):
        self.config = config
        self.target = target
        self.record: Any = None

    def begin(self, state: CallState) -> Any:
        """A new call's prefill starts: build the call's tensors; return this call's record (or None)."""
        return None

    def after_prefill(self, state: CallState) -> None:
        """The prefill forward finished (decoding steps follow)."""

    def resolved(self) -> dict[str, Any]:
        """The settings attach resolved for this model (what the config left as None), as plain data."""
        return {}

    #: what `acted` reports, in words that follow "items where the method ..." (e.g. "moved attention")
    acts: ClassVar[str] = ""

    def acted(self, record: Any) -> list[bool] | None:
        """Per batch row of the call that made `record` (this runtime's record): whether the method changed
        anything there (None: the method does not say). Evaluation runs count these per item and warn when
        a method acted on no item."""
        return None

    def check_combination(self, others: Sequence["Runtime"]) -> None:
        """Raise ValueError when this method cannot run beside the `others` attached with it."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.config!r}>"


class EditsRows:
    """Capability: edit post-softmax fp32 attention rows (B, H, R, K) of some query rows."""

    def rows(self, block: Block, state: CallState) -> range | None:
        """The block rows (0 .. q_len - 1) this runtime edits in `block`; None for none (the fast path)."""
        raise NotImplementedError

    def edit(self, block: Block, state: CallState, rows: Rows, probs: torch.Tensor) -> torch.Tensor:
        """The edited rows of `probs` (B, H, R, K: rows `rows`, keys in prompt positions then generated tokens):
        `probs` itself, or a new tensor. Written in place only when `probs.requires_grad` is False (the usual
        inference case, where it saves the copies); otherwise it is the softmax's output, which autograd
        needs. A record keeps detached values (a record never requires grad)."""
        raise NotImplementedError


class ReplacesMask:
    """Capability: replace the attention mask of a layer call."""

    def mask(self, block: Block, state: CallState, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError


class MovesTokens:
    """Capability: remove tokens from the hidden states of some layers (in-place pruning)."""

    def moved_layers(self) -> tuple[int, ...]:
        """Decoder layers whose prefill inputs `before_layer` rewrites."""
        raise NotImplementedError

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


class NeedsPrepass:
    """Capability: a pre-pass over the prompt up to a layer, before the real prefill (no cache written)."""

    def prepass_until(self) -> int | None:
        raise NotImplementedError


class Buffers:
    """A runtime's preallocated tensors, reused from call to call while their shape holds.

    What a decoding step reads or accumulates lives here, at a stable address (marked static for
    `torch.compile`), so that compiled generation with CUDA graphs replays without copies; a
    record that views a buffer is frozen (cloned) before the next call reuses it.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def zeros(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The buffer `name`, zeroed (allocated anew when shape, dtype or device changed)."""
        t = self._tensors.get(name)
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
            t = self._tensors[name] = torch.zeros(shape, dtype=dtype, device=device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(t)
            return t
        return t.zero_()
