"""YAML presets in configs/: per-model sink dims and thresholds (configs/models/*.yaml) and
per-method settings (configs/methods/<method>.yaml: named presets and a default).

A model preset applies when one of its `match` strings occurs in the model's name or path
(case-insensitive) and its hidden size equals the model's (so a random tiny config never picks up
a 7B table).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml


def configs_dir() -> Path:
    """The configs/ folder: beside the package in a checkout, inside it in a wheel."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "configs", package / "_configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("vlmfix's configs/ folder is missing; reinstall vlmfix (pip install -e .)")


@lru_cache(maxsize=None)
def model_presets() -> tuple[dict[str, Any], ...]:
    return tuple(yaml.safe_load(p.read_text()) for p in sorted((configs_dir() / "models").glob("*.yaml")))


def model_preset(name_or_path: str, hidden_size: int) -> dict[str, Any] | None:
    """The preset matching a model name/path and width, or None."""
    name = (name_or_path or "").lower()
    for preset in model_presets():
        if preset.get("hidden_size") == hidden_size and any(m.lower() in name for m in preset.get("match", [])):
            return preset
    return None


def method_preset(method: str, preset: str | None = None) -> dict[str, Any]:
    """The settings of `preset` (default: the file's default) for `method` from configs/methods."""
    path = configs_dir() / "methods" / f"{method}.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    presets = data.get("presets", {})
    name = preset or data.get("default")
    if name not in presets:
        raise ValueError(f"unknown {method} preset {name!r}; {path.name} has: {', '.join(presets)}")
    return dict(presets[name])


def method_presets(method: str) -> tuple[str | None, list[str]]:
    """(the default preset, every preset name) of configs/methods/<method>.yaml ((None, []) without a file)."""
    path = configs_dir() / "methods" / f"{method}.yaml"
    if not path.is_file():
        return None, []
    data = yaml.safe_load(path.read_text()) or {}
    return data.get("default"), list(data.get("presets", {}))
