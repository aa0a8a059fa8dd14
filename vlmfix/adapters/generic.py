"""The fallback for a transformers VLM without a family adapter whose config names an image token id.

Image positions come from `input_ids`: every maximal run of image (or video) tokens is taken as
one image of one row of tokens (a 1-D layout). Sinks, VAR, GIFT and pruning, which name tokens by
position, run as they do in any family; what needs the image's grid does not: heat maps show a
single row, and the positional trend of debiased pruning is read along the run rather than per
image row. `attach` warns about it once per adapter.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from torch import nn

from vlmfix.core.state import ImageSegment
from vlmfix.adapters.base import Adapter, ImageLayout, config_token_id, runs


class GenericAdapter(Adapter):
    family = "generic"

    def __init__(self, model: nn.Module, processor: Any | None = None):
        super().__init__(model, processor)
        warnings.warn(
            f"vlmfix has no adapter for {type(model).__name__}: it finds the image tokens (id {self.image_token_id}) "
            "in input_ids and treats each run of them as one row of tokens. Sinks, VAR, GIFT and pruning work; heat "
            "maps and the positional trend of debiased pruning need the image grid, which a family adapter gives.",
            stacklevel=3,
        )

    @classmethod
    def applies(cls, model: nn.Module) -> bool:
        """Whether `model`'s config names an image token id."""
        return config_token_id(model.config, "image") is not None

    def _runs(self, inputs: Mapping[str, Any], token: int) -> list[ImageLayout]:
        """One 1 x n layout per run of `token` in each row of the prompt."""
        is_token = inputs["input_ids"].cpu() == token
        return [ImageLayout((ImageSegment(0, 1, len(run)),), len(run))
                for row in is_token for run in runs(row.nonzero().flatten())]

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        return self._runs(inputs, self.image_token_id)

    def video_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        return self._runs(inputs, self.video_token_id)

