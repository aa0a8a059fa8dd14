"""Test-only methods that exercise the eager-row path without changing attention."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmfix.methods.base import EditsRows, MethodConfig, Runtime


@dataclass
class EveryRow(MethodConfig):
    """Asks for every query row at every layer, in prefill and decode, and records the probs of
    the last row; changes nothing. Its outputs must equal the fast path's."""

    seen: list = field(default_factory=list)
    name = "every_row"

    def bind(self, target):
        return _EveryRow(self, target)


class _EveryRow(Runtime, EditsRows):
    def rows(self, block, state):
        return range(block.q_len)

    def edit(self, block, state, rows, probs):
        positions = () if rows.positions is None else tuple(rows.positions.tolist())
        self.config.seen.append((block.phase.value, block.layer, positions, probs[:, :, -1].clone()))
        return probs


@dataclass
class LastRow(MethodConfig):
    """Asks only for the last query row (a decode-step shape) and changes nothing."""

    name = "last_row"

    def bind(self, target):
        return _LastRow(self, target)


class _LastRow(Runtime, EditsRows):
    def rows(self, block, state):
        return range(block.q_len - 1, block.q_len)

    def edit(self, block, state, rows, probs):
        return probs
