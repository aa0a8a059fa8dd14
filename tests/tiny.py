"""Tiny random models of the three supported families, built from config objects (no downloads),
with hand-built inputs (image placeholders expanded as each family's processor would)."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

VOCAB = 128
IMAGE = 100  # image token id
PAD = 0
VSTART, VEND = 101, 102  # Qwen2-VL vision start / end
FAMILIES = ("llava", "llava_next", "qwen2_vl")


def _text(**kw) -> dict:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(kw)
    return cfg


def _vision() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=30, patch_size=6)


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llava":
        cfg = LlavaConfig(vision_config=_vision(), text_config=LlamaConfig(**_text()), image_token_index=IMAGE,
                          vision_feature_layer=-1)
        model = LlavaForConditionalGeneration(cfg)
    elif family == "llava_next":
        cfg = LlavaNextConfig(vision_config=_vision(), text_config=LlamaConfig(**_text()), image_token_index=IMAGE,
                              vision_feature_layer=-1, image_grid_pinpoints=[[30, 60], [60, 30], [60, 60]])
        model = LlavaNextForConditionalGeneration(cfg)
    elif family == "qwen2_vl":
        cfg = Qwen2VLConfig(
            vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
            text_config=dict(model_type="qwen2_vl_text", **_text(rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})),
            image_token_id=IMAGE, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        )
        model = Qwen2VLForConditionalGeneration(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def image_tokens(family: str, model, size: tuple[int, int]) -> tuple[int, dict]:
    """(number of image tokens, pixel inputs) for one image of `size` (H, W)."""
    g = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    if family == "llava":
        return 25, {"pixel_values": torch.randn(1, 3, 30, 30, generator=g)}
    if family == "llava_next":
        from vlmfix.adapters.llava_next import LlavaNextAdapter

        n = image_size_to_num_patches(size, model.config.image_grid_pinpoints, 30)
        inputs = {"pixel_values": torch.randn(1, n, 3, 30, 30, generator=g), "image_sizes": torch.tensor([size])}
        lay = LlavaNextAdapter(model).image_layouts(inputs)[0]
        return lay.length, inputs
    h, w = max(2, size[0] // 14 // 2 * 2), max(2, size[1] // 14 // 2 * 2)
    grid = torch.tensor([[1, h, w]])
    return h * w // 4, {"pixel_values": torch.randn(h * w, 3 * 2 * 14 * 14, generator=g), "image_grid_thw": grid}


def left_pad(seqs: list[list[int]]) -> dict:
    """{"input_ids", "attention_mask"} of `seqs` left-padded with PAD."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def right_pad(batch: dict) -> dict:
    """The left-padded `batch` (any family's) padded on the right instead: each row's real tokens moved to
    its start, with every per-token input (input_ids, attention_mask, token type ids) moved alike."""
    mask = batch["attention_mask"]
    shift = (mask == 0).sum(1)
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.shape == mask.shape:
            out[key] = torch.stack([row.roll(-int(k)) for row, k in zip(value, shift)])
    return out


def make_batch(family: str, model, prompts: list[tuple[list[int], tuple[int, int] | None, list[int]]]) -> dict:
    """Left-padded batch. Each prompt: (text before the image, image size or None, text after)."""
    seqs, pixels = [], []
    for before, size, after in prompts:
        ids = list(before)
        if size is not None:
            n, px = image_tokens(family, model, size)
            ids += ([VSTART] if family == "qwen2_vl" else []) + [IMAGE] * n + ([VEND] if family == "qwen2_vl" else [])
            pixels.append(px)
        ids += list(after)
        seqs.append(ids)
    batch = left_pad(seqs)
    input_ids = batch["input_ids"]
    if family == "qwen2_vl":
        batch["mm_token_type_ids"] = (input_ids == IMAGE).int()
    if pixels:
        if family == "llava_next":
            most = max(p["pixel_values"].shape[1] for p in pixels)
            pv = [torch.nn.functional.pad(p["pixel_values"], (0, 0, 0, 0, 0, 0, 0, most - p["pixel_values"].shape[1]))
                  for p in pixels]
            batch["pixel_values"] = torch.cat(pv)
            batch["image_sizes"] = torch.cat([p["image_sizes"] for p in pixels])
        else:
            for key in pixels[0]:
                batch[key] = torch.cat([p[key] for p in pixels])
    return batch


