"""What every model-family adapter provides, and the family-agnostic row layout built from it.

An adapter knows *where* things are in one family of VLMs: the decoder layers, the head counts,
the image-token id, how many image tokens each image becomes and how they are laid out (grid
rows x cols, newline tokens), and which strings end the user's turn in its chat templates.
Everything else in vlmfix is family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..state import ImageSegment, RowLayout


class VlmfixInputError(ValueError):
    """Raised for inputs vlmfix cannot interpret (the message says what is wrong and what to do)."""


@dataclass(frozen=True)
class ImageLayout:
    """The token layout of one image: its segments and any newline tokens outside them (offsets
    relative to the image's first token)."""

    segments: tuple[ImageSegment, ...]
    length: int
    newlines: tuple[int, ...] = ()


class Adapter:
    """Base class of the per-family adapters. Subclasses set the class attributes and `image_layouts`."""

    family: str = ""
    model_classes: tuple[str, ...] = ()
    processor_classes: tuple[str, ...] = ()
    #: strings that end the user's turn in this family's chat templates (first match after the image wins)
    turn_end_markers: tuple[str, ...] = ("<|im_end|>", "ASSISTANT:", "[/INST]", "<|eot_id|>", "<end_of_turn>", "\nassistant")

    def __init__(self, model: nn.Module, processor: Any | None = None):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.text_config = self.config.get_text_config(decoder=True)
        self.decoder_layers: nn.ModuleList = self._find_decoder_layers()
        self.num_layers = len(self.decoder_layers)
        self.num_heads = int(self.text_config.num_attention_heads)
        self.num_kv_heads = int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)
        self.hidden_size = int(self.text_config.hidden_size)
        self.image_token_id = self._image_token_id()
        self.tokenizer = getattr(processor, "tokenizer", None) if processor is not None else None
        if processor is not None:
            self.check_processor(processor)

    @property
    def preset(self) -> dict[str, Any] | None:
        """This model's preset in configs/models (matched on name/path and width), if any."""
        from ..presets import model_preset

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
        for name in ("image_token_id", "image_token_index"):
            value = getattr(self.config, name, None)
            if value is not None:
                return int(value)
        raise VlmfixInputError(f"{type(self.model).__name__}.config has no image_token_id / image_token_index")

    def check_processor(self, processor: Any) -> None:
        """Raise when `processor` does not belong to this model (family, image token, vocabulary)."""
        name = type(processor).__name__
        if hasattr(processor, "image_processor") and self.processor_classes and name not in self.processor_classes:
            raise VlmfixInputError(
                f"processor {name} belongs to another model family; a {self.family} model needs "
                f"{' or '.join(self.processor_classes)} (load it with AutoProcessor from the model's folder)."
            )
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

    # -- image layout ---------------------------------------------------------------------------
    def image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        """Layouts of the images in `inputs`, in the order their tokens appear (row-major over the batch)."""
        raise NotImplementedError

    def row_layouts(self, inputs: Mapping[str, Any]) -> list[RowLayout]:
        """Per batch row: padding, image positions and grid segments, newline tokens, the user-query span.

        Raises VlmfixInputError when the prompt's image tokens do not match the image features.
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
        has_pixels = inputs.get("pixel_values") is not None or bool(encoded_images(inputs))
        layouts = self.image_layouts(inputs) if has_pixels else []
        n_expected = sum(lay.length for lay in layouts)
        is_image = input_ids == self.image_token_id
        n_tokens = int(is_image.sum())
        if n_tokens != n_expected:
            what = "no image was given" if not has_pixels else f"the images give {n_expected} feature vectors"
            raise VlmfixInputError(
                f"the prompt holds {n_tokens} image tokens but {what}. Build the inputs with the model's processor "
                f"(processor(images=..., text=...)), with one image placeholder in the text per image."
            )
        rows: list[RowLayout] = []
        next_image = 0
        seq_len = input_ids.shape[1]
        for b in range(input_ids.shape[0]):
            if attention_mask is not None:
                real = attention_mask[b].nonzero().flatten()
                pad_left = int(real[0]) if len(real) else seq_len
            else:
                pad_left = 0
            positions = is_image[b].nonzero().flatten()
            segments: list[ImageSegment] = []
            newlines: list[int] = []
            cursor = 0
            image_index = 0
            while cursor < len(positions):
                if next_image >= len(layouts):
                    raise VlmfixInputError("more image tokens than image features in the batch")
                lay = layouts[next_image]
                start = int(positions[cursor])
                span = positions[cursor : cursor + lay.length]
                if len(span) != lay.length or int(span[-1]) - start != lay.length - 1:
                    raise VlmfixInputError(
                        f"batch row {b}: image {image_index} should be {lay.length} consecutive image tokens; "
                        "build the prompt with the model's processor."
                    )
                for seg in lay.segments:
                    segments.append(
                        ImageSegment(start + seg.start, seg.rows, seg.cols, seg.newline, image_index, seg.name)
                    )
                    if seg.newline:
                        newlines.extend(
                            start + seg.start + r * (seg.cols + 1) + seg.cols for r in range(seg.rows)
                        )
                newlines.extend(start + k for k in lay.newlines)
                cursor += lay.length
                next_image += 1
                image_index += 1
            query, pieces = self._query_span(input_ids[b], positions, seq_len) if len(positions) else (None, None)
            rows.append(
                RowLayout(
                    index=b,
                    pad_left=pad_left,
                    prompt_len=seq_len,
                    image_positions=positions,
                    newline_positions=torch.tensor(sorted(newlines), dtype=torch.long),
                    segments=tuple(segments),
                    query_span=query,
                    query_pieces=pieces,
                )
            )
        return rows

    def _query_span(
        self, ids: torch.Tensor, image_positions: torch.Tensor, seq_len: int
    ) -> tuple[tuple[int, int] | None, tuple[str, ...] | None]:
        """[start, end) of the user's own text after the last image token, up to the turn-end marker,
        and the decoded pieces of its tokens (None without a tokenizer).

        Tokens right after the image that hold no text (e.g. a vision-end marker) are skipped. Without a
        tokenizer the span runs to the end of the prompt.
        """
        start = int(image_positions[-1]) + 1
        if start >= seq_len:
            return None, None
        if self.tokenizer is None:
            return (start, seq_len), None
        tail = ids[start:].tolist()
        pieces = [self.tokenizer.decode([t]) for t in tail]
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        # skip leading special tokens / whitespace-only pieces (vision end marker, the newline after <image>)
        lead = 0
        while lead < len(tail) and (tail[lead] in special or not pieces[lead].strip()):
            lead += 1
        text = "".join(pieces)
        ends = [0]
        for p in pieces:
            ends.append(ends[-1] + len(p))
        first = min((c for c in (text.find(m, ends[lead]) for m in self.turn_end_markers) if c >= 0), default=-1)
        stop = len(tail)
        if first >= 0:
            stop = next(k for k in range(len(tail)) if ends[k + 1] > first)
        if stop <= lead:
            return None, None
        return (start + lead, start + stop), tuple(pieces[lead:stop])



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


def encoded_images(inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    """Per-image feature tensors that `generate` encoded before the prefill (`mm_encoder_outputs`)."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    if encoded is None:
        return []
    features = getattr(encoded, "pooler_output", None)
    if features is None:
        features = encoded.last_hidden_state
    if isinstance(features, torch.Tensor):
        features = list(features) if features.ndim == 3 else [features]
    return list(features)
