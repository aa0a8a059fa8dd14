"""A quick held-out check of a demo model: POPE-style yes/no accuracy (one present and one absent
category per image, greedy first token) and a few greedy captions."""

from __future__ import annotations

import random
from typing import Any

import torch

from vlmfix.data.world import CATEGORIES, draw_image
from vlmfix.demo.assemble import prompt_for
from vlmfix.data.prompts import CAPTION_PROMPTS, yes_no_question


@torch.no_grad()
def check_model(model: Any, processor: Any, seed: int = 2, n_images: int = 100, n_captions: int = 4,
                batch_size: int = 16) -> dict[str, Any]:
    """{"yes_no_accuracy", "yes_ratio", "other_answers", "questions", "captions"} on images
    1..n_images of the EmojiCOCO world `seed`."""
    rng = random.Random(f"check/{seed}")
    items = []
    pictures = []
    for image_id in range(1, n_images + 1):
        picture, _, objects, _ = draw_image(seed, image_id)
        pictures.append(picture)
        present = sorted({name for name, _, _ in objects})
        absent = [c for c in CATEGORIES if c not in present]
        items.append((image_id - 1, rng.choice(present), True))
        items.append((image_id - 1, rng.choice(absent), False))
    yes_id = processor.tokenizer.convert_tokens_to_ids("Yes")
    no_id = processor.tokenizer.convert_tokens_to_ids("No")
    right = yes = other = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = processor(images=[pictures[i] for i, _, _ in chunk],
                           text=[prompt_for(yes_no_question(name)) for _, name, _ in chunk],
                           return_tensors="pt", padding=True, padding_side="left").to(model.device)
        first = model(**inputs).logits[:, -1].argmax(-1).tolist()
        for token, (_, _, label) in zip(first, chunk):
            answer = True if token == yes_id else False if token == no_id else None
            other += answer is None
            yes += answer is True
            right += answer == label
    captions = []
    for image_id in range(min(n_captions, n_images)):
        inputs = processor(images=pictures[image_id], text=prompt_for(CAPTION_PROMPTS[0]), return_tensors="pt").to(model.device)
        ids = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        captions.append(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    n = len(items)
    return {"yes_no_accuracy": right / n, "yes_ratio": yes / n, "other_answers": other / n, "questions": n,
            "captions": captions}
