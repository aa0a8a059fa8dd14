"""What the family test modules share.

Protocol: a module `families.<name>` exports
- `NAME`; `make_model(seed=0)`: a tiny random model built from config objects, in eval mode, with
  4 decoder layers of width 64 and the 128 ids of tests/tiny.py (PAD 0, BOS 1, EOS 2, IMAGE 100,
  specials >= 100; the tiny tokenizer `tokenizer()` reads them);
- `make_batch(model, prompts)`: prompts are (ids before the image, image size (H, W) or None, ids
  after), as in tiny.prompts_two(); a left-padded batch with every input the family's forward
  needs, image placeholders expanded as the family's processor would;
- `VIDEO`: whether the family takes `pixel_values_videos`; then `make_video_batch(model, prompts)`,
  the sizes meaning clips (frames, H, W);
- `PRUNE_IN_PLACE`: False when vlmfix refuses in-place pruning for the family (the harness then
  checks the refusal), at the harness's pruning layer 2.
"""

from __future__ import annotations

import torch
from tiny import IMAGE, PAD, VEND, VIDEO, VSTART, _text, chat_after, encode, left_pad, tokenizer

__all__ = ["IMAGE", "PAD", "VEND", "VIDEO", "VSTART", "chat_after", "left_pad", "qwen_batch", "text_config",
           "tokenizer"]

#: Pixtral's row break and image end (special ids of the tiny tokenizer)
IMG_BREAK, IMG_END = 105, 106


def text_config(**overrides) -> dict:
    """The tiny decoder's settings (4 layers, width 64, 4 heads, 2 KV heads, vocabulary 128)."""
    return _text(**overrides)


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))


def qwen_batch(prompts: list, video: bool = False, frames_apart: bool = False) -> dict:
    """Qwen2-VL-style inputs: 14-px patches merged 2 x 2, 2 frames per temporal patch. An image (H, W)
    is h x w patches (h = H // 14, even, >= 2); a clip (T, H, W) is T // 2 such frames. The placeholder
    is vision start, the merged tokens, vision end; with `frames_apart` (Qwen3-VL) each frame of a clip
    is its own timestamp text as Qwen3-VL's processor writes it ("<0 seconds>", "<0.5 seconds>", ...: 4 or
    6 tokens) + vision start + tokens + vision end."""
    token, key = (VIDEO, "video") if video else (IMAGE, "image")
    seqs, pixels, grids = [], [], []
    for before, size, after in prompts:
        ids = list(before)
        if size is not None:
            t = max(1, size[0] // 2) if video else 1
            hw = size[1:] if video else size
            h, w = (max(2, s // 14 // 2 * 2) for s in hw)
            frame = [token] * (h * w // 4)
            if frames_apart and video:
                for k in range(t):
                    ids += encode(f"<{k * 0.5:g} seconds>") + [VSTART] + frame + [VEND]
            else:
                ids += [VSTART] + frame * t + [VEND]
            pixels.append(_pixels(t * h * w, seed=sum(size)))
            grids.append([t, h, w])
        seqs.append(ids + list(after))
    batch = left_pad(seqs)
    ids = batch["input_ids"]
    batch["mm_token_type_ids"] = ((ids == IMAGE).int() + 2 * (ids == VIDEO).int())
    if pixels:
        batch["pixel_values_videos" if video else "pixel_values"] = torch.cat(pixels)
        batch[f"{key}_grid_thw"] = torch.tensor(grids)
    return batch
