"""VAR (and GIFT, FastV) cost at LLaVA-1.5-7B shapes, random weights, bf16, on a GPU.

The model is a `LlavaForConditionalGeneration` with LLaVA-1.5-7B's configuration: a CLIP ViT-L/14
at 336 pixels (576 image tokens) and a Llama-7B decoder (32 layers, width 4096). Its weights are
random, so there are no real sinks. To make VAR do its full work, tau is set to the 90th
percentile of the image tokens' sink scores in a middle layer, which makes about 10 % of them
visual sinks. The sink dims are LLaVA-1.5-7B's preset. The prompt is BOS + 576 image tokens + 40
text tokens; generation is 64 new tokens. Ratios are against the plain model in the same run.

    python bench/var_7b.py [--new-tokens 64] [--repeats 3] [--batch 1]   (needs CUDA and ~20 GB; --smoke: CPU check)

--batch B decodes B copies of the prompt together (the weights are read once per step for all rows).
"""

from __future__ import annotations

import argparse

import torch
from common import busy_tau, compare_generate, report, word_tokenizer
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmfix

IMAGE = 32000


def llava_layout(device: str, layers: int, width: int, dtype: torch.dtype,
                 heads: int = 32) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B's layout with `heads` heads at any `width` (the 7B's FFN at width 4096, else 2 x width);
    a CLIP ViT-L/14-336 at width 4096, else a 1-layer 32-wide CLIP with the same 576 patches."""
    text = LlamaConfig(vocab_size=32064, hidden_size=width, intermediate_size=11008 if width == 4096 else 2 * width,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    big = width == 4096
    vision = CLIPVisionConfig(hidden_size=1024 if big else 32, intermediate_size=4096 if big else 64,
                              num_hidden_layers=24 if big else 1, num_attention_heads=16 if big else 2,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    config._name_or_path = "llava-hf/llava-1.5-7b-hf"  # picks the model preset (sink dims) at width 4096
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.config._name_or_path = config._name_or_path
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model.eval()


def llava_7b(device: str, smoke: bool = False) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B's shapes in bf16 (smoke: the same layout, 4 narrow layers, to check the script on a CPU)."""
    return llava_layout(device, 4, 128, torch.bfloat16, heads=4) if smoke else \
        llava_layout(device, 32, 4096, torch.bfloat16)


def inputs_for(device: str, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    """BOS + 576 image tokens + 40 random text tokens, and a random image, `batch` copies."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 32000, (40,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((576,), IMAGE), text])[None].repeat(batch, 1)
    pixels = torch.randn(1, 3, 336, 336, generator=g).repeat(batch, 1, 1, 1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    ap.add_argument("--smoke", action="store_true", help="a narrow 4-layer model on the CPU: checks the script only")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    model = llava_7b(device, args.smoke)
    inputs = inputs_for(device, args.batch)
    extra = {"sink_dims": [5]} if args.smoke else {}  # the real shapes use LLaVA-1.5-7B's preset
    tokenizer = word_tokenizer(model.config.text_config.vocab_size, {IMAGE: "<image>"})  # GIFT reads the question
    tau = busy_tau(model, inputs, extra)
    where = "CPU smoke run" if args.smoke else torch.cuda.get_device_name()
    print(f"LLaVA-1.5-7B shapes, random weights, bf16, {where}, batch {args.batch}; VAR tau = {tau:.3f}")
    runs = (  # the targets of the VAR, GIFT and pruning issues
        ("VAR", [vlmfix.VAR(tau=tau)], {"decode_ratio": 1.10, "prefill_ratio": 1.25, "peak_ratio": 1.10}),
        ("GIFT", [vlmfix.GIFT()], {"generate_ratio": 1.10}),
        ("FastV keep 128", [vlmfix.FastVPrune(keep=128)], {"prefill_ratio": 0.50, "decode_ratio": 0.85}),
    )
    for title, methods, targets in runs:
        res = compare_generate(model, tokenizer, inputs, methods, args.new_tokens, args.repeats, attach_kwargs=extra)
        report(f"{title}, 576 image tokens, {args.new_tokens} new tokens", res, targets)


if __name__ == "__main__":
    main()
