"""vlmfix: attention-sink tools for transformers VLMs (find sinks, mitigate hallucination, prune tokens).

    import vlmfix
    with vlmfix.attach(model, processor, [vlmfix.VAR(), vlmfix.GIFT()]) as fixed:
        fixed.generate(**inputs)

Public names are imported on first use, so `from vlmfix.metrics import pope` does not load
torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Attached": "attach",
    "VlmfixError": "attach",
    "attach": "attach",
    "CallState": "state",
    "Debias": "methods",
    "FastVPrune": "methods",
    "GIFT": "methods",
    "MethodConfig": "methods",
    "SinkShare": "methods",
    "StagedPrune": "methods",
    "VAR": "methods",
    "VlmfixInputError": "adapters",
    "supported_families": "adapters",
    "find_sink_dims": "sinks",
    "scaled_tau": "sinks",
    "sink_scores": "sinks",
    "load_demo": "demo.load",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmfix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """Importing a submodule binds its name on the package; for `attach`, a public function named
    like its submodule, keep the name bound to the function (as an eager import would)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
