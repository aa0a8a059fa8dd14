"""VAR cost against the plain model: decode per-token latency, prefill time and peak memory ratios.

On the SmolLM2-135M LLaVA test-bed with 576 image tokens and 64 new tokens (bench/common.py).
Targets: decode <= 1.10, prefill <= 1.25, peak memory <= 1.10.

    python bench/var.py [--new-tokens 64] [--repeats 3]
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
    model, processor, inputs = smol_llava_inputs()
    res = compare_generate(model, processor, inputs, [vlmfix.VAR()], args.new_tokens, args.repeats)
    report(f"VAR (paper defaults), 576 image tokens, {args.new_tokens} new tokens", res,
           {"decode_ratio": 1.10, "prefill_ratio": 1.25, "peak_ratio": 1.10})


if __name__ == "__main__":
    main()
