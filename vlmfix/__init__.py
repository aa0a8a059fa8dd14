"""vlmfix: attention-sink tools for transformers VLMs (find sinks, mitigate hallucination, prune tokens).

    import vlmfix
    with vlmfix.attach(model, processor, [vlmfix.VAR(), vlmfix.GIFT()]) as fixed:
        fixed.generate(**inputs)

Public names are imported on first use, so `from vlmfix.metrics import pope` does not load
torch or transformers. Method configs (`vlmfix.VAR`, `vlmfix.GIFT`, ...) come from the method registry
(`vlmfix.register_method`), so a method registered by a plug-in package is `vlmfix.<Name>` too.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Attached": "core.attach",
    "VlmfixError": "core.errors",
    "attach": "core.attach",
    "CallState": "core.state",
    "Debias": "methods",
    "MethodConfig": "core.protocol",
    "register_method": "methods.registry",
    "VlmfixInputError": "adapters",
    "supported_families": "adapters",
    "find_sink_dims": "core.sinks",
    "scaled_tau": "core.sinks",
    "sink_scores": "core.sinks",
    "load_demo": "demo.load",
}


def _method_names() -> list[str]:
    from vlmfix.methods.registry import methods

    return [entry.config.__name__ for entry in methods().values()]


def __getattr__(name: str) -> Any:
    """A public name (`_PUBLIC`), or a registered method's config class (`vlmfix.VAR`, `vlmfix.PAI`, a plug-in's)."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "__all__":
        return sorted({*_PUBLIC, *_method_names()})
    if name[:1].isupper():
        from vlmfix.methods.registry import config_class

        found = config_class(name)
        if found is not None:
            return found
    raise AttributeError(f"module 'vlmfix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | set(_method_names()))
