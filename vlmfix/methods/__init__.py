"""vlmfix methods: each is a config dataclass plus the runtime it binds to a model (see `base`)."""

from __future__ import annotations

from typing import Any

from .base import MethodConfig
from .debias import Debias
from .gift import GIFT
from .prune import FastVPrune, StagedPrune
from .sink_share import SinkShare
from .var import VAR

#: method name (CLI, configs/methods/<name>.yaml) -> config class
REGISTRY: dict[str, type[MethodConfig]] = {"var": VAR, "gift": GIFT, "fastv": FastVPrune, "staged": StagedPrune}


def build(name: str, preset: str | None = None, **overrides: Any) -> MethodConfig:
    """A method from its name, a preset of configs/methods/<name>.yaml, and keyword overrides."""
    from ..presets import method_preset

    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name](**{**method_preset(name, preset), **overrides})


def normal_spec(raw: str) -> str:
    """A method-set spec without blanks or empty items ("var, ,gift" -> "var,gift"; "" -> "none")."""
    return ",".join(part.strip() for part in str(raw).split(",") if part.strip()) or "none"


def parse_methods(spec: str) -> list[MethodConfig]:
    """"var,gift" or "var:general" (a preset of configs/methods/var.yaml) -> method configs; "none" -> []."""
    methods = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        if item == "none":
            continue
        name, _, preset = item.partition(":")
        methods.append(build(name, preset or None))
    return methods


__all__ = ["GIFT", "REGISTRY", "Debias", "FastVPrune", "MethodConfig", "SinkShare", "StagedPrune", "VAR", "build",
           "normal_spec", "parse_methods"]
