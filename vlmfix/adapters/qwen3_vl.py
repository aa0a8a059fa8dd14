"""Qwen3-VL, dense and MoE (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`).

The token layout is Qwen2-VL's (merged patch grids, 3-D rotary positions; see qwen2_vl.py), with
two differences:
- a video's frames are apart: each frame is "<t seconds>" text, a vision start token, its
  rows x cols video tokens and a vision end token, so each frame is one run of tokens (one layout
  per frame, the later ones `continues` of the first);
- deepstack: the model adds visual features of the vision tower's intermediate layers to the
  hidden states at the visual positions after decoder layers 0 .. D - 1 (D = the number of
  `deepstack_visual_indexes`). In-place pruning from a layer < D would leave those features no
  position to go to, so it is refused; pruning from layer D on, and the mask form anywhere, run.
"""

from __future__ import annotations

from vlmfix.adapters.base import VlmfixInputError
from vlmfix.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "Qwen3-VL"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    processor_classes = ("Qwen3VLProcessor",)
    frames_apart = True
    #: the processor's timestamp before each video frame, "<t seconds>" (the first one precedes the video's tokens)
    processor_text = r"<\d+(?:\.\d+)? seconds>"

    @property
    def deepstack_layers(self) -> int:
        """D: decoder layers 0 .. D - 1 get deepstack features added to their output."""
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())

    def check_pruning(self, layers: tuple[int, ...], form: str) -> None:
        d = self.deepstack_layers
        if form == "inplace" and min(layers) < d:
            raise VlmfixInputError(
                f"{self.family} adds deepstack visual features to the outputs of decoder layers 0..{d - 1}, at every "
                f"image position: in-place pruning from layer {min(layers)} would remove positions those features "
                f"go to. Prune from layer {d} or later, or use form='mask'."
            )
