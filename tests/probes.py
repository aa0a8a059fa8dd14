"""Test-only methods that exercise the eager-row path without changing attention."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmfix.methods.base import EditsRows, MethodConfig, Runtime


def observed(config_cls: type) -> type:
    """`config_cls` (a method config with `EditsRows`) with a `seen` list of each edit it made:
    (block, prompt positions of the rows (None at a decoding step), the rows before (a copy), after, the
    prompt length), and `runtime`, what it was last bound to."""

    @dataclass
    class Observed(config_cls):
        seen: list = field(default_factory=list, repr=False)

        def bind(self, target):
            runtime = self.runtime = super().bind(target)
            edit = runtime.edit

            def recording(block, state, rows, probs):
                before = probs.clone()  # the edit may work in place
                out = edit(block, state, rows, probs)
                positions = None if rows.positions is None else rows.positions.tolist()
                self.seen.append((block, positions, before, out.clone(), state.prompt_len))
                return out

            runtime.edit = recording
            return runtime

    Observed.__name__ = Observed.__qualname__ = f"Observed{config_cls.__name__}"
    return Observed


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
