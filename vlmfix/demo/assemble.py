"""LLaVA assemblies on a causal LM: a `LlavaForConditionalGeneration` + `LlavaProcessor` made of a
decoder (SmolLM2 in vlmfix), a small CLIP vision tower and a projector.

Used by the tests and benchmarks (random vision tower) and as the skeleton of the demo VLM. The
decoder keeps its pretrained weights, so its massive activations and sinks are real.
"""

from __future__ import annotations

import copy

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

IMAGE_TOKEN = "<image>"

#: chat template: the LM's ChatML turns, with "<image>" placed before the user's text
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt_for(question: str) -> str:
    """The chat prompt for one image and one question, as the assembled processor expects it."""
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def build_llava(
    lm: torch.nn.Module,
    tokenizer,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
    pad_to_square: bool = False,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA-1.5-style model on `lm` with a fresh (random, seeded) CLIP tower and projector.

    (image_size / patch_size)^2 image tokens per image: 576 with the defaults, as LLaVA-1.5.
    The tokenizer gets an "<image>" token; the embedding grows to hold it. pad_to_square: the
    processor pads images to a square of the mean colour before resizing (LLaVA-1.5's "pad" mode,
    the demo VLM); otherwise it resizes the short side and centre-crops (the llava-hf default).
    """
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = copy.deepcopy(lm.config)
    old_vocab = text_config.vocab_size
    text_config.vocab_size = max(old_vocab, -(-len(tokenizer) // 64) * 64)
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32), image_size=image_size, patch_size=patch_size,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_id,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(next(lm.parameters()).dtype)
    with torch.no_grad():
        state = lm.model.state_dict()
        emb = state["embed_tokens.weight"]
        new_emb = torch.zeros(text_config.vocab_size, emb.shape[1], dtype=emb.dtype)
        new_emb[:old_vocab] = emb
        state["embed_tokens.weight"] = new_emb
        model.model.language_model.load_state_dict(state)
        head = torch.zeros_like(new_emb)
        head[:old_vocab] = lm.lm_head.weight
        model.lm_head.weight.copy_(head)
    model.config.text_config._name_or_path = getattr(lm.config, "_name_or_path", "")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # the added rows (image token, padding to a multiple of 64) are never to be generated
    model.generation_config.suppress_tokens = list(range(old_vocab, text_config.vocab_size))
    processor_class = LlavaImageProcessorPil if pad_to_square else CLIPImageProcessorPil
    extra = {"do_pad": True} if pad_to_square else {}
    image_processor = processor_class(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **extra
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model.eval(), processor
