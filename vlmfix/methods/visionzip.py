"""VisionZip: dominant tokens by the vision tower's attention, plus contextual tokens merged by key similarity.

Paper: Yang, Chen, Tian, Wang, Li, Yu, Jia, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025 (arXiv 2412.04467). Training-free and text-free, before the decoder. Per
image the vision tower encodes, at the tower layer whose output feeds the projector (LLaVA-1.5: the
second-to-last, `vision_feature_layer` -2; `vision_layer` overrides it), with A_h the layer's attention
(softmax(q k^T / sqrt(d)) of head h) and K the layer's keys:

- dominant tokens: the D image tokens with the highest score
      a_j = mean_h A_h[cls, j]                      (a tower with a CLS token: CLIP)
      a_j = mean_h mean_i A_h[i, j]                 (no CLS: SigLIP, Gemma 3's tower; the paper's rule for
                                                     such towers, the mean attention each token receives);
  where several patches feed one image token (Gemma 3 pools 4 x 4 patches), the token's score and key are
  its patches' means (`VisionImage.pooled`);
- contextual tokens: the remaining R tokens (in raster order) split into C targets, taken uniformly
  (every floor(R / C)-th remaining token, the first C), and the others, each assigned to the target whose
  key is most similar (cosine of the keys averaged over heads, as token merging's similarity); each
  target becomes the mean of its group (itself and its assigned tokens).

The D + C tokens enter the decoder; the others leave the sequence before layer 0 (in place,
`vlmfix.methods.predecoder`; or, `form="mask"`, are masked out as keys from layer 0 on: the form that runs
under a static cache / compiled generation), a merged token's group recorded as the stage's `SlotMap.owner`.

The merge, as the paper's, is of the tower's features before the projector where the projector maps one
input row to one image token (LLaVA-1.5's MLP: the contextual feature is projector(mean of the group's
inputs)); where the projector pools patches into tokens (Gemma 3), of the projected features (the mean
of the group's features).

Budget: D + C = `keep` (or ceil(`keep_ratio` x N)) per image the tower encodes (a Gemma 3 pan-and-scan
crop is one), C = round(`contextual` x keep): the paper's split, 54 + 10 of 64, 108 + 20 of 128,
162 + 30 of 192, is `contextual` = 10 / 64.

Families: those whose adapter maps the tower's patches to the image tokens (`Adapter.vision_side`:
LLaVA-1.5, Gemma 3); the others are refused at attach (DivPrune works on every family).

Choices where the paper leaves them open (also in docs/methods.md, "VisionZip"): the kept tokens keep their
original positions, the contextual token its target's (the paper drops the others and the LLM renumbers
what is left, contextual tokens after the dominant ones); the head-mean of the keys for the similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from vlmfix.core.protocol import EditsFeatures, ReadsVision, Target
from vlmfix.core.vision import VisionImage
from vlmfix.methods.base import CallState, HeatMaps, MethodConfig, check_number, is_int, raise_problems
from vlmfix.methods.predecoder import PreDecoderCall, PreDecoderRuntime, budget_problems
from vlmfix.methods.prune import PruneRecord
from vlmfix.methods.registry import register_method

__all__ = ["VisionZip", "VisionZipCall", "VisionZipRecord", "VisionZipRuntime", "contextual_merge",
           "dominant_scores"]

#: the paper's share of contextual tokens among the kept: 10 of 64 (20 of 128, 30 of 192)
PAPER_CONTEXTUAL = 10 / 64


def dominant_scores(attention: torch.Tensor, cls: bool) -> torch.Tensor:
    """(T,) per tower token: the attention the CLS token (tower token 0) gives it, or, without a CLS, the mean
    attention it receives; both averaged over heads. `attention` (H, T, T) fp32."""
    if cls:
        return attention[:, 0, :].mean(0)
    return attention.mean((0, 1))


def contextual_merge(keys: torch.Tensor, remaining: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (C,), owner (R,)): of the `remaining` token indices (R,), sorted, the C = `count` targets taken
    uniformly (every floor(R / C)-th, the first C), and for each remaining token the target it joins (a target
    itself), by the cosine similarity of the (N, d) `keys`."""
    step = max(1, len(remaining) // count)
    targets = remaining[::step][:count].contiguous()
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    best = (k[remaining] @ k[targets].T).argmax(1)
    owner = targets[best]
    owner[torch.searchsorted(remaining, targets)] = targets
    return targets, owner


@dataclass
class VisionZipRecord(PruneRecord):
    """A `PruneRecord` (one stage at layer 0: the dominant and contextual tokens kept) with, per row, the
    `dominant` and `contextual` prompt positions and `merged` (B, P): the contextual token each merged position
    joined (-1 for none)."""

    dominant: list[torch.Tensor] = field(default_factory=list)
    contextual: list[torch.Tensor] = field(default_factory=list)
    merged: torch.Tensor | None = None

    acts: ClassVar[str] = "kept dominant and merged contextual image tokens"

    def row(self, row: int) -> dict[str, Any]:
        out = super().row(row)
        if self.stages:
            out.update(dominant=len(self.dominant[row]), contextual=len(self.contextual[row]),
                       merged=int((self.merged[row] >= 0).sum()))
        return out

    def heat_maps(self, maps: HeatMaps) -> list[str]:
        """`kept_tokens.png`: batch row 0's dominant tokens (bright), contextual tokens (middle, outlined with the
        dominant ones) and the tokens merged into them (dim); then the budget notes."""
        state = maps.state
        if not self.stages or not state.rows[0].has_image:
            return super().heat_maps(maps)
        values = torch.zeros(state.batch_size, state.prompt_len)
        values[0, self.merged[0] >= 0] = 0.3
        values[0, self.contextual[0]] = 0.6
        values[0, self.dominant[0]] = 1.0
        path = maps.grid("kept_tokens.png", values, f"VisionZip: {len(self.dominant[0])} dominant and "
                         f"{len(self.contextual[0])} contextual image tokens enter the decoder",
                         vmin=0.0, vmax=1.0, marked=values >= 0.6, alpha=0.45,
                         legend=[("kept", "bright: dominant; middle: contextual (a merged group's token); dim: merged "
                                          "into a contextual token; dark: dropped")])
        return [f"heat map, kept image tokens: {path}"] + [f"pruner: {note}" for note in self.budget_notes]

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.stages:
            out["dominant"] = [d.tolist() for d in self.dominant]
            out["contextual"] = [c.tolist() for c in self.contextual]
            out["merged_into"] = self.merged.tolist()
        return out


class VisionZipCall(PreDecoderCall, ReadsVision, EditsFeatures):
    """Selects and merges per image at the tower (`read_vision`), writes the contextual features
    (`edit_features`); `InPlaceMoves` removes the other tokens before decoder layer 0."""

    record_type = VisionZipRecord
    record: VisionZipRecord

    def __init__(self, runtime: "VisionZipRuntime", state: CallState):
        b = state.batch_size
        super().__init__(runtime, state, VisionZipRecord(
            "inplace", (0,), [[0] * b], [None] * b, False, [len(r.image_positions) for r in state.rows]))
        #: per image index: (contextual targets (C,), the target each token joins (N,), -1 for none)
        self._groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def read_vision(self, state: CallState, images: Sequence[VisionImage]) -> None:
        rt: VisionZipRuntime = self.runtime
        rec = self.record
        b, p = state.batch_size, state.prompt_len
        owner = torch.full((b, p), -1, dtype=torch.long)
        dominant: list[list[torch.Tensor]] = [[] for _ in range(b)]
        contextual: list[list[torch.Tensor]] = [[] for _ in range(b)]
        scores = [torch.zeros(len(r.image_positions)) for r in state.rows]
        budgets = [0] * b
        for img in images:
            n = len(img.positions)
            pos = img.positions.cpu()
            s = img.pooled(dominant_scores(img.attention, rt.cls)).cpu()
            scores[img.row][torch.searchsorted(state.rows[img.row].image_positions, pos)] = s
            self._note_keep(img.row, n, f"image {img.image_index}")
            k = rt.budget(n)
            c = min(round(rt.contextual * k), k - 1) if k < n else 0
            top = torch.topk(s, k - c).indices.sort().values
            rest = torch.ones(n, dtype=torch.bool)
            rest[top] = False
            remaining = rest.nonzero().flatten()
            budgets[img.row] += k
            dominant[img.row].append(pos[top])
            if c > 0:
                keys = img.pooled(img.keys.mean(0)).cpu()  # (N, d): the head-mean key of each image token
                targets, joins = contextual_merge(keys, remaining, c)
                to = torch.full((n,), -1, dtype=torch.long)
                to[remaining] = joins
                self._groups[img.index] = (targets, to)
                contextual[img.row].append(pos[targets])
                members = remaining[joins != remaining]
                owner[img.row, pos[members]] = pos[to[members]]
        kept = [torch.cat(d + c).sort().values if d else r.image_positions
                for d, c, r in zip(dominant, contextual, state.rows)]
        none = torch.zeros(0, dtype=torch.long)
        rec.dominant = [torch.cat(d).sort().values if d else none for d in dominant]
        rec.contextual = [torch.cat(c).sort().values if c else none for c in contextual]
        rec.merged = owner
        self._stage(state, kept, budgets, scores, owner if self._groups else None)

    def edit_features(self, state: CallState, image: VisionImage, features: torch.Tensor) -> torch.Tensor | None:
        """The contextual tokens' features: projector(mean of the group's projector inputs) where the projector
        maps one row to one token, else the mean of the group's features."""
        group = self._groups.get(image.index)
        if group is None:
            return None
        targets, to = group
        members = (to >= 0).nonzero().flatten()
        source = image.projector_input if image.projector_input is not None else features
        idx = to[members].to(source.device)
        sums = torch.zeros_like(source, dtype=torch.float32).index_add_(0, idx, source[members.to(source.device)].float())
        count = torch.bincount(to[members], minlength=len(to)).clamp_min(1).to(sums)
        means = (sums / count[:, None])[targets.to(source.device)].to(source.dtype)
        if image.projector_input is not None:
            means = self.runtime.target.adapter.projector(means[None])[0]
        out = features.clone()
        out[targets.to(features.device)] = means.to(features.dtype)
        return out


class VisionZipRuntime(PreDecoderRuntime):
    """VisionZip bound to a model: the tower layer read (`vision_layer`), whether its tower has a CLS token,
    the contextual share."""


    def __init__(self, config: "VisionZip", target: Target):
        super().__init__(config, target)
        adapter = target.adapter
        try:
            adapter.check_vision_side()
        except ValueError as err:
            raise type(err)(f"VisionZip reads the vision tower's attention and keys: {err} DivPrune (methods divprune) "
                            "selects from the image features on every family.") from None
        tower = adapter.vision_tower
        #: a CLS token first among the tower's tokens (CLIP's `class_embedding`; SigLIP has none)
        self.cls = hasattr(getattr(getattr(tower, "vision_model", tower), "embeddings", None), "class_embedding")
        self.vision_layer = config.vision_layer
        self.contextual = float(config.contextual)

    def start(self, state: CallState) -> VisionZipCall:
        return VisionZipCall(self, state)

    call = VisionZipCall

    def resolved(self) -> dict[str, Any]:
        return {**super().resolved(), "dominant_score": "attention from CLS" if self.cls else "mean attention received"}


@dataclass
class VisionZip(MethodConfig):
    """VisionZip (Yang et al., CVPR 2025): per image, dominant tokens by the tower's attention plus contextual
    tokens merged by key similarity, before the decoder.

    - keep: image tokens kept per image (dominant + contextual; 128 when neither keep nor keep_ratio is given),
      or keep_ratio in (0, 1] of each image's tokens;
    - contextual: the share of the kept tokens that are contextual (the paper's 10 / 64: 54 + 10 of 64);
    - vision_layer: the tower's encoder layer read (None: the one feeding the projector, the paper's);
    - form: "inplace" (the pruned tokens leave the sequence: the speed-up) or "mask" (they are masked out as keys
      from layer 0 on: the form that runs under a static cache / compiled generation; same tokens, same logits).
    Every mistake is refused at construction; a layer beyond the tower's depth at attach."""

    keep: int | None = None
    keep_ratio: float | None = None
    contextual: float = PAPER_CONTEXTUAL
    vision_layer: int | None = None
    form: str = "inplace"

    def __post_init__(self) -> None:
        raise_problems("VisionZip", [
            *budget_problems(self.keep, self.keep_ratio, self.form),
            check_number("contextual", self.contextual, 0.0, 1.0),
            None if self.vision_layer is None or is_int(self.vision_layer) else
            f"vision_layer must be an int (negative from the last tower layer) or None, got {self.vision_layer!r}",
        ])


register_method(name="visionzip", config=VisionZip, runtime=VisionZipRuntime,
                summary="VisionZip (Yang et al., CVPR 2025): keep the image tokens the vision tower attends most, "
                        "merge the rest into a few by key similarity, before the decoder")
