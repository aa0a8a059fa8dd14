"""FastV pruning speed-up against the plain model: prefill time, decode per-token latency and
KV-cache size ratios, keeping 128 of 576 image tokens (in-place form), with and without Debias.

On the SmolLM2-135M LLaVA test-bed with 576 image tokens, a 4:3 picture padded to square
(bench/common.py). Debiasing's own cost is timed inside the calls (the end-to-end difference is
below this machine's noise).
Targets: prefill <= 0.50, decode <= 0.85.

    python bench/prune.py [--new-tokens 32] [--repeats 3] [--keep 128] [--batch 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import compare_generate, report, smol_llava_inputs

import vlmfix


def cache_bytes(model, inputs) -> int:
    """Bytes of keys and values in the cache after a 1-token generate."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    return sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))


def debias_share(model, processor, inputs, keep: int, calls: int = 5) -> float:
    """Seconds spent in the Debias work (padding geometry from the pixels, trend fit, transform),
    timed inside the calls, over the seconds of the debiased pruned prefill itself."""
    from vlmfix.methods import debias as debias_module, prune

    spent = [0.0]

    def timed_call(fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    patched = [(debias_module.Debias, "transform"), (prune.PrunerRuntime, "read_inputs")]
    originals = [getattr(owner, name) for owner, name in patched]
    for (owner, name), fn in zip(patched, originals):
        setattr(owner, name, timed_call(fn))
    try:
        with vlmfix.attach(model, processor, [vlmfix.FastVPrune(layer=2, keep=keep, debias=vlmfix.Debias())]) as fixed:
            with torch.inference_mode():
                fixed.generate(**inputs, max_new_tokens=1)  # warm-up
                spent[0] = 0.0
                start = time.perf_counter()
                for _ in range(calls):
                    fixed.generate(**inputs, max_new_tokens=1)
                total = time.perf_counter() - start
    finally:
        for (owner, name), fn in zip(patched, originals):
            setattr(owner, name, fn)
    return spent[0] / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    args = ap.parse_args()
    model, processor, inputs = smol_llava_inputs(pad_to_square=True)
    inputs = {k: v.repeat(args.batch, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    plain_kv = cache_bytes(model, inputs)
    for label, debias in (("no debias", None), ("debiased", vlmfix.Debias())):
        method = vlmfix.FastVPrune(layer=2, keep=args.keep, debias=debias)
        res = compare_generate(model, processor, inputs, [method], args.new_tokens, args.repeats, memory=False)
        with vlmfix.attach(model, processor, vlmfix.FastVPrune(layer=2, keep=args.keep, debias=debias)):
            res["kv_ratio"] = cache_bytes(model, inputs) / plain_kv
        report(f"FastV keep {args.keep} of 576 ({label}), batch {args.batch}, {args.new_tokens} new tokens", res,
               {"prefill_ratio": 0.50, "decode_ratio": 0.85, "kv_ratio": 1.0})
    share = debias_share(model, processor, inputs, args.keep)
    print(f"Debias work inside the debiased prefill: {100 * share:.2f} % of its time (target < 2 %)")


if __name__ == "__main__":
    main()
