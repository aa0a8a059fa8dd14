"""vlmfix methods: each is a config dataclass plus the hooks that apply it (see `base.Method`)."""

from __future__ import annotations

from typing import Any

from .base import Method
from .debias import Debias
from .gift import GIFT
from .prune import FastVPrune, StagedPrune
from .var import VAR

#: method name (CLI, configs/methods/<name>.yaml) -> config class
REGISTRY: dict[str, type[Method]] = {"var": VAR, "gift": GIFT, "fastv": FastVPrune, "staged": StagedPrune}


def build(name: str, preset: str | None = None, **overrides: Any) -> Method:
    """A method from its name, a preset of configs/methods/<name>.yaml, and keyword overrides."""
    from ..presets import method_preset

    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name](**{**method_preset(name, preset), **overrides})


__all__ = ["GIFT", "REGISTRY", "Debias", "FastVPrune", "Method", "StagedPrune", "VAR", "build"]
