"""Qwen2-VL / Qwen2.5-VL: dynamic resolution, no padding; images and videos.

An image (or a video) of t x h x w vision patches becomes t * (h / m) * (w / m) tokens, m being
the spatial merge size (2), laid out frame by frame as (h / m) rows x (w / m) cols, framed by
vision start/end tokens. A video's frames follow one another in one run of video tokens (segments
"frame0", "frame1", ...). From pre-encoded features (what `generate` passes) the grid is read off
the 3-D rotary position ids (temporal, height, width) of each run of visual tokens: its rows and
columns are the distinct height and width ids, its frames the rest.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from vlmfix.adapters.base import Adapter, ImageLayout, VlmfixInputError, encoded_images, feature_spans, runs
from vlmfix.adapters.inputs import frames_layout


class Qwen2VLAdapter(Adapter):
    family = "Qwen2-VL"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    processor_classes = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
    #: whether each video frame is its own run of video tokens (Qwen3-VL: a timestamp and vision
    #: start / end tokens around every frame); Qwen2-VL's frames are one run
    frames_apart = False

    def _merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def _from_grid(self, grid: torch.Tensor, video: bool) -> list[ImageLayout]:
        m = self._merge()
        layouts: list[ImageLayout] = []
        for t, h, w in grid.tolist():
            if video and self.frames_apart:
                layouts += [frames_layout(1, h // m, w // m, continues=k > 0, first=k) for k in range(t)]
            else:
                layouts.append(frames_layout(t, h // m, w // m))
        return layouts

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            return self._from_grid(grid, video=False)
        return self._from_positions(inputs, self.image_token_id, encoded_images(inputs))

    def video_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        grid = inputs.get("video_grid_thw")
        if grid is not None:
            return self._from_grid(grid, video=True)
        return self._from_positions(inputs, self.video_token_id, encoded_images(inputs, "video"))

    def _from_positions(self, inputs: Mapping[str, Any], token: int, features: list[torch.Tensor]) -> list[ImageLayout]:
        """Layouts of pre-encoded images / videos (`features`, in order) of visual token `token`, read off
        the 3-D rotary position ids of their runs of tokens."""
        position_ids = inputs.get("position_ids")
        if position_ids is None or position_ids.ndim != 3:
            raise VlmfixInputError(f"{self.family} needs image_grid_thw / video_grid_thw (or 3-D position ids) "
                                   "with its images and videos")
        thw = position_ids[-3:].cpu()  # (3, B, N): temporal, height, width indices
        spans, unmatched = feature_spans(inputs, token, [f.shape[0] for f in features])
        layouts: list[ImageLayout] = []
        for b, span in spans:
            frame = 0
            for k, run in enumerate(runs(span)):  # one run, or one per frame (frames_apart)
                layouts.append(self._run_layout(thw[:, b, run], frame, continues=k > 0))
                frame += len(layouts[-1].segments)
        return layouts + [frames_layout(1, 1, n) for n in unmatched]  # more features than tokens: an error

    def _run_layout(self, thw: torch.Tensor, first: int, continues: bool) -> ImageLayout:
        """The frames x rows x cols layout of one run of visual tokens from its (3, n) position ids."""
        n = thw.shape[1]
        h, w = (len(torch.unique(thw[c])) for c in (1, 2))
        if h * w == 0 or n % (h * w):  # text-only rotary positions (no mm_token_type_ids): grid unknown
            warnings.warn(
                f"{self.family} inputs without mm_token_type_ids: the image grid is unknown, so vlmfix treats each "
                "image as one row of tokens. Build inputs with the model's processor.",
                stacklevel=3,
            )
            return frames_layout(1, 1, n, continues, first)
        return frames_layout(n // (h * w), h, w, continues, first)
