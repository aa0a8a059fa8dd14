"""VAF: Visual Amplification Fusion (Yin, Si, Wang, "ClearSight: Visual Signal Enhancement for Object Hallucination
Mitigation in Multimodal Large Language Models", CVPR 2025, arXiv 2503.13107).

The paper finds that image and text fuse mostly in the middle decoder layers and that there the model attends too
little to the image. In those layers, every head, the pre-softmax attention scores Z (scaled q.k) become

    Z' = Z + alpha * M_enh o Z - beta * M_sup o Z

with M_enh the image-token key columns (amplified, alpha the enhancement coefficient) and M_sup the system-prompt
key columns (suppressed, beta the suppression coefficient), then the softmax. Every query row is modified (the
prompt's at the prefill, so the KV cache of later layers changes, and each generated token's); entries the mask
forbids stay forbidden. One forward, no contrast branch.

Choices where the paper's text was not at hand when this was written (said again in docs/methods.md):

- defaults alpha = 0.15, beta = 0.05: the authors' published command (github.com/ustc-hyin/ClearSight README:
  --enh-para 1.15 --sup-para 0.95, i.e. scores x 1.15 and x 0.95); summaries of the paper quote beta = 0.1;
- the layers: the paper's middle fusion layers 8 < l < 15 of 32-layer LLaVA-1.5 7B, i.e. layers 9..14
  (0-indexed), mapped to a model of L layers by depth fraction: round(9 L / 32) .. round(15 L / 32) - 1 (at least
  one layer); `layers` gives them explicitly;
- every head (summaries mention a restriction to visual-perception heads, which is not implemented);
- the system-prompt tokens of a row are derived from its layout: its real tokens before its first image token,
  without the vision start / end markers (BOS and the chat template's system text included). A row with no
  such token gets no suppression, which its record says (`system` = 0 and a note); a row without an image is
  left alone (no amplification, no suppression).

alpha = beta = 0 is the neutral setting (no layer call leaves the fast path). Runs in compiled static-cache
generation (the decoding step reads preallocated masks only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from vlmfix.core.contrast import removed_ids
from vlmfix.methods.base import (BiasesScores, Block, CallState, HeatMaps, MethodCall, MethodConfig, Phase, Queries,
                                 ReadsInputs, Record, Runtime, Target, check_layers, check_number, model_layers,
                                 raise_problems)
from vlmfix.methods.registry import register_method

#: the paper's middle layers on 32-layer LLaVA-1.5 7B (8 < l < 15): [start, stop) of a 32-layer model
PAPER_LAYERS, PAPER_DEPTH = (9, 15), 32


def middle_layers(num_layers: int) -> range:
    """The paper's middle layers 9..14 of 32 mapped to a model of `num_layers` layers by depth fraction."""
    start = min(round(PAPER_LAYERS[0] * num_layers / PAPER_DEPTH), num_layers - 1)
    stop = max(round(PAPER_LAYERS[1] * num_layers / PAPER_DEPTH), start + 1)
    return range(start, min(stop, num_layers))


@dataclass
class VAF(MethodConfig):
    """Visual amplification fusion (defaults: the authors' published command, alpha 0.15, beta 0.05).

    - alpha: enhancement of the image-token scores, Z + alpha Z (>= 0; 0: no enhancement);
    - beta: suppression of the system-prompt scores, Z - beta Z ([0, 1]; 0: no suppression);
    - layers: the layers it acts in (a non-empty list of ints), default the paper's middle layers mapped to the
      model's depth (`middle_layers`).
    """

    alpha: float = 0.15
    beta: float = 0.05
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        raise_problems("VAF", [
            check_number("alpha", self.alpha, 0.0),
            check_number("beta", self.beta, 0.0, 1.0),
            None if self.layers is None else check_layers("layers", self.layers),
        ])


