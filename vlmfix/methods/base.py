"""The hooks a vlmfix method may implement (peft-style: a config dataclass plus the code applying it).

A method is a dataclass whose fields are its configuration. `attach()` calls the hooks below;
the defaults do nothing, so a method overrides only what it needs:

- `on_prefill(state)`: a new call started; read the spans, reset this method's records;
- `prepass_until()`: a layer, when the method needs a pre-pass over the prompt up to it (GIFT
  when a boost layer precedes a saliency layer); the state's phase is then "prepass";
- `eager_rows(state, layer, q_start, q_len)`: which query rows of the current block (indices
  0..q_len-1; absolute position = q_start + index) this method edits at `layer`; None for none.
  Only those rows are computed in eager form, everything else stays on the fast path;
- `scores(state, layer, positions, scores)`: edit pre-softmax fp32 scores (B, H, R, K) of the rows
  at absolute `positions`;
- `probs(state, layer, positions, probs)`: edit post-softmax fp32 rows (B, H, R, K);
- `on_inputs(state, inputs)`: the prefill's model inputs (pixel values, ...), after `on_prefill`;
- `mask(state, layer, q_start, q_len, key_len, attention_mask, device)`: a replacement attention mask
  (on `device`, the device of the layer's queries)
  for the current block of `layer` (pruning), or None to keep the model's;
- `hooked_layers()` / `before_layer(state, layer, args, kwargs)`: decoder layers whose prefill
  inputs the method rewrites (in-place pruning); return (args, kwargs) or None;
- `view(state, layer, q_len, kv_len)`: a `vlmfix.slots.SlotView` when the method moved this layer's
  tokens (in-place pruning), so that every method's rows and keys stay in prompt positions;
- `check_combination(methods)`: raise ValueError when it cannot run beside the other methods.

`uses_sinks` asks attach to track the sink scores phi of the prefill residual stream. Methods
run in ascending `order` (equal orders keep the order given to attach).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from ..state import CallState

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..slots import SlotView


class Method:
    name: ClassVar[str] = "method"
    uses_sinks: ClassVar[bool] = False
    order: ClassVar[int] = 0

    def validate(self, adapter: "Adapter") -> None:
        """Raise ValueError when the configuration cannot apply to this model (`adapter` gives
        num_layers, num_heads, hidden_size, ...)."""

    def on_prefill(self, state: CallState) -> None:
        """A new call started."""

    def prepass_until(self) -> int | None:
        """The last layer a pre-pass over the prompt must reach before the real prefill (phase
        "prepass", no cache written), or None when the method needs no pre-pass."""
        return None

    def eager_rows(self, state: CallState, layer: int, q_start: int, q_len: int) -> torch.Tensor | None:
        return None

    def scores(self, state: CallState, layer: int, positions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def probs(self, state: CallState, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def on_inputs(self, state: CallState, inputs: dict[str, Any]) -> None:
        """The inputs of the prefill forward."""

    def mask(self, state: CallState, layer: int, q_start: int, q_len: int, key_len: int,
             attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        return None

    def hooked_layers(self) -> tuple[int, ...]:
        return ()

    def before_layer(self, state: CallState, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None

    def view(self, state: CallState, layer: int, q_len: int, kv_len: int) -> "SlotView | None":
        return None

    def check_combination(self, methods: Sequence["Method"]) -> None:
        """Raise ValueError when this method cannot be attached together with `methods`."""
