"""Overhead of attaching vlmfix with no methods: per-token decode latency ratio attached / plain.

On the SmolLM2-135M LLaVA test-bed with 576 image tokens. Decode time per token is
(time of generate with 1 + N new tokens - time with 1 new token) / N, each a median over
interleaved repeats. The attached model is a copy of the plain one (same weights), attached once,
so attach itself is not timed. Target: ratio <= 1.03.

    python bench/overhead.py [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy

from common import interleaved, smol_llava_inputs

import vlmfix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, processor, inputs = smol_llava_inputs()
    n = args.new_tokens

    twin = copy.deepcopy(model)
    vlmfix.attach(twin, processor)

    def gen(m, tokens):
        return lambda: m.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    t = interleaved({"plain_1": gen(model, 1), "plain_n": gen(model, 1 + n), "attached_1": gen(twin, 1),
                     "attached_n": gen(twin, 1 + n)}, args.repeats)
    plain = (t["plain_n"] - t["plain_1"]) / n
    att = (t["attached_n"] - t["attached_1"]) / n
    print(f"image tokens: {int((inputs['input_ids'] == model.config.image_token_id).sum())}, new tokens: {n}")
    print(f"prefill (1 token): plain {t['plain_1']:.3f}s  attached {t['attached_1']:.3f}s  "
          f"ratio {t['attached_1'] / t['plain_1']:.3f}")
    print(f"decode per token: plain {1000 * plain:.2f} ms  attached {1000 * att:.2f} ms")
    print(f"decode per-token latency ratio attached/plain: {att / plain:.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
