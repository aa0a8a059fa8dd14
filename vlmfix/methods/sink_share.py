"""A report probe: how much of the image attention lands on visual sinks (Kang et al., ICLR 2025,
Sec. 3: visual sinks soak up attention without carrying content). It changes no output.

For each layer l >= 2 and batch row, over the prompt's text rows after the image (up to the row's
last real token) and all heads:
share_l = sum A[i, V_l] / sum A[i, I] (V_l the visual sinks, I the image tokens); NaN for a row
without an image, or whose image got no attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmfix.methods.base import (MethodCall, Block, CallState, EditsQueries, MethodConfig, Phase, Queries, Runtime, Target, check_tau_field,
                   raise_problems)


@dataclass
class SinkShare(MethodConfig):
    """The visual-sink share of image attention per layer (tau: None = the one attach resolved)."""

    tau: float | str | None = None

    name = "sink_share"

    def __post_init__(self) -> None:
        raise_problems("SinkShare", [check_tau_field("tau", self.tau)])

    def bind(self, target: Target) -> "SinkShareRuntime":
        return SinkShareRuntime(self, target)


@dataclass
class SinkShareRecord:
    """`shares[layer]`: (B,) fp32 on the CPU, the share of the image attention on visual sinks (never requires grad)."""

    shares: dict[int, torch.Tensor] = field(default_factory=dict)


class SinkShareRuntime(Runtime, MethodCall, EditsQueries):
    uses_sinks = True

    def start(self, state: CallState):  # TEMPORARY shim: the runtime is its own call
        self.record = self._begin(state)
        return self

    def _begin(self, state: CallState) -> SinkShareRecord:
        return SinkShareRecord()

    def queries(self, block: Block, state: CallState) -> range | None:
        first = state.first_after_image
        if block.phase is not Phase.PREFILL or block.layer < 2 or first is None:
            return None
        return range(max(first - block.q_start, 0), block.q_len)

    def edit(self, block: Block, state: CallState, rows: Queries, probs: torch.Tensor) -> torch.Tensor:
        tau = self.target.tau if self.config.tau is None else self.config.tau
        sinks = state.sink_mask(block.layer, tau).to(probs.device)
        image = state.image_mask(probs.device)
        weight = state.text_after_image(rows.positions).to(probs)  # (B, R)
        p = state.prompt_len
        per_key = (probs[..., :p].detach().sum(1) * weight[..., None]).sum(1)  # (B, P)
        on_image = (per_key * image).sum(-1)
        on_sinks = (per_key * (image & sinks)).sum(-1)
        self.record.shares[block.layer] = torch.where(on_image > 0, on_sinks / on_image, float("nan")).cpu()
        return probs


SinkShareRuntime.call = SinkShareRuntime  # TEMPORARY shim
from vlmfix.methods.registry import register_method  # noqa: E402  TEMPORARY shim

register_method(name="sink_share", config=SinkShare, runtime=SinkShareRuntime, listed=False)
