"""Token pruners against the plain model on LLaVA-1.5-7B's layout: per pruner at keep 64 and 128 of the 576 image
tokens, the prefill ratio, the decode-per-token ratio, the KV-cache bytes ratio, and the pruner's own selection
time (timed inside its calls) as a share of the plain prefill.

The model is bench/host.py's host proxy (bench/var_7b.py's `llava_layout`: 32 layers, 32 heads, BOS + 576 image
tokens + 40 text tokens, vocabulary 32064) at a narrow width on the CPU (256, fp32, one thread), so that the
times are mostly the host's work an eager GPU waits on; `--device cuda` runs the real 7B width in bf16. Random
weights: what is measured is cost, not accuracy. Prefill and decode come from bench/host.py's
`eager_measure` (interleaved, medians over repeats; a token's time is the interval between two one-token
forwards of generate). Each pruner runs in its in-place form (the speed form).

Targets at keep 64: every pruner's prefill <= 0.35 x plain, decode <= 0.85 x plain; a pruner that acts before
the decoder spends under 5 % of the plain prefill on its selection. PASS / FAIL per target.

At batch 1 a decoding step of this proxy is the weights' and the host's work (32 layers of per-token
operators); the KV cache a pruner shortens is a small part of it, so the decode ratio stays near 1 for
every pruner; `--batch B` decodes B copies together, where reading the cache weighs more.

A pruner is one line of `PRUNERS`: a pruner whose method is not registered (yet) is skipped with a note.

    python bench/prune.py [--width 256] [--new-tokens 16] [--repeats 3] [--keeps 64 128] [--only dart pool] [--batch B]
    python bench/prune.py --smoke           (4 layers, 1 repeat, 4 new tokens: checks the script)
"""

from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from common import word_tokenizer
from host import attachable, eager_measure, say
from var_7b import IMAGE, inputs_for, llava_layout

from vlmfix.methods import build, methods

IMAGE_TOKENS = 576
PREFILL_TARGET, DECODE_TARGET, SELECTION_TARGET = 0.35, 0.85, 0.05


@dataclass(frozen=True)
class Pruner:
    """One row of the table: its label, its registered method name, its settings at a budget of `keep` image
    tokens, whether it acts before the decoder ("pre") or inside it ("in"), and the functions whose time is its
    selection ("module:Class.attribute", timed inside every call)."""

    label: str
    method: str
    settings: Callable[[int], dict]
    where: str
    selection: tuple[str, ...]


HIDDEN = "vlmfix.methods.prune:ChoosesFromHidden._choose"  # the hidden-state pruners' choice (all rows)
SCORED = "vlmfix.methods.prune:PruneCall.observe"  # the attention pruners' scoring and selection of a stage
#: one line per pruner (staged at keep k: ratios 2k, k, k/2 of the 576 at layers 2, 10, 20)
PRUNERS = (
    Pruner("FastV", "fastv", lambda k: dict(keep=k), "in", (SCORED,)),
    Pruner("Staged", "staged", lambda k: dict(keep_ratios=tuple(f * k / IMAGE_TOKENS for f in (2, 1, 0.5))), "in",
           (SCORED,)),
    Pruner("DART", "dart", lambda k: dict(keep=k), "in", (HIDDEN,)),
    Pruner("random", "random", lambda k: dict(keep=k), "pre", (HIDDEN,)),
    Pruner("pool", "pool", lambda k: dict(keep=k), "pre", (HIDDEN,)),
    Pruner("SparseVLM", "sparsevlm", lambda k: dict(keep=k), "in",
           (SCORED, "vlmfix.methods.sparsevlm:SparseVLMCall._pick_raters", "vlmfix.methods.sparsevlm:SparseVLMCall._recycle")),
    Pruner("VisionZip", "visionzip", lambda k: dict(keep=k), "pre",
           ("vlmfix.methods.visionzip:VisionZipCall.read_vision", "vlmfix.methods.visionzip:VisionZipCall.edit_features")),
    Pruner("DivPrune", "divprune", lambda k: dict(keep=k), "pre", ("vlmfix.methods.divprune:DivPruneCall._choose",)),
)


