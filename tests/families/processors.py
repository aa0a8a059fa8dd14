"""Tiny processors for the tiny random models, saved beside them as a local checkpoint folder.

Each family gets its real transformers processor class over
- the tiny tokenizer of tests/tiny.py with its special tokens renamed to the family's own, at the ids
  the tiny model's config expects (e.g. Qwen's "<|image_pad|>" at 100, Gemma 3's "<start_of_image>"
  at 101), and its turn markers on free special ids;
- a chat template in the family's turn format (user and assistant turns) that writes the family's
  image placeholder (the tiny vocabulary has no bare space and few words: pieces it lacks become <unk>, and LLaVA's
  "? ASSISTANT:" is written "?ASSISTANT:");
- the family's real image processor (PIL backend), sized to the tiny vision tower, so the processor
  writes as many image tokens as the tower gives features.

Transformers builds eight of these processors only with torchvision installed (the test environment
has none): every processor with a video sub-processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA-OneVision, InternVL, SmolVLM; transformers' video processors are torchvision-only, and the
processor checks each sub-processor's class on construction and loads it in `from_pretrained`), and
PixtralProcessor (Mistral 3), marked as needing torchvision. For those, `save` writes the files such
a checkpoint holds (tokenizer, processor_config.json with the image and video processors and the
processor's settings, chat template) without building the processor object: `AutoProcessor` on that folder is
what fails, as it would on the real checkpoint.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiny
import transformers as tf
from families.gemma3 import IMAGE_SIZE as GEMMA3_SIZE, SIDE as GEMMA3_SIDE
from families.idefics3 import PER_TILE as IDEFICS3_PER_TILE, TILE as IDEFICS3_TILE
from families.internvl import PER_TILE as INTERNVL_PER_TILE, TILE as INTERNVL_TILE
from families.llava_onevision import ASPECT, PINPOINTS, VIEW
from families.llava_onevision import PATCH as OV_PATCH
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

#: special ids of the tiny tokenizer ("<|im_start|>", then "<|special_i|>") a family renames to its turn markers
_FREE = (113, 114, 115)


@dataclass(frozen=True)
class Spec:
    """One family's processor: its class, the tiny tokenizer's renamed special tokens {id: name}, the
    tokenizer's named token attributes, the image processor, the processor's settings and its chat
    template (a turn `user` with {CONTENT} for the content items; an image item writes `image`; an assistant
    turn is `generation`, its content, `reply_end`)."""

    processor: str
    names: dict[int, str]
    image_processor: tuple[str, dict]
    user: str
    image: str
    generation: str
    reply_end: str
    settings: dict = field(default_factory=dict)
    named: dict = field(default_factory=dict)
    #: the video processor's class and settings, where the processor has one (torchvision-only here)
    video_processor: tuple[str, dict] | None = None
    #: transformers builds this processor only with torchvision (see the module docstring)
    needs_torchvision: bool = False

    def chat_template(self) -> str:
        content = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}" + self.image + "{% else %}{{ c['text'] }}{% endif %}"
                   "{% endfor %}{% endif %}")
        return ("{% for m in messages %}{% if m['role'] == 'assistant' %}" + self.generation + content
                + self.reply_end + "{% else %}" + self.user.replace("{CONTENT}", content) + "{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}" + self.generation + "{% endif %}")


_LLAVA_TEXT = dict(names={tiny.IMAGE: "<image>", _FREE[0]: "ASSISTANT:", _FREE[1]: "USER:"}, user="USER: {CONTENT}",
                   image="<image>\n", generation="ASSISTANT:", reply_end="</s>")
_LLAVA_SETTINGS = dict(patch_size=6, vision_feature_select_strategy="default", num_additional_image_tokens=1)
_CROP = dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
_QWEN_NAMES = {tiny.IMAGE: "<|image_pad|>", tiny.VSTART: "<|vision_start|>", tiny.VEND: "<|vision_end|>",
               tiny.IM_END: "<|im_end|>", tiny.VIDEO: "<|video_pad|>", _FREE[0]: "<|im_start|>"}
_QWEN_TEXT = dict(user="<|im_start|>user\n{CONTENT}<|im_end|>\n", generation="<|im_start|>assistant\n",
                  reply_end="<|im_end|>\n")
_QWEN_IMAGES = ("Qwen2VLImageProcessorPil", dict(patch_size=14, merge_size=2, temporal_patch_size=2))
_QWEN = dict(names=_QWEN_NAMES, image_processor=_QWEN_IMAGES, image="<|vision_start|><|image_pad|><|vision_end|>",
             needs_torchvision=True, **_QWEN_TEXT)
_QWEN3 = dict(_QWEN, video_processor=("Qwen3VLVideoProcessor", _QWEN_IMAGES[1]))
_QWEN = dict(_QWEN, video_processor=("Qwen2VLVideoProcessor", _QWEN_IMAGES[1]))
_IDEFICS3 = dict(
    names={tiny.IMAGE: "<image>", _FREE[0]: "<end_of_utterance>", _FREE[1]: "<|im_start|>", _FREE[2]: "User:"},
    user="<|im_start|>User:{CONTENT}<end_of_utterance>\n", image="<image>", generation="Assistant:",
    reply_end="<end_of_utterance>\n",
    settings=dict(image_seq_len=IDEFICS3_PER_TILE))
_IDEFICS3_SIZES = dict(size={"longest_edge": 2 * IDEFICS3_TILE}, max_image_size={"longest_edge": IDEFICS3_TILE})

SPECS: dict[str, Spec] = {
    "llava": Spec("LlavaProcessor", image_processor=("CLIPImageProcessorPil", _CROP), settings=_LLAVA_SETTINGS,
                  **_LLAVA_TEXT),
    "llava_next": Spec("LlavaNextProcessor", settings=_LLAVA_SETTINGS, image_processor=(
        "LlavaNextImageProcessorPil", dict(_CROP, image_grid_pinpoints=[[30, 60], [60, 30], [60, 60]])),
        **_LLAVA_TEXT),
    "qwen2_vl": Spec("Qwen2VLProcessor", **_QWEN),
    "qwen2_5_vl": Spec("Qwen2_5_VLProcessor", **_QWEN),
    "qwen3_vl": Spec("Qwen3VLProcessor", **_QWEN3),
    "qwen3_vl_moe": Spec("Qwen3VLProcessor", **_QWEN3),
    "llava_onevision": Spec(
        "LlavaOnevisionProcessor", image="<image>\n", needs_torchvision=True,
        video_processor=("LlavaOnevisionVideoProcessor", dict(size={"height": VIEW, "width": VIEW})),
        names={tiny.IMAGE: "<image>", tiny.VIDEO: "<video>", tiny.IM_END: "<|im_end|>", _FREE[0]: "<|im_start|>"},
        image_processor=("LlavaOnevisionImageProcessorPil",
                         dict(size={"height": VIEW, "width": VIEW}, image_grid_pinpoints=PINPOINTS)),
        settings=dict(num_image_tokens=(VIEW // OV_PATCH) ** 2, vision_feature_select_strategy="full",
                      vision_aspect_ratio=ASPECT), **_QWEN_TEXT),
    "internvl": Spec(
        "InternVLProcessor", image="<IMG_CONTEXT>\n", needs_torchvision=True,
        video_processor=("InternVLVideoProcessor", dict(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE})),
        names={tiny.IMAGE: "<IMG_CONTEXT>", tiny.VSTART: "<img>", tiny.VEND: "</img>", tiny.IM_END: "<|im_end|>",
               tiny.VIDEO: "<video>", _FREE[0]: "<|im_start|>"},
        named=dict(context_image_token="<IMG_CONTEXT>", start_image_token="<img>", end_image_token="</img>",
                   video_token="<video>"),
        image_processor=("GotOcr2ImageProcessorPil", dict(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
                                                          crop_to_patches=True, max_patches=4)),
        settings=dict(image_seq_length=INTERNVL_PER_TILE), **_QWEN_TEXT),
    "idefics3": Spec("Idefics3Processor", image_processor=("Idefics3ImageProcessorPil", _IDEFICS3_SIZES), **_IDEFICS3),
    "smolvlm": Spec("SmolVLMProcessor", image_processor=("SmolVLMImageProcessorPil", _IDEFICS3_SIZES),
                    needs_torchvision=True, video_processor=("SmolVLMVideoProcessor", _IDEFICS3_SIZES), **_IDEFICS3),
    "gemma3": Spec(
        "Gemma3Processor", image="<start_of_image>", generation="<start_of_turn>model\n", reply_end="<end_of_turn>\n",
        user="<start_of_turn>user\n{CONTENT}<end_of_turn>\n",
        names={tiny.IMAGE: "<image_soft_token>", 101: "<start_of_image>", 102: "<end_of_image>",
               _FREE[0]: "<start_of_turn>", _FREE[1]: "<end_of_turn>"},
        named=dict(image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>"),
        image_processor=("Gemma3ImageProcessorPil", dict(size={"height": GEMMA3_SIZE, "width": GEMMA3_SIZE})),
        settings=dict(image_seq_length=GEMMA3_SIDE ** 2)),
    "mistral3": Spec(
        "PixtralProcessor", image="[IMG]", user="[INST]{CONTENT}[/INST]", generation="", reply_end="</s>",
        needs_torchvision=True,
        names={tiny.IMAGE: "[IMG]", 105: "[IMG_BREAK]", 106: "[IMG_END]", _FREE[0]: "[INST]", _FREE[1]: "[/INST]"},
        image_processor=("PixtralImageProcessorPil", dict(size={"longest_edge": 112},
                                                          patch_size={"height": 14, "width": 14})),
        settings=dict(patch_size=14, spatial_merge_size=2)),
}
FAMILIES = tuple(SPECS)


def tokenizer(names: dict[int, str], **named: str) -> PreTrainedTokenizerFast:
    """tiny.tokenizer() with the special tokens at the ids of `names` renamed; `named` sets the
    tokenizer's model-specific token attributes (e.g. image_token="<IMG_CONTEXT>") some processors read."""
    base = tiny.tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i, new in names.items():
        del vocab[base.convert_ids_to_tokens(i)]
        vocab[new] = i
    for token in spec["added_tokens"]:
        token["content"] = names.get(token["id"], token["content"])
    core = {"<pad>", "<s>", "</s>", "<unk>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=[t["content"] for t in spec["added_tokens"] if t["content"] not in core],
        model_specific_special_tokens=named or None)


