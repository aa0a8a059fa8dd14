"""Shared benchmark helpers: the SmolLM2-based LLaVA test-bed and interleaved timing."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from PIL import Image

from vlmfix.demo import build_llava, load_smollm2
from vlmfix.demo.assemble import prompt_for


def smol_llava_inputs(question: str = "Describe the image in detail.", image_size: int = 336):
    """(model, processor, inputs): SmolLM2-135M + a random CLIP tower, (image_size / 14)^2 image tokens."""
    lm, tok = load_smollm2()
    model, processor = build_llava(lm, tok, image_size=image_size)
    img = Image.new("RGB", (400, 300), (90, 150, 210))
    inputs = processor(images=img, text=prompt_for(question), return_tensors="pt")
    return model, processor, inputs


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per variant, running the variants in turn `repeats` times (noise hits all alike)."""
    for fn in variants.values():  # warm-up
        timed(fn)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(timed(fn))
    return {k: statistics.median(v) for k, v in samples.items()}
