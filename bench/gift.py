"""GIFT cost against the plain model: end-to-end generate time ratio and peak-memory ratio.

On the SmolLM2-135M LLaVA test-bed with 576 image tokens and 64 new tokens (bench/common.py),
GIFT with its depth-rule layers for 30 layers (saliency 10, boost 11..21) in one prefill.
Targets: generate <= 1.10 (the reference implementation is reported at 1.13x), peak memory <= 1.10.

    python bench/gift.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse

from common import compare_generate, report, smol_llava_inputs

import vlmfix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, processor, inputs = smol_llava_inputs("Is there a red ball next to the yellow box in the image?")
    res = compare_generate(model, processor, inputs, [vlmfix.GIFT()], args.new_tokens, args.repeats)
    report(f"GIFT (depth-rule layers), 576 image tokens, {args.new_tokens} new tokens", res,
           {"generate_ratio": 1.10, "peak_ratio": 1.10, "decode_ratio": 1.10})


if __name__ == "__main__":
    main()
