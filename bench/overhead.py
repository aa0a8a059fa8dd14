"""Overhead of attaching vlmfix with no methods: per-token decode latency ratio attached / plain.

On the SmolLM2-135M LLaVA test-bed with 576 image tokens (bench/common.py). Target: <= 1.03.

    python bench/overhead.py [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse

from common import compare_generate, report, smol_llava_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, processor, inputs = smol_llava_inputs()
    res = compare_generate(model, processor, inputs, [], args.new_tokens, args.repeats, memory=False)
    report(f"attach() with no methods, 576 image tokens, {args.new_tokens} new tokens", res,
           {"decode_ratio": 1.03, "prefill_ratio": 1.03})


if __name__ == "__main__":
    main()
