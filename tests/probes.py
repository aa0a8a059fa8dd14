"""Test-only methods that exercise the eager-row path without changing attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmfix.methods.base import Method


@dataclass
class EveryRow(Method):
    """Asks for every query row at every layer, in prefill and decode, and records the probs of
    the last row; changes nothing. Its outputs must equal the fast path's."""

    seen: list = field(default_factory=list)
    name = "every_row"

    def eager_rows(self, state, layer, q_start, q_len):
        return torch.arange(q_len)

    def probs(self, state, layer, positions, probs):
        self.seen.append((state.phase, layer, tuple(positions.tolist()), probs[:, :, -1].clone()))
        return probs


@dataclass
class LastRow(Method):
    """Asks only for the last query row (a decode-step shape) and changes nothing."""

    name = "last_row"

    def eager_rows(self, state, layer, q_start, q_len):
        return torch.tensor([q_len - 1])