def make_model(family: str) -> Any:
    """The family's tiny random model (tests/tiny.py or tests/families/<family>.py)."""
    if family in tiny.FAMILIES:
        return tiny.make_model(family)
    return importlib.import_module(f"families.{family}").make_model()


def make_processor(family: str) -> Any:
    """The family's tiny processor (raises where transformers needs torchvision for it)."""
    spec = SPECS[family]
    cls, kwargs = spec.image_processor
    return getattr(tf, spec.processor)(image_processor=getattr(tf, cls)(**kwargs),
                                       tokenizer=tokenizer(spec.names, **spec.named),
                                       chat_template=spec.chat_template(), **spec.settings)


def save(family: str, folder: Path) -> Path:
    """Write the family's tiny model and processor into `folder` (save_pretrained); where transformers
    cannot build the processor here, the files its save_pretrained would write."""
    spec = SPECS[family]
    make_model(family).save_pretrained(folder)
    if not spec.needs_torchvision:
        make_processor(family).save_pretrained(folder)
        return folder
    tokenizer(spec.names, **spec.named).save_pretrained(folder)
    cls, kwargs = spec.image_processor
    config = {"image_processor": getattr(tf, cls)(**kwargs).to_dict(), **spec.settings,
              "processor_class": spec.processor}
    if spec.video_processor:
        name, settings = spec.video_processor
        config["video_processor"] = {"video_processor_type": name, **settings}
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2))
    (folder / "chat_template.jinja").write_text(spec.chat_template())
    return folder
