"""A report probe: how much of the image attention lands on visual sinks (Kang et al., ICLR 2025,
Sec. 3: visual sinks soak up attention without carrying content). It changes no output.

For each layer l >= FIRST_SINK_LAYER (2) and batch row, over the prompt's text queries after the image
(up to the row's last real token) and all heads:
share_l = sum A[i, V_l] / sum A[i, I] (V_l the visual sinks, I the image tokens); NaN for a row
without an image, or whose image got no attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlmfix.methods.base import (FIRST_SINK_LAYER, Block, CallState, MethodCall, MethodConfig, ObservesQueries, Phase,
                                 Queries, Record, Runtime, Target, check_tau_field, raise_problems)
from vlmfix.methods.registry import register_method


@dataclass
class SinkShare(MethodConfig):
    """The visual-sink share of image attention per layer (tau: None = the one attach resolved)."""

    tau: float | str | None = None


    def __post_init__(self) -> None:
        raise_problems("SinkShare", [check_tau_field("tau", self.tau)])


@dataclass
class SinkShareRecord(Record):
    """`shares[layer]`: (B,) fp32 on the CPU, the share of the image attention on visual sinks (never requires
    grad); `batch_size`: the call's batch rows."""

    shares: dict[int, torch.Tensor] = field(default_factory=dict)
    batch_size: int = 0

    def row(self, row: int) -> dict[str, Any]:
        """Batch row `row`'s share per layer (NaN: no image, or no attention on it)."""
        return {"share": {layer: float(share[row]) for layer, share in self.shares.items()}}

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "rows": [self.row(r) for r in range(self.batch_size)]}


class SinkShareCall(MethodCall, ObservesQueries):
    """One call of the probe: reads the prefill's text queries after the image in every layer with sinks."""

    record_type = SinkShareRecord

    record: SinkShareRecord

    def __init__(self, runtime: "SinkShareRuntime", state: CallState):
        self.tau = runtime.tau
        super().__init__(runtime, SinkShareRecord(batch_size=state.batch_size))

    def queries(self, block: Block, state: CallState) -> range | None:
        first = state.first_after_image
        if block.phase is not Phase.PREFILL or block.layer < FIRST_SINK_LAYER or first is None:
            return None
        return range(max(first - block.q_start, 0), block.q_len)

    def observe(self, block: Block, state: CallState, queries: Queries, probs: torch.Tensor) -> None:
        sinks = state.sink_mask(block.layer, self.tau).to(probs.device)
        image = state.image_mask(probs.device)
        weight = state.text_after_image(queries.positions).to(probs)  # (B, R)
        p = state.prompt_len
        per_key = (probs[..., :p].detach().sum(1) * weight[..., None]).sum(1)  # (B, P)
        on_image = (per_key * image).sum(-1)
        on_sinks = (per_key * (image & sinks)).sum(-1)
        self.record.shares[block.layer] = torch.where(on_image > 0, on_sinks / on_image, float("nan")).cpu()


class SinkShareRuntime(Runtime):
    """The probe bound to a model: its resolved tau."""

    uses_sinks = True
    call = SinkShareCall

    def __init__(self, config: SinkShare, target: Target):
        from vlmfix.core.sinks import check_tau

        super().__init__(config, target)
        self.tau = target.tau if config.tau is None else check_tau(config.tau, target.adapter.hidden_size)

    def resolved(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def start(self, state: CallState) -> SinkShareCall:
        return SinkShareCall(self, state)


register_method(name="sink_share", config=SinkShare, runtime=SinkShareRuntime,
                summary="report probe: the share of the image attention on visual sinks per layer", listed=False)
