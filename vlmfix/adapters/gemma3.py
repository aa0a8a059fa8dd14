"""Gemma 3 (`Gemma3ForConditionalGeneration`): one pooled square grid per image, framed by begin/end tokens.

The processor resizes every image to the SigLIP tower's square size (no padding) and writes
"\\n\\n<start_of_image>" + `mm_tokens_per_image` image tokens + "<end_of_image>\\n\\n" for it; the
projector average-pools the tower's p x p patches to s x s tokens, s = sqrt(mm_tokens_per_image),
so each image is one s x s grid in row-major order. Pan-and-scan crops are further such blocks,
separated by text, each its own image here. The image tokens are marked 1 in `token_type_ids`,
from which the model builds a mask that lets an image's tokens see each other both ways.

Sliding-window layers: Gemma 3's default cache keeps only the last `sliding_window - 1` keys of its
sliding layers, so their key columns stop being prompt positions once a call outgrows the window.
When a method may edit attention, `prepare_cache` makes the call's dynamic cache keep every key in
those layers (the model's mask still applies the window, by position; a full cache gives the same
outputs), and refuses a static cache whose sliding layers are shorter than the call. The model
builds its masks once per forward over the whole prompt (the window, the bidirectional image
blocks), so in-place pruning gathers them at the kept positions and `token_type_ids` need no
pruning.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from vlmfix.core.state import ImageSegment
from vlmfix.adapters.base import Adapter, ImageLayout, VlmfixInputError, encoded_images
from vlmfix.adapters.inputs import pixels


class Gemma3Adapter(Adapter):
    family = "Gemma 3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    processor_classes = ("Gemma3Processor",)
    #: its chat template writes a user turn "<start_of_turn>user\n...<end_of_turn>"
    user_markers = ("<start_of_turn>user", *Adapter.user_markers)

    def __init__(self, model: Any, processor: Any | None = None):
        super().__init__(model, processor)
        per_image = int(self.config.mm_tokens_per_image)
        self.side = math.isqrt(per_image)
        if self.side * self.side != per_image:
            raise VlmfixInputError(f"Gemma 3 mm_tokens_per_image must be a square number, got {per_image}")
        self.boi_token_id = int(self.config.boi_token_index)
        types = list(getattr(self.text_config, "layer_types", None) or [])
        #: decoder layers with sliding-window attention, and the window
        self.sliding_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        self.sliding_window = getattr(self.text_config, "sliding_window", None)

    def check_processor(self, processor: Any) -> None:
        """Gemma3Processor's `image_token_id` is its begin-of-image id (the placeholder users write); the
        expanded image token is the tokenizer's `image_token_id`. Both are checked against the config."""
        tok = getattr(processor, "tokenizer", processor)
        pairs = (("begin-of-image", getattr(tok, "boi_token_id", None), self.config.boi_token_index),
                 ("image", getattr(tok, "image_token_id", None), self.config.image_token_index),
                 ("end-of-image", getattr(tok, "eoi_token_id", None), self.config.eoi_token_index))
        for what, got, expected in pairs:
            if got is not None and int(got) != int(expected):
                raise VlmfixInputError(
                    f"processor/model mismatch: the tokenizer's {what} token id is {got} but the model expects "
                    f"{expected}. Load processor and model from the same checkpoint."
                )
        self.check_family(processor)

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        pixel_values = pixels(inputs, "pixel_values", ("images", "channels", "height", "width"), self.family)
        count = len(encoded_images(inputs)) if pixel_values is None else pixel_values.shape[0]
        s = self.side
        return [ImageLayout(segments=(ImageSegment(start=0, rows=s, cols=s),), length=s * s)] * count

    def prepare_cache(self, cache: Any) -> None:
        """Before a prefill whose attention a method may edit: keep every key of the sliding layers
        (see the module docstring)."""
        if cache is None or not self.sliding_layers or self.sliding_window is None:
            return
        cache = getattr(cache, "self_attention_cache", cache)
        layers = getattr(cache, "layers", None)
        if not layers:
            return
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        full = [layer.max_cache_len for layer in layers if not getattr(layer, "is_sliding", False)
                and getattr(layer, "max_cache_len", None) is not None]
        for i, layer in enumerate(layers):
            if isinstance(layer, DynamicSlidingWindowLayer):
                if layer.get_seq_length() == 0:
                    layers[i] = DynamicLayer()
            elif getattr(layer, "is_sliding", False) and full and layer.max_cache_len < max(full):
                raise VlmfixInputError(
                    f"Gemma 3's sliding-window layers keep {layer.max_cache_len} keys in this static cache but the "
                    f"call may run to {max(full)} tokens: past the window the cache rolls, and vlmfix methods would "
                    f"read keys at the wrong positions. Generate with max length <= the sliding window "
                    f"({self.sliding_window}) or with the default dynamic cache."
                )

    # -- the vision side: SigLIP (no CLS), p x p patches average-pooled k x k into the s x s tokens ----------
    vision_side = True

    def vision_token_map(self, tower_tokens: int) -> torch.Tensor:
        """Patch (r, c) of the tower's p x p grid feeds image token (r // k) * s + c // k, k = p // s (Gemma 3:
        64 x 64 patches pooled 4 x 4 into 16 x 16 tokens): many patches to one token, never one to several."""
        p = math.isqrt(tower_tokens)
        if p * p != tower_tokens or p % self.side:
            raise VlmfixInputError(f"Gemma 3's tower gave {tower_tokens} tokens, not a square grid pooled to "
                                   f"{self.side} x {self.side}")
        k = p // self.side
        r = torch.arange(p)[:, None] // k
        c = torch.arange(p)[None, :] // k
        return (r * self.side + c).flatten()
