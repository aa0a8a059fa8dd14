"""What a method author imports, in one module: the protocol (`vlmfix.core.protocol`: config, runtime,
call, record and the capabilities), the field checks a config's `__post_init__` uses, and `Buffers`
(preallocated tensors a decoding step reads). `register_method` (`vlmfix.methods.registry`) makes a
method known to attach's users, the CLI, the presets and lmms-eval.

A new method is one module: a `MethodConfig` dataclass, a `Runtime` (what it resolves for a model), a
`MethodCall` with the capabilities it needs and a `Record`, and one `register_method(...)` call; see
docs/methods.md ("Write your own method").
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Sequence

import torch

from vlmfix.core.protocol import (BiasesScores, Block, CallState, CombinesLogits, EditsFeatures, EditsQueries,
                                  HeatMaps, MethodCall, MethodConfig, MovesTokens, ObservesQueries, Phase, Queries,
                                  ReadsInputs, ReadsVision, Record, ReplacesMask, Runtime, Target)
from vlmfix.core.state import FIRST_SINK_LAYER

__all__ = ["FIRST_SINK_LAYER", "BiasesScores", "Block", "Buffers", "CallState", "CombinesLogits", "EditsFeatures",
           "EditsQueries", "HeatMaps", "MethodCall", "ReadsVision",
           "MethodConfig", "MovesTokens", "ObservesQueries", "Phase", "Queries", "ReadsInputs", "Record", "ReplacesMask",
           "Runtime", "Target", "check_choice", "check_layers", "check_number", "check_tau_field", "is_int", "model_layers",
           "is_number", "raise_problems"]


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
    (`vlmfix.core.sinks.check_tau`; "scaled" is resolved against the model's width at bind)."""
    from vlmfix.core.sinks import check_tau

    if value is None or isinstance(value, str) and value.strip().lower() == "scaled":
        return None
    if not isinstance(value, str) and not is_number(value):
        return f"{name} must be None, a finite number > 0, 'scaled' or 'bos:F', got {value!r}"
    try:
        check_tau(value)
    except ValueError as err:
        return str(err)
    return None


def model_layers(owner: str, what: str, layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """`layers` sorted as ints, each a decoder layer of a model with `num_layers` layers; a ValueError naming
    `owner` and `what` (e.g. "VAR", "layers") for any beyond the model's depth (checked when attach binds)."""
    layers = tuple(sorted(int(x) for x in layers))
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"{owner} {what} {bad} are outside the model's {num_layers} decoder layers")
    return layers


def raise_problems(owner: str, problems: Iterable[str | None]) -> None:
    """Raise one ValueError naming every mistake found in a config of type `owner` (none: return)."""
    found = [p for p in problems if p]
    if len(found) == 1:
        raise ValueError(f"{owner}: {found[0]}")
    if found:
        raise ValueError(f"{owner} has {len(found)} mistakes: " + "; ".join(found))


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
