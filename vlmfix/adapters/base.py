"""What every model-family adapter provides, and the family-agnostic row layout built from it.

An adapter knows *where* things are in one family of VLMs: the decoder layers, the head counts,
the image- and video-token ids, how many visual tokens each image (video) becomes and how they are
laid out (grid rows x cols, tiles, frames, newline tokens, separators that are not visual tokens),
and which strings open and end the user's turn in its chat templates (from which `question` reads the
user's question off the token ids).
Everything else in vlmfix is family-agnostic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import accumulate
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vlmfix.core.state import ImageSegment, RowLayout, runs


class VlmfixInputError(ValueError):
    """Raised for inputs vlmfix cannot interpret (the message says what is wrong and what to do)."""


@dataclass(frozen=True)
class ImageLayout:
    """The token layout of one image (or video, or one frame of a video), in offsets relative to its
    first visual token.

    - `segments`: its grids (`ImageSegment`, starts relative to the first token); a segment may be
      followed by non-visual tokens (a tile's separator text, Pixtral's row breaks), so the image's
      tokens may come in several runs;
    - `length`: its number of visual tokens (the feature vectors it becomes);
    - `newlines`: visual newline tokens outside the segments; `extra`: other visual tokens outside
      the segments (a CLS token);
    - `continues`: a later frame of the video before it, separated from it by text of any length
      (Qwen3-VL's timestamps): its segments keep that video's image index.

    `offsets` (every visual token's offset: the segments' patches and newlines, `newlines`,
    `extra`) must hold `length` distinct offsets starting at 0.
    """

    segments: tuple[ImageSegment, ...]
    length: int
    newlines: tuple[int, ...] = ()
    extra: tuple[int, ...] = ()
    continues: bool = False

    def __post_init__(self) -> None:
        got = self.offsets
        if len(got) != self.length or (len(got) and int(got[0]) != 0) or bool((got[1:] == got[:-1]).any()):
            raise ValueError(f"inconsistent image layout: {len(got)} offsets from {got[:1].tolist()} "
                             f"for {self.length} visual tokens ({self})")

    @cached_property
    def offsets(self) -> torch.Tensor:
        """(length,) sorted offsets of the visual tokens relative to the first one."""
        parts = [s.grid_positions().flatten() for s in self.segments]
        parts += [s.newline_positions() for s in self.segments]
        parts.append(torch.tensor(self.newlines + self.extra, dtype=torch.long))
        return torch.cat(parts).sort().values


class Adapter:
    """Base class of the per-family adapters. Subclasses set the class attributes and `image_layouts`."""

    family: str = ""
    model_classes: tuple[str, ...] = ()
    processor_classes: tuple[str, ...] = ()
    #: strings that open a user turn in this family's chat templates: the last one in the prompt opens the
    #: turn that holds the question (ChatML, Vicuna, Mistral, Llama 3)
    user_markers: tuple[str, ...] = ("<|im_start|>user", "USER:", "[INST]", "<|start_header_id|>user<|end_header_id|>")
    #: strings that end the user's turn in this family's chat templates (the first after the turn's opener ends it)
    turn_end_markers: tuple[str, ...] = ("<|im_end|>", "ASSISTANT:", "[/INST]", "<|eot_id|>", "<end_of_turn>", "\nassistant")
    #: a regular expression of the text this family's processor writes beside visual tokens (video timestamps,
    #: frame labels), never the user's; None: it writes none
    processor_text: str | None = None

    def __init__(self, model: nn.Module, processor: Any | None = None):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.text_config = self.config.get_text_config(decoder=True)
        self.decoder_layers: nn.ModuleList = self._find_decoder_layers()
        other = [i for i, layer in enumerate(self.decoder_layers) if not hasattr(layer, "self_attn")]
        if other:
            raise VlmfixInputError(
                f"decoder layers {other} of {type(model).__name__} have no softmax self-attention (linear-attention "
                "layers of a hybrid decoder, as in Qwen3.5): vlmfix routes softmax attention only and does not "
                "support this model yet."
            )
        self.num_layers = len(self.decoder_layers)
        self.num_heads = int(self.text_config.num_attention_heads)
        self.num_kv_heads = int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)
        self.hidden_size = int(self.text_config.hidden_size)
        self.image_token_id = self._image_token_id()
        self.video_token_id = self._video_token_id()
        #: every visual token id (image, then video): the image mask, sinks, VAR, GIFT and pruning see them all
        self.visual_token_ids: tuple[int, ...] = tuple(
            t for t in (self.image_token_id, self.video_token_id) if t is not None)
        self.tokenizer = tokenizer_of(processor)
        if processor is not None:
            self.check_processor(processor)

    @property
    def preset(self) -> dict[str, Any] | None:
        """This model's preset in configs/models (matched on name/path and width), if any."""
        from vlmfix.core.presets import model_preset

        names = " ".join(str(getattr(c, "_name_or_path", "") or "") for c in (self.config, self.text_config))
        return model_preset(names, self.hidden_size)

    # -- where things are -------------------------------------------------------------------
    def _find_decoder_layers(self) -> nn.ModuleList:
        lm = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        layers = getattr(lm, "layers", None)
        if layers is None:
            lm = getattr(getattr(self.model, "model", self.model), "language_model", None)
            layers = getattr(lm, "layers", None)
        if layers is None:
            raise VlmfixInputError(f"could not find the decoder layers of {type(self.model).__name__}")
        return layers

    def _image_token_id(self) -> int:
        found = config_token_id(self.config, "image")
        if found is None:
            raise VlmfixInputError(f"{type(self.model).__name__}.config has no image_token_id / image_token_index")
        return found

    def _video_token_id(self) -> int | None:
        """The video placeholder id of families that take `pixel_values_videos` (None otherwise)."""
        return config_token_id(self.config, "video")

    def check_family(self, processor: Any) -> None:
        """Raise when `processor` is another family's (by class name; a bare tokenizer passes)."""
        name = type(processor).__name__
        if hasattr(processor, "image_processor") and self.processor_classes and name not in self.processor_classes:
            raise VlmfixInputError(
                f"processor {name} belongs to another model family; a {self.family} model needs "
                f"{' or '.join(self.processor_classes)} (load it with AutoProcessor from the model's folder)."
            )

    def check_processor(self, processor: Any) -> None:
        """Raise when `processor` does not belong to this model (family, image token, vocabulary)."""
        self.check_family(processor)
        tok = getattr(processor, "tokenizer", processor)
        proc_image_id = getattr(processor, "image_token_id", None)
        if proc_image_id is None and hasattr(processor, "image_token") and hasattr(tok, "convert_tokens_to_ids"):
            proc_image_id = tok.convert_tokens_to_ids(processor.image_token)
        if proc_image_id is not None and int(proc_image_id) != self.image_token_id:
            raise VlmfixInputError(
                f"processor/model mismatch: the processor writes image token id {proc_image_id} but the model expects "
                f"{self.image_token_id}. Load processor and model from the same checkpoint."
            )
        vocab = len(tok) if hasattr(tok, "__len__") else None
        model_vocab = getattr(self.text_config, "vocab_size", None)
        if vocab is not None and model_vocab is not None and vocab > model_vocab:
            raise VlmfixInputError(
                f"processor/model mismatch: the tokenizer has {vocab} tokens but the model's embedding has "
                f"{model_vocab}. Load processor and model from the same checkpoint."
            )

    def check_pruning(self, layers: tuple[int, ...], form: str) -> None:
        """Raise VlmfixInputError when token pruning in `form` ("inplace" / "mask") from decoder `layers`
        cannot run on this family (e.g. features the model adds to visual positions after a pruned
        layer); every family can by default."""

    def prepare_cache(self, cache: Any) -> None:
        """At the prefill of a call whose attention a method may edit: make `cache` (None without one) keep
        every key at its position for the whole call, or raise VlmfixInputError when it cannot (Gemma 3's
        sliding-window layers); nothing to do by default."""

    # -- the vision side (ReadsVision / EditsFeatures, vlmfix.core.vision) ----------------------------
    #: whether vision-side methods can run on this family (its adapter maps the tower to the image tokens)
    vision_side: bool = False

    @property
    def vision_tower(self) -> nn.Module | None:
        """The model's vision tower (`model.model.vision_tower`), or None."""
        return getattr(getattr(self.model, "model", self.model), "vision_tower", None)

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's encoder layers (each with `self_attn.q_proj` / `k_proj`)."""
        self.check_vision_side()
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def projector(self) -> nn.Module:
        """The multi-modal projector, whose forward output is the image features (images, N, D) scattered into
        the decoder's input embeddings."""
        self.check_vision_side()
        return getattr(self.model, "model", self.model).multi_modal_projector

    @property
    def vision_cls(self) -> bool:
        """Whether the tower's tokens start with a CLS token that the image features drop."""
        return False

    @property
    def vision_feature_layer(self) -> int:
        """The encoder layer (0-based) whose output feeds the projector."""
        return len(self.vision_layers) - 1

    def vision_token_map(self, tower_tokens: int) -> torch.Tensor:
        """(tower_tokens,) long: the offset among its image's N features (tokens) that each tower token of
        one image feeds, -1 for none (a dropped CLS); several patches may feed one token (pooling)."""
        raise NotImplementedError

    def check_vision_side(self) -> None:
        """Raise VlmfixInputError unless vision-side methods can run on this family."""
        if not self.vision_side:
            from vlmfix.adapters import ADAPTERS

            ok = ", ".join(a.family for a in ADAPTERS if a.vision_side)
            raise VlmfixInputError(
                f"vision-side methods (ReadsVision / EditsFeatures) do not support {self.family or type(self.model).__name__} "
                f"yet: its adapter does not map the vision tower's patches to image tokens. Supported families: {ok}."
            )

    # -- image layout ---------------------------------------------------------------------------
    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        """Layouts of the images in `inputs`, in the order their tokens appear (row-major over the batch)."""
        raise NotImplementedError

    def video_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        """Layouts of the videos in `inputs` (frames as segments, or one layout per frame with
        `continues`), in the order their tokens appear. Families without video have none."""
        return []

    def _layout_queues(self, inputs: Mapping[str, Any]) -> dict[int, list[ImageLayout]]:
        """{visual token id: the layouts of its images / videos in order}, empty where no pixels were given."""
        queues = {self.image_token_id: []}
        has_images = inputs.get("pixel_values") is not None or bool(encoded_images(inputs))
        if has_images:
            queues[self.image_token_id] = list(self.image_layouts(inputs))
        if self.video_token_id is not None:
            has_videos = inputs.get("pixel_values_videos") is not None or bool(encoded_images(inputs, "video"))
            queues[self.video_token_id] = list(self.video_layouts(inputs)) if has_videos else []
        return queues

    def row_layouts(self, inputs: Mapping[str, Any]) -> list[RowLayout]:
        """Per batch row: padding, visual-token positions and grid segments, newline tokens, the user's
        question (`question`).

        The padding comes from the attention mask, on either side: the row's real tokens run from its
        first masked-in position to its last, and the question ends by its last real token.

        Each image's tokens must sit at exactly its first token + `ImageLayout.offsets`; a
        VlmfixInputError says so otherwise, and when the prompt's visual tokens do not match the
        image / video features.
        """
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise VlmfixInputError(
                "vlmfix needs input_ids to find the image tokens; call generate with the processor's input_ids "
                "rather than inputs_embeds."
            )
        # the layout is bookkeeping: it lives on the CPU whatever device the model runs on
        input_ids = input_ids.cpu()
        attention_mask = padding_mask(inputs.get("attention_mask"), input_ids.shape[1])
        queues = self._layout_queues(inputs)
        for token, queue in queues.items():
            kind = "video" if token == self.video_token_id else "image"
            n_tokens, n_expected = int((input_ids == token).sum()), sum(lay.length for lay in queue)
            if n_tokens != n_expected:
                what = f"no {kind} was given" if not queue else f"the {kind}s give {n_expected} feature vectors"
                raise VlmfixInputError(
                    f"the prompt holds {n_tokens} {kind} tokens but {what}. Build the inputs with the model's "
                    f"processor (processor(images=..., text=...)), with one {kind} placeholder in the text per {kind}."
                )
        is_visual = torch.isin(input_ids, torch.tensor(self.visual_token_ids))
        rows: list[RowLayout] = []
        seq_len = input_ids.shape[1]
        pads = torch.zeros(input_ids.shape[0], 2, dtype=torch.long) if attention_mask is None else sides(attention_mask)
        for b in range(input_ids.shape[0]):
            pad_left, pad_right = pads[b].tolist()
            positions = is_visual[b].nonzero().flatten()
            segments: list[ImageSegment] = []
            newlines: list[torch.Tensor] = []
            extents: list[tuple[int, int]] = []  # [first, last] position of each image / video
            cursor, image_index = 0, -1
            while cursor < len(positions):
                start = int(positions[cursor])
                token = int(input_ids[b, start])
                kind = "video" if token == self.video_token_id else "image"
                lay = queues[token].pop(0)
                last = start + int(lay.offsets[-1])
                if lay.continues and image_index >= 0:
                    extents[-1] = (extents[-1][0], last)
                else:
                    image_index += 1
                    extents.append((start, last))
                span = positions[cursor : cursor + lay.length]
                fits = len(span) == lay.length and torch.equal(span, start + lay.offsets)
                if not fits or bool((input_ids[b, span] != token).any()):
                    raise VlmfixInputError(
                        f"batch row {b}: {kind} {image_index} should be {lay.length} {kind} tokens at offsets "
                        f"{_brief(lay.offsets)} from its first one (at {start}), but they are at offsets "
                        f"{_brief(span - start)}; build the prompt with the model's processor."
                    )
                for seg in lay.segments:
                    seg = replace(seg, start=start + seg.start, image_index=image_index)
                    segments.append(seg)
                    newlines.append(seg.newline_positions())
                newlines.append(start + torch.tensor(lay.newlines, dtype=torch.long))
                cursor += lay.length
            end = seq_len - pad_right
            question = self.question(input_ids[b], pad_left, extents, end)
            rows.append(
                RowLayout(
                    index=b,
                    pad_left=pad_left,
                    prompt_len=seq_len,
                    image_positions=positions,
                    newline_positions=torch.cat([torch.zeros(0, dtype=torch.long), *newlines]).sort().values,
                    segments=tuple(segments),
                    query_positions=None if question is None else question[0],
                    query_pieces=None if question is None else question[1],
                    pad_right=pad_right,
                )
            )
        return rows

    def question(
        self, ids: torch.Tensor, pad_left: int = 0, visual_extents: Sequence[tuple[int, int]] = (),
        end: int | None = None,
    ) -> tuple[torch.Tensor, tuple[str, ...]] | None:
        """The user's question in one prompt row `ids` (1-D, on the CPU): (the sorted positions of its tokens,
        their decoded pieces), or None when no tokenizer was given (the question is then unknown, and
        nothing guesses it) or the last user turn holds no text.

        The question is the text of the last user turn, wherever the images stand (before, after or
        between its text pieces, or in an earlier turn). The turn opens after the last of the family's
        `user_markers` in the row (at the row's first token when there is none: a prompt written without
        a chat template is one user turn) and closes at the first of its `turn_end_markers` after that
        (at the end of the prompt when none follows). Its text is every token that decodes wholly inside
        the turn, except visual tokens, the tokenizer's special and added tokens (role headers, image
        placeholders, vision start / end), tokens between the first and last visual token of one image
        or video (`visual_extents`: [first, last] positions; tile separators, frame timestamps), text of
        `processor_text`, and whitespace-only tokens at either edge of a stretch of text (the newline a
        template writes after an image). Text pieces around an image give positions that are not
        contiguous. The row's real tokens run from `pad_left` to `end` (exclusive; right padding after).
        """
        if self.tokenizer is None:
            return None
        tail = ids[pad_left:end].tolist()
        decoded = {t: self.tokenizer.decode([t]) for t in set(tail)}
        pieces = [decoded[t] for t in tail]
        ends = list(accumulate(map(len, pieces), initial=0))
        text = "".join(pieces)
        opener = max((i + len(m) for m in self.user_markers if (i := text.rfind(m)) >= 0), default=0)
        close = min((c for c in (text.find(m, opener) for m in self.turn_end_markers) if c >= 0), default=len(text))
        skip = {*getattr(self.tokenizer, "all_special_ids", ()), *getattr(self.tokenizer, "added_tokens_decoder", {}),
                *self.visual_token_ids}
        written = [m.span() for m in re.finditer(self.processor_text, text)] if self.processor_text else []
        inside = [(first - pad_left, last - pad_left) for first, last in visual_extents]
        kept = [
            k for k, t in enumerate(tail)
            if opener <= ends[k] and ends[k + 1] <= close and t not in skip
            and not any(first < k < last for first, last in inside)
            and not any(a <= ends[k] and ends[k + 1] <= b for a, b in written)
        ]
        positions: list[int] = []
        for stretch in runs(torch.tensor(kept, dtype=torch.long)):
            words = [k for k in stretch.tolist() if pieces[k].strip()]
            if words:
                positions += range(words[0], words[-1] + 1)
        if not positions:
            return None
        return torch.tensor(positions) + pad_left, tuple(pieces[k] for k in positions)


def padding_mask(mask: Any, seq_len: int) -> torch.Tensor | None:
    """(B, seq_len) CPU mask of a prompt's real tokens from the mask its forward got: the processor's 2-D
    mask, or the 4-D mask (or {kind: 4-D mask}) that generate builds for a static cache, read on its last
    query row (which sees every real prompt token)."""
    if mask is None:
        return None
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values())))
    if mask.dim() == 2:
        return mask.cpu()
    last = mask[:, 0, -1, :seq_len]
    if last.dtype != torch.bool:
        last = last > torch.finfo(last.dtype).min / 2
    return last.cpu()


