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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from ..state import Block, CallState, Phase, Rows

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..slots import SlotView

__all__ = ["Block", "Buffers", "CallState", "EditsRows", "MethodConfig", "MovesTokens", "NeedsPrepass", "Phase",
           "ReadsInputs", "ReplacesMask", "Rows", "Runtime", "Target"]


@dataclass(frozen=True)
class Target:
    """What a config is bound to: the model's adapter and the sink threshold attach resolved."""

    adapter: "Adapter"
    tau: float | str


class MethodConfig:
    """Base class of method configs (plain dataclasses; `bind` makes the runtime)."""

    name: ClassVar[str] = "method"

    def bind(self, target: Target) -> "Runtime":
        raise NotImplementedError


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
        """Edit `probs` (B, H, R, K: rows `rows`, keys in prompt positions then generated tokens); may work in place."""
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