#: the tiny tokenizer's text vocabulary (byte-level pieces, "Ġ" a leading space, "Ċ" a newline): ids 3, 4 a newline
#: and "?", then content words (ids 5..83, so the test prompts' text ids are informative words), then the
#: closed-class words and chat-template pieces of ids 84..99
_WORDS = ("cat dog red blue tree car bird house green ball sky water man woman bike road sun book table chair cup "
          "phone horse boat train cloud flower colour picture image").split()
_CLOSED = ["Ġ" + w for w in "Is there a the in of what is What on this Describe".split()]
_CLOSED += ["user", "assistant", ".", ","]
#: the pieces of Qwen3-VL's video timestamps ("<0.5 seconds>")
_STAMPS = ["<", ">", "0", "1", "5", "Ġseconds"]
_FILLERS = [f"Ġw{i}" for i in range(5 + len(_WORDS), 100 - len(_CLOSED) - len(_STAMPS))] + _STAMPS
_TEXT = ["Ċ", "?"] + [f"Ġ{w}" for w in _WORDS] + _FILLERS + _CLOSED
#: ids >= 100 are special tokens (image, vision start / end, the turn end, video, Pixtral's row break and end,
#: Idefics3's token around images, global-image tag and tile tags, the turn start)
SPECIALS = {0: "<pad>", 1: "<s>", 2: "</s>", IMAGE: "<image>", VSTART: "<|vision_start|>", VEND: "<|vision_end|>",
            103: "<|im_end|>", 104: "<|video_pad|>", 105: "[IMG_BREAK]", 106: "[IMG_END]", VOCAB - 1: "<unk>",
            107: "<fake_token_around_image>", 108: "<global-img>", 113: "<|im_start|>",
            **{109 + 2 * r + c: f"<row_{r + 1}_col_{c + 1}>" for r in range(2) for c in range(2)}}
IM_END, VIDEO, IM_START = 103, 104, 113
QUESTION = " Is there a red cat in the picture?"


@lru_cache(maxsize=1)
def tokenizer():
    """A real fast tokenizer over the tiny models' 128 ids (a `tokenizers` WordLevel model on byte-level
    words): ids 3..99 text, ids >= 100 (and 0..2) special; `<|im_end|>` ends the user's turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: 3 + k for k, piece in enumerate(_TEXT)}
    specials = {i: SPECIALS.get(i, f"<|special_{i}|>") for i in (0, 1, 2, *range(IMAGE, VOCAB))}
    vocab.update({name: i for i, name in specials.items()})
    assert sorted(vocab.values()) == list(range(VOCAB))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    named = {"<pad>", "<s>", "</s>", "<unk>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=[n for i, n in sorted(specials.items()) if n not in named])


def encode(text: str) -> list[int]:
    """The tiny tokenizer's ids of `text` (no special tokens added)."""
    return tokenizer()(text, add_special_tokens=False).input_ids


def user_turn(before: list[int] = ()) -> list[int]:
    """The ids up to the user's content in a chat prompt: BOS, `before` (a system prompt's stand-in), the
    user header "<|im_start|>user\n"."""
    return [1, *before, IM_START, *encode("user\n")]


def chat_after(question: str = QUESTION) -> list[int]:
    """The ids after an image in a chat prompt: the question, the turn end, the assistant header."""
    return encode(question) + [IM_END] + encode("\nassistant\n")


def prompts_two() -> list:
    """Two prompts of different lengths (so the batch is left-padded)."""
    return [([1, 5, 6], (30, 30), [7, 8, 9, 10, 11]), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18, 19, 20])]