@dataclass
class VAFRecord(Record):
    """What VAF did in one call: its layers and coefficients, which rows have an image, and per row how many
    system-prompt tokens it suppressed (`system`, the real tokens before the row's first image)."""

    layers: tuple[int, ...]
    alpha: float
    beta: float
    image: list[bool]
    system: list[int]
    #: (B, P) on the model's device: the attention VAF added to each prompt position at each row's last prompt
    #: token, averaged over heads and summed over its layers
    added: torch.Tensor | None = None
    state: CallState | None = field(default=None, repr=False, compare=False)

    acts: ClassVar[str] = "amplified the attention to the image and suppressed the system prompt's"

    def acted(self) -> list[bool]:
        return [has and (self.alpha > 0 or self.beta > 0 and n > 0) for has, n in zip(self.image, self.system)]

    def row(self, row: int) -> dict[str, Any]:
        has = self.image[row]
        return {"image": has, "alpha": self.alpha if has else 0.0,
                "beta": self.beta if has and self.system[row] else 0.0, "system": self.system[row]}

    def notes(self, row: int) -> list[str]:
        if not self.image[row]:
            return ["VAF left this row alone: text-only row, no image tokens"]
        notes = []
        if self.beta > 0 and not self.system[row]:
            notes.append("VAF suppressed nothing: the row has no system-prompt tokens (no text before its image)")
        if not self.acted()[row]:
            notes.append("VAF did nothing: alpha = 0 and beta = 0" if self.beta == 0 else "VAF did nothing: alpha = 0")
        return notes

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        """`vaf_added.png`: the attention VAF added to each patch at the last prompt token (mean over heads, summed
        over its layers)."""
        r = maps.row
        if not self.acted()[r] or self.added is None:
            return [f"VAF: {(self.notes(r) or ['no intervention at the prefill'])[0]}; so no vaf_added.png"]
        caption = ["total added onto this grid: {total:.3f} of the last prompt token's attention (1 = one head's "
                   "whole row), summed over the VAF layers"]
        path = maps.grid("vaf_added.png", self.added.detach().float().cpu(),
                         "Attention VAF added to each patch (last prompt token)",
                         bar="attention added (mean over heads, summed over layers)", caption=caption)
        return [f"heat map, attention added by VAF: {path}"]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "layers": list(self.layers), "alpha": self.alpha, "beta": self.beta,
                "rows": [{**self.row(r), "notes": self.notes(r)} for r in range(len(self.image))]}


class VAFCall(MethodCall, BiasesScores, ReadsInputs):
    """One call of VAF: the per-key score factors (B, P) (1 + alpha on image columns, 1 - beta on system columns,
    1 elsewhere and in rows without an image), built from the prompt's layout and token ids."""

    record: VAFRecord
    record_type = VAFRecord

    def __init__(self, runtime: "VAFRuntime", state: CallState):
        cfg = runtime.config
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)
        self.layers = runtime.layer_set
        self._active = (self.alpha > 0 or self.beta > 0) and any(r.has_image for r in state.rows)
        self._factor: torch.Tensor | None = None  # (B, P) fp32, set by read_inputs
        self._last = state.last_tokens()
        record = VAFRecord(runtime.layers, self.alpha, self.beta, [r.has_image for r in state.rows],
                           [0] * state.batch_size, torch.zeros(state.batch_size, state.prompt_len, device=state.device))
        record.state = state
        super().__init__(runtime, record)

    # -- ReadsInputs: the system-prompt columns need the token ids ---------------------------------------
    def read_inputs(self, state: CallState, inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"].cpu()
        markers = torch.tensor(sorted(self.runtime.markers))
        factor = torch.ones(state.batch_size, state.prompt_len)
        for row in state.rows:
            if not row.has_image:
                continue
            first = int(row.image_positions[0])
            before = torch.arange(row.pad_left, first)
            system = before[~torch.isin(ids[row.index, before], markers)]
            self.record.system[row.index] = len(system)
            factor[row.index, system] = 1 - self.beta
            factor[row.index, row.image_positions] = 1 + self.alpha
        self._factor = factor.to(state.device)

    # -- BiasesScores ----------------------------------------------------------------------------------
    def queries(self, block: Block, state: CallState) -> range | None:
        if not self._active or block.layer not in self.layers or block.phase is Phase.PREPASS:
            return None
        return range(0, block.q_len)

    def bias(self, block: Block, state: CallState, queries: Queries, scores: torch.Tensor) -> torch.Tensor:
        k = scores.shape[-1]
        prompt = self._factor.to(scores.device)[:, :k]
        factor = torch.nn.functional.pad(prompt, (0, k - prompt.shape[1]), value=1.0)[:, None, None, :]  # (B, 1, 1, K)
        new = torch.where(scores > torch.finfo(scores.dtype).min, scores * factor, scores)
        if block.phase is Phase.PREFILL:  # the record: attention moved at each row's last prompt token
            rows = torch.arange(scores.shape[0], device=scores.device)
            at = (self._last - block.q_start).to(scores.device)
            p = self.record.added.shape[1]
            moved = torch.softmax(new[rows, :, at].detach(), -1) - torch.softmax(scores[rows, :, at].detach(), -1)
            self.record.added += moved[..., :p].mean(1).to(self.record.added.device)
        return new


class VAFRuntime(Runtime):
    """VAF bound to a model: its layers (the paper's middle layers mapped to the model's depth unless given) and the
    vision-marker token ids that do not count as system-prompt text."""

    call = VAFCall

    def __init__(self, config: VAF, target: Target):
        super().__init__(config, target)
        n = target.adapter.num_layers
        layers = middle_layers(n) if config.layers is None else config.layers
        self.layers = model_layers("VAF", "layers", layers, n)
        self.layer_set = frozenset(self.layers)
        self.markers = removed_ids(target.adapter)

    def resolved(self) -> dict:
        return {"layers": list(self.layers)}

    def start(self, state: CallState) -> VAFCall:
        return VAFCall(self, state)


register_method(name="vaf", config=VAF, runtime=VAFRuntime, summary="visual amplification fusion (ClearSight, Yin "
                "et al., CVPR 2025): amplify image attention, suppress system-prompt attention in the middle layers")
