"""PAI: Paying More Attention to Image (Liu, Zheng, Chen, ECCV 2024, arXiv 2407.21771).

Two parts, both training-free:

1. inference intervention: in each PAI layer (default 2 .. L-1, 0-indexed: every layer but the first two;
   `start_layer` = 2 is PAI's own setting, not vlmfix's sink layer), every head, the pre-softmax scaled
   scores A of the last query row (the token being generated: each batch row's last prompt position at the
   prefill, `RowLayout.last`, and every decoding step) at the image-token key columns become
   A + alpha |A|, on unmasked entries only (a forbidden entry stays forbidden), before the fp32 softmax.
   Other prompt rows are untouched, so the KV cache is the plain model's.
2. image-centric logit refine: a contrast branch (`vlmfix.core.contrast`: the prompt without its image tokens,
   run as extra batch rows of the same forward, with the model's plain attention), combined in
   log-probabilities, out = gamma log p(y | image, text) - (gamma - 1) log p(y | text), with the adaptive
   plausibility cut: tokens whose image-conditioned probability is below beta x its maximum get -inf.
   gamma = 1 is the neutral setting: no branch runs at all (and no cut); alpha = 0: no intervention.

Defaults alpha = 0.2, gamma = 1.1, beta = 0.1: the paper's PDF was not available when this was written, so
they follow the authors' published commands (github.com/LALBJ/PAI README: --alpha 0.2, --gamma 1.1,
--start-layer 2 --end-layer 32 on 32-layer LLaVA-1.5); beta = 0.1 (VCD-style plausibility cut) is to be
checked against the paper. A row without an image is left alone (no intervention, its raw logits).
Limits: the contrast branch needs left padding; it runs in a static cache and compiled generation too (see
`vlmfix.core.contrast`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from vlmfix.methods.base import (BiasesScores, Block, CallState, CombinesLogits, HeatMaps, MethodCall, MethodConfig, Phase, Queries,
                                 Record, Runtime, Target, check_layers, check_number, is_int, model_layers,
                                 raise_problems)
from vlmfix.methods.registry import register_method

#: PAI's first intervened layer (the authors' --start-layer 2): the first two layers are left alone
PAI_START_LAYER = 2


@dataclass
class PAI(MethodConfig):
    """Paying more attention to image (defaults: the authors' published commands, alpha 0.2, gamma 1.1, beta 0.1).

    - alpha: excitation of the last query row's image-key scores, A + alpha |A| (>= 0; 0: no intervention);
    - gamma: weight of the image-conditioned log-probabilities against the image-free ones (>= 1; 1: no
      contrast branch);
    - beta: plausibility cut, tokens with image-conditioned probability < beta x max get -inf ([0, 1]; 0: none);
    - layers: the layers it intervenes in (a non-empty list of ints), default start_layer .. L-1;
    - start_layer: the first intervened layer when `layers` is None (PAI's 2).
    """

    alpha: float = 0.2
    gamma: float = 1.1
    beta: float = 0.1
    layers: Sequence[int] | None = None
    start_layer: int = PAI_START_LAYER


    def __post_init__(self) -> None:
        raise_problems("PAI", [
            check_number("alpha", self.alpha, 0.0),
            check_number("gamma", self.gamma, 1.0),
            check_number("beta", self.beta, 0.0, 1.0),
            None if self.layers is None else check_layers("layers", self.layers),
            None if is_int(self.start_layer) and self.start_layer >= 0
            else f"start_layer must be an integer >= 0, got {self.start_layer!r}",
        ])


@dataclass
class PAIRecord(Record):
    """What PAI did in one call: its layers and settings, which batch rows have an image (the rows it acts
    on), and whether the image-free contrast ran."""

    layers: tuple[int, ...]
    alpha: float
    gamma: float
    beta: float
    image: list[bool]
    contrast: bool
    #: (B, P) on the model's device: the attention the intervention added to each prompt position at the
    #: prefill's last query (each row's last real token), averaged over heads and summed over the PAI layers
    added: torch.Tensor | None = None
    state: CallState | None = field(default=None, repr=False, compare=False)

    acts: ClassVar[str] = "raised the attention to the image or contrasted with the image-free prompt"

    def acted(self) -> list[bool]:
        return [has and (self.alpha > 0 or self.contrast) for has in self.image]

    def row(self, row: int) -> dict[str, Any]:
        return {"image": self.image[row], "alpha": self.alpha if self.image[row] else 0.0,
                "gamma": self.gamma if self.image[row] and self.contrast else 1.0}

    def notes(self, row: int) -> list[str]:
        if not self.image[row]:
            return ["PAI left this row alone: text-only row, no image tokens"]
        if not self.acted()[row]:
            return ["PAI did nothing: alpha = 0 and gamma = 1"]
        return []

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        """`pai_added.png`: the attention the intervention added to each patch at the last prompt token (mean over
        heads, summed over the PAI layers)."""
        r = maps.row
        if not self.image[r] or self.alpha == 0 or self.added is None:
            return [f"PAI: {(self.notes(r) or ['no intervention at the prefill'])[0]}; so no pai_added.png"]
        caption = ["total added onto this grid: {total:.3f} of the last prompt token's attention (1 = one head's "
                   "whole row), summed over the PAI layers; decoding steps get the same boost"]
        path = maps.grid("pai_added.png", self.added.detach().float().cpu(),
                         "Attention PAI added to each patch (last prompt token)",
                         bar="attention added (mean over heads, summed over layers)", caption=caption)
        return [f"heat map, attention added by PAI: {path}"]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "layers": list(self.layers), "alpha": self.alpha, "gamma": self.gamma,
                "beta": self.beta, "contrast": self.contrast,
                "rows": [{**self.row(r), "notes": self.notes(r)} for r in range(len(self.image))]}


class PAICall(MethodCall, BiasesScores, CombinesLogits):
    """One call of PAI: the image columns and the last rows of the batch (on the model's device), the record."""

    record: PAIRecord
    record_type = PAIRecord

    def __init__(self, runtime: "PAIRuntime", state: CallState):
        cfg = runtime.config
        self.alpha, self.gamma, self.beta = float(cfg.alpha), float(cfg.gamma), float(cfg.beta)
        self.layers = runtime.layer_set
        image = [r.has_image for r in state.rows]
        self._any = any(image)
        self._image = state.image_mask()  # (B, P) bool
        self._has = torch.tensor(image, device=state.device)[:, None]  # (B, 1)
        self._last = state.last_tokens()
        self._rows: dict[Any, torch.Tensor] = {}
        self._log_beta = math.log(self.beta) if self.beta > 0 else None
        record = PAIRecord(runtime.layers, self.alpha, self.gamma, self.beta, image, bool(runtime.branches()),
                           torch.zeros(state.batch_size, state.prompt_len, device=state.device))
        record.state = state
        super().__init__(runtime, record)

    # -- BiasesScores -------------------------------------------------------------------------------
    def queries(self, block: Block, state: CallState) -> range | None:
        if self.alpha == 0 or not self._any or block.layer not in self.layers or block.phase is Phase.PREPASS:
            return None
        if block.phase is Phase.DECODE:
            return range(block.q_len - 1, block.q_len)
        last = state.last_range
        return range(last.start - block.q_start, last.stop - block.q_start)

    def bias(self, block: Block, state: CallState, queries: Queries, scores: torch.Tensor) -> torch.Tensor:
        b, _, r, k = scores.shape
        cols = self._image.to(scores.device)
        if k > cols.shape[1]:
            cols = torch.nn.functional.pad(cols, (0, k - cols.shape[1]))
        cols = cols[:, None, None, :k]  # (B, 1, 1, K)
        if block.phase is not Phase.DECODE:  # the prefill: only each batch row's last real token
            key = (block.q_start, queries.count, scores.device)
            rows = self._rows.get(key)
            if rows is None:
                rows = self._rows[key] = (queries.positions[None, :] == self._last[:, None]).to(scores.device)
            cols = cols & rows[:, None, :, None]
        selected = cols & (scores > torch.finfo(scores.dtype).min)
        new = torch.where(selected, scores + self.alpha * scores.abs(), scores)
        if block.phase is Phase.PREFILL:  # the record: attention added at each row's last token (no host read)
            p = self.record.added.shape[1]
            moved = (torch.softmax(new.detach(), -1) - torch.softmax(scores.detach(), -1))[..., :p].mean(1)  # (B, R, P)
            self.record.added += (moved * rows[:, :, None]).sum(1).to(self.record.added.device)
        return new

    # -- CombinesLogits ------------------------------------------------------------------------------
    def combine(self, logits: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """gamma log p_img - (gamma - 1) log p_noimg, -inf where p_img < beta max p_img; raw logits in a row
        without an image."""
        lp_img = torch.log_softmax(logits, dim=-1)
        out = self.gamma * lp_img - (self.gamma - 1) * torch.log_softmax(branch, dim=-1)
        if self._log_beta is not None:
            cut = lp_img < lp_img.amax(-1, keepdim=True) + self._log_beta
            out = out.masked_fill(cut, float("-inf"))
        return torch.where(self._has.to(logits.device), out, logits)


class PAIRuntime(Runtime):
    """PAI bound to a model: its layers (start_layer .. L-1 unless given)."""

    call = PAICall

    def __init__(self, config: PAI, target: Target):
        super().__init__(config, target)
        n = target.adapter.num_layers
        if config.layers is None and config.start_layer >= n:
            raise ValueError(f"PAI start_layer {config.start_layer} is beyond the model's {n} decoder layers")
        layers = range(config.start_layer, n) if config.layers is None else config.layers
        self.layers = model_layers("PAI", "layers", layers, n)
        self.layer_set = frozenset(layers)

    def branches(self) -> tuple[str, ...]:
        return ("no_image",) if self.config.gamma != 1 else ()

    def resolved(self) -> dict:
        return {"layers": list(self.layers)}

    def start(self, state: CallState) -> PAICall:
        return PAICall(self, state)


register_method(name="pai", config=PAI, runtime=PAIRuntime, summary="paying more attention to image (Liu et al., "
                "ECCV 2024): raise the image attention of the generated token, contrast with the image-free prompt")