def sides(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2): per row of a 2-D padding mask (B, seq_len), the padding positions before its first real token
    and after its last, whichever side the processor padded ((seq_len, 0) for a row with no real token)."""
    real = mask.bool()
    seq_len = real.shape[1]
    some = real.any(1)
    left = torch.where(some, real.int().argmax(1), seq_len)
    right = torch.where(some, real.flip(1).int().argmax(1), 0)
    return torch.stack([left, right], 1)


def feature_spans(
    inputs: Mapping[str, Any], token: int, counts: list[int]
) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
    """Pre-encoded features of `counts[k]` tokens each (in order) matched to the prompt's positions of
    `token`, row by row: ([(batch row, its positions)] per matched feature, the counts left unmatched)."""
    is_token = inputs["input_ids"].cpu() == token
    queue, spans = list(counts), []
    for b in range(is_token.shape[0]):
        positions = is_token[b].nonzero().flatten()
        cursor = 0
        while cursor < len(positions) and queue:
            span = positions[cursor : cursor + queue.pop(0)]
            spans.append((b, span))
            cursor += len(span)
    return spans, queue


def config_token_id(config: Any, kind: str) -> int | None:
    """`config.<kind>_token_id` or `config.<kind>_token_index` (the two spellings transformers uses), or None."""
    for name in (f"{kind}_token_id", f"{kind}_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def _brief(offsets: torch.Tensor) -> str:
    """A short rendering of an offset list for error messages."""
    values = offsets.tolist()
    if len(values) <= 8:
        return str(values)
    return f"[{', '.join(map(str, values[:6]))}, ..., {values[-1]}] ({len(values)})"


def tokenizer_of(processor_or_tokenizer: Any | None) -> Any | None:
    """The tokenizer in what attach was given: a processor's `tokenizer`, or the object itself when it
    is a tokenizer (anything with `decode` and `convert_tokens_to_ids`); None otherwise."""
    if processor_or_tokenizer is None:
        return None
    tok = getattr(processor_or_tokenizer, "tokenizer", None)
    if tok is None and all(hasattr(processor_or_tokenizer, a) for a in ("decode", "convert_tokens_to_ids")):
        tok = processor_or_tokenizer
    return tok


def encoded_images(inputs: Mapping[str, Any], modality: str = "image") -> list[torch.Tensor]:
    """Per-image (or per-video, `modality="video"`) feature tensors that `generate` encoded before the
    prefill (`mm_encoder_outputs`)."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get(modality)
    if encoded is None:
        return []
    features = getattr(encoded, "pooler_output", None)
    if features is None:
        features = encoded.last_hidden_state
    if isinstance(features, torch.Tensor):
        features = list(features) if features.ndim == 3 else [features]
    return list(features)
