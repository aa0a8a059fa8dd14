"""Shared benchmark helpers: the SmolLM2-based LLaVA test-bed, interleaved timing, peak memory.

Every benchmark compares the plain model with the same model attached, in the same process,
and prints ratios; absolute times on a shared 2-core machine mean little.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import threading
import time
from typing import Callable, Sequence

import torch
from PIL import Image

import vlmfix
from vlmfix.demo import build_llava, load_smollm2
from vlmfix.demo.assemble import prompt_for


def smol_llava_inputs(question: str = "Describe the image in detail.", image_size: int = 336,
                      pad_to_square: bool = False):
    """(model, processor, inputs): SmolLM2-135M + a random CLIP tower, (image_size / 14)^2 image tokens
    (pad_to_square: LLaVA-1.5's padding of the 4:3 picture, so a quarter of the patches are padding)."""
    lm, tok = load_smollm2()
    model, processor = build_llava(lm, tok, image_size=image_size, pad_to_square=pad_to_square)
    img = Image.new("RGB", (400, 300), (90, 150, 210))
    inputs = processor(images=img, text=prompt_for(question), return_tensors="pt")
    return model, processor, inputs


def timed(fn: Callable[[], object], methods: Sequence | None = None, model=None, processor=None,
          attach_kwargs: dict | None = None) -> float:
    """Seconds `fn` takes; with `methods`, `model` is attached to them around the call (not timed)."""
    handle = vlmfix.attach(model, processor, methods, **(attach_kwargs or {})) if methods is not None else None
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start
    finally:
        if handle is not None:
            handle.detach()


def interleaved(variants: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Median seconds per variant (each a tuple of `timed`'s arguments), running the variants in
    turn `repeats` times, so that machine noise hits all alike."""
    print(f"  warm-up: {', '.join(variants)}", file=sys.stderr, flush=True)
    for args in variants.values():  # warm-up
        timed(*args)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(repeats):
        print(f"  repeat {rep + 1}/{repeats}", file=sys.stderr, flush=True)
        for name, args in variants.items():
            samples[name].append(timed(*args))
    return {k: statistics.median(v) for k, v in samples.items()}


def busy_tau(model, inputs, attach_kwargs: dict) -> float:
    """The 90th percentile of the image tokens' sink score phi at the middle layer."""
    with vlmfix.attach(model, None, [vlmfix.VAR(tau=1e9)], **attach_kwargs) as fixed, torch.no_grad():
        fixed(**inputs)
        state = fixed.last_state
        layer = sorted(state.phi)[len(state.phi) // 2]
        phi = state.phi[layer][0][state.image_mask()[0].to(state.phi[layer].device)].float()
    return float(phi.quantile(0.9))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use() -> int:
    """Bytes the C heap has handed out now (glibc mallinfo2: arena blocks in use + mmapped blocks)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


_LIBC = ctypes.CDLL(None)
_LIBC.mallinfo2.restype = _MallInfo2


def peak_bytes(fn: Callable[[], object], interval: float = 0.0005) -> int:
    """Peak extra memory while `fn` runs: on CUDA torch.cuda.max_memory_allocated above the start; on
    the CPU the glibc heap in use (torch's CPU tensors live there), sampled every `interval` seconds
    by a thread, above its level at the start."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    gc.collect()
    start = _heap_in_use()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _heap_in_use())
            time.sleep(interval)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        with torch.inference_mode():
            fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _heap_in_use()) - start


def compare_generate(model, processor, inputs, methods, new_tokens: int, repeats: int, memory: bool = True,
                     attach_kwargs: dict | None = None) -> dict:
    """Prefill time, decode time per token and peak memory of `generate`, plain vs attached.

    One model: the attached runs attach it before and detach it after each call (untimed), so both
    sides read the same weights in the same memory. Decode per token = (t(1 + N new tokens) -
    t(1 new token)) / N, medians over interleaved repeats.
    """

    def gen(tokens):
        return lambda: model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    n = new_tokens
    fixed = (methods, model, processor, attach_kwargs)
    t = interleaved({"plain_1": (gen(1),), "plain_n": (gen(1 + n),), "fixed_1": (gen(1), *fixed),
                     "fixed_n": (gen(1 + n), *fixed)}, repeats)
    out = {
        "prefill_plain_s": t["plain_1"], "prefill_fixed_s": t["fixed_1"],
        "decode_plain_ms": 1000 * (t["plain_n"] - t["plain_1"]) / n,
        "decode_fixed_ms": 1000 * (t["fixed_n"] - t["fixed_1"]) / n,
        "generate_plain_s": t["plain_n"], "generate_fixed_s": t["fixed_n"],
    }
    out["prefill_ratio"] = out["prefill_fixed_s"] / out["prefill_plain_s"]
    out["decode_ratio"] = out["decode_fixed_ms"] / out["decode_plain_ms"]
    out["generate_ratio"] = out["generate_fixed_s"] / out["generate_plain_s"]
    if memory:  # the prefill and a few steps: where the peak is
        out["peak_plain_mb"] = peak_bytes(gen(4)) / 2**20
        with vlmfix.attach(model, processor, methods, **(attach_kwargs or {})):
            out["peak_fixed_mb"] = peak_bytes(gen(4)) / 2**20
        out["peak_ratio"] = out["peak_fixed_mb"] / out["peak_plain_mb"]
    return out


def report(title: str, res: dict, targets: dict[str, float]) -> None:
    print(title)
    print(f"  prefill: plain {res['prefill_plain_s']:.3f}s  fixed {res['prefill_fixed_s']:.3f}s")
    print(f"  decode per token: plain {res['decode_plain_ms']:.2f} ms  fixed {res['decode_fixed_ms']:.2f} ms")
    if "peak_ratio" in res:
        print(f"  peak memory: plain {res['peak_plain_mb']:.1f} MB  fixed {res['peak_fixed_mb']:.1f} MB")
    for key, target in targets.items():
        verdict = "ok" if res[key] <= target else "ABOVE TARGET"
        print(f"  {key}: {res[key]:.3f} (target <= {target}) {verdict}")


def word_tokenizer(vocab_size: int, specials: dict[int, str] | None = None):
    """A real fast tokenizer for random-weight models: id i is the word "w<i>" (every one informative for
    GIFT, none a turn-end marker, so GIFT's question runs from the image to the end of the prompt), ids 0, 1,
    2 and those in `specials` are special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = {0: "<pad>", 1: "<s>", 2: "</s>", **(specials or {})}
    vocab = {named.get(i, f"w{i}"): i for i in range(vocab_size)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens=[n for i, n in sorted(named.items()) if i > 2])