def cache_bytes(model, inputs: dict) -> int:
    """Bytes of keys and values in the cache after a 1-token generate."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    return sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))


def _resolve(path: str) -> tuple[type, str]:
    module, _, rest = path.partition(":")
    cls, _, attr = rest.rpartition(".")
    return getattr(importlib.import_module(module), cls), attr


def selection_seconds(model, processor, methods_: list, inputs: dict, paths: tuple[str, ...], calls: int) -> float:
    """Mean seconds per prefill spent in the functions `paths` (wrapped for the measurement), over `calls`
    one-token generates after a warm-up."""
    spent = [0.0]
    depth = [0]

    def timed_call(fn):
        def wrapper(*a, **kw):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # a timed function calling another is counted once
                    spent[0] += time.perf_counter() - start
        return wrapper

    patched = [_resolve(p) for p in paths]
    originals = [owner.__dict__[name] for owner, name in patched]
    for (owner, name), fn in zip(patched, originals):
        setattr(owner, name, timed_call(fn))
    try:
        import vlmfix

        with vlmfix.attach(model, processor, methods_) as fixed, torch.inference_mode():
            fixed.generate(**inputs, max_new_tokens=1)  # warm-up
            spent[0] = 0.0
            for _ in range(calls):
                fixed.generate(**inputs, max_new_tokens=1)
    finally:
        for (owner, name), fn in zip(patched, originals):
            setattr(owner, name, fn)
    return spent[0] / calls


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (width 256, fp32) or cuda (the real 7B width, bf16)")
    ap.add_argument("--width", type=int, default=None, help="decoder width (default 256 on the CPU, 4096 on cuda)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keeps", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    ap.add_argument("--only", nargs="+", default=None, help="method names of the pruners to run (default: all)")
    ap.add_argument("--smoke", action="store_true", help="4 layers, 1 repeat, 4 new tokens: checks the script")
    args = ap.parse_args()
    layers, repeats, n = (4, 1, 4) if args.smoke else (32, args.repeats, args.new_tokens)
    width = args.width or (4096 if args.device == "cuda" else 256)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.set_num_threads(1)
    say(f"LLaVA-1.5-7B layout: {layers} layers, width {width}, {dtype}, {args.device}, batch {args.batch}; 576 image tokens; "
        f"{n} new tokens, medians of {repeats} interleaved repeats (a shared machine: noisy)")
    model = llava_layout(args.device, layers, width, dtype)
    inputs = inputs_for(args.device, args.batch, dtype)
    tokenizer = word_tokenizer(model.config.text_config.vocab_size, {IMAGE: "<image>"})

    registered = methods()
    table = []
    for p in PRUNERS:
        if args.only and p.method not in args.only:
            continue
        if p.method not in registered:
            say(f"  {p.label}: skipped (method {p.method!r} is not registered)")
            continue
        for keep in args.keeps:
            settings = p.settings(keep)
            if layers < 32 and p.method in ("staged", "sparsevlm"):
                settings["layers"] = (1, 2, 3)
            if p.method == "visionzip" and model.config.vision_config.num_hidden_layers == 1:
                settings["vision_layer"] = 0  # the proxy's 1-layer tower feeds the projector its embeddings
            table.append((p, keep, [build(p.method, **settings)]))
    variants = {"plain": None, **{f"{p.label} keep {keep}": m for p, keep, m in table}}
    variants = attachable(model, tokenizer, variants, {})
    prefill, decode, _, count = eager_measure(model, tokenizer, inputs, variants, n, repeats)
    plain_kv = cache_bytes(model, inputs)
    say(f"  plain: prefill {1000 * prefill['plain']:.1f} ms, decode {1000 * decode['plain']:.2f} ms per token "
        f"(medians of {count}), KV cache {plain_kv / 2 ** 20:.1f} MiB")
    say(f"  {'pruner':<18}{'where':>6}{'prefill':>9}{'decode':>9}{'KV':>8}{'select ms':>11}{'select %':>10}   targets at "
        f"keep 64: prefill <= {PREFILL_TARGET}, decode <= {DECODE_TARGET}, pre-decoder selection < "
        f"{100 * SELECTION_TARGET:.0f} %")
    failed = 0
    import vlmfix

    for p, keep, methods_ in table:
        name = f"{p.label} keep {keep}"
        if name not in variants:
            continue
        with vlmfix.attach(model, tokenizer, methods_):
            kv = cache_bytes(model, inputs) / plain_kv
        sel = selection_seconds(model, tokenizer, methods_, inputs, p.selection, max(repeats, 1))
        pr, de, share = prefill[name] / prefill["plain"], decode[name] / decode["plain"], sel / prefill["plain"]
        line = f"  {name:<18}{p.where:>6}{pr:>9.3f}{de:>9.3f}{kv:>8.3f}{1000 * sel:>11.2f}{100 * share:>9.2f}%"
        if keep == 64:
            checks = [f"prefill {verdict(pr <= PREFILL_TARGET)}", f"decode {verdict(de <= DECODE_TARGET)}"]
            failed += (pr > PREFILL_TARGET) + (de > DECODE_TARGET)
            if p.where == "pre":
                checks.append(f"selection {verdict(share < SELECTION_TARGET)}")
                failed += share >= SELECTION_TARGET
            line += "   " + ", ".join(checks)
        say(line)
    say(f"{'all targets met' if not failed else f'{failed} target(s) missed'} (ratios as measured on this machine)")


if __name__ == "__main__":
    main()
