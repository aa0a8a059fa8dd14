"""vlmfix methods: one module each (config, runtime, call, record, one `register_method` call; see `base`).

`vlmfix.methods.VAR` and the other config classes are looked up in the registry, so a method module
needs no line here; `methods()` lists every registered method, `build` / `parse_methods` make configs
from names and presets.
"""

from __future__ import annotations

from typing import Any

from vlmfix.core.protocol import MethodConfig
from vlmfix.methods.debias import Debias
from vlmfix.methods.registry import (MethodEntry, build, config_class, method, methods, normal_spec, parse_methods,
                                     parse_settings, register_method, unregister_method, with_settings)

__all__ = ["Debias", "MethodConfig", "MethodEntry", "build", "method", "methods", "normal_spec", "parse_methods",
           "parse_settings", "register_method", "unregister_method", "with_settings"]


def __getattr__(name: str) -> Any:
    """A registered config class by its class name (`vlmfix.methods.VAR`)."""
    found = config_class(name) if name[:1].isupper() else None
    if found is None:
        raise AttributeError(f"module 'vlmfix.methods' has no attribute {name!r}")
    return found
