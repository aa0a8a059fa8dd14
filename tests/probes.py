"""Test-only methods that exercise the eager-query path without changing attention."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmfix.methods.base import EditsQueries, MethodCall, MethodConfig, Runtime
from vlmfix.methods.registry import register_method


def on_edit(runtime, wrapper) -> None:
    """Make every call of `runtime` edit through `wrapper(edit, block, state, queries, probs)` (`edit` is the
    call's own)."""
    start = runtime.start

    def starting(state):
        call = start(state)
        edit = call.edit
        call.edit = lambda block, state, queries, probs: wrapper(edit, block, state, queries, probs)
        return call

    runtime.start = starting


def observed(config_cls: type) -> type:
    """`config_cls` (a method config whose calls edit queries) with a `seen` list of each edit it made:
    (block, prompt positions of the queries (None at a decoding step), the rows before (a copy), after, the
    prompt length), and `bound`, the runtime it was last bound to."""

    @dataclass
    class Observed(config_cls):
        seen: list = field(default_factory=list, repr=False)

        def bind(self, target):
            runtime = self.bound = super().bind(target)

            def recording(edit, block, state, queries, probs):
                before = probs.clone()  # the edit may work in place
                out = edit(block, state, queries, probs)
                positions = None if queries.positions is None else queries.positions.tolist()
                self.seen.append((block, positions, before, out.clone(), state.prompt_len))
                return out

            on_edit(runtime, recording)
            return runtime

    Observed.__name__ = Observed.__qualname__ = f"Observed{config_cls.__name__}"
    return Observed


@dataclass
class EveryRow(MethodConfig):
    """Asks for every query row at every layer, in prefill and decode, and records the probs of
    the last query; changes nothing. Its outputs must equal the fast path's."""

    seen: list = field(default_factory=list)


class _EveryRowCall(MethodCall, EditsQueries):
    def queries(self, block, state):
        return range(block.q_len)

    def edit(self, block, state, queries, probs):
        positions = () if queries.positions is None else tuple(queries.positions.tolist())
        self.runtime.config.seen.append((block.phase.value, block.layer, positions, probs[:, :, -1].clone()))
        return probs


class _EveryRow(Runtime):
    call = _EveryRowCall


@dataclass
class LastRow(MethodConfig):
    """Asks only for the last query (a decode-step shape) and changes nothing."""


class _LastRowCall(MethodCall, EditsQueries):
    def queries(self, block, state):
        return range(block.q_len - 1, block.q_len)

    def edit(self, block, state, queries, probs):
        return probs


class _LastRow(Runtime):
    call = _LastRowCall


register_method(name="every_row", config=EveryRow, runtime=_EveryRow, listed=False)
register_method(name="last_row", config=LastRow, runtime=_LastRow, listed=False)
