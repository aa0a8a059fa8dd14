"""Host cost of vlmfix: LLaVA-1.5-7B's layout at a narrow width, so that the CPU times the Python and
dispatch work that an eager GPU waits on.

Eager decoding of a 7B on a GPU is host-bound: a step takes some 23-28 ms per token while reading
the weights takes about 3 ms, the rest being the host launching ~1000 kernels one by one. A model
with the 7B's layout (32 layers, 32 heads, 576 image tokens, BOS + 576 + 40 prompt tokens,
vocabulary 32064) but width 256 (head dim 8) makes its arithmetic small on the CPU, so its time is
mostly that host work: every extra operator or host read vlmfix adds per layer shows up here. (Not
all of it: on one thread of a 2-core machine a plain decode step took ~31 ms at width 256 against
~12 ms at width 64, where the 32 layers' weights fit in the cache; `--width 64` leaves less
arithmetic to dilute the ratios.)
Random weights, fp32, one thread; tau is set so that about 10 % of the image tokens are sinks
(see bench/var_7b.py), the sink dims are LLaVA-1.5-7B's folded into the width.

It prints, against the plain model in the same run (interleaved, medians over repeats):
- eager prefill (generate 1 token) and decode-per-token ratios (the interval between consecutive
  one-token forwards of generate, medians over tokens and repeats) for attach with no methods, VAR,
  GIFT, VAR + GIFT, FastV keep 128, StagedPrune, PAI's attention intervention alone (gamma 1), PAI
  (with its image-free contrast rows: twice the batch), and each other method of the `variants` table in
  main() (the decoding baselines; the pruners at keep 64 and 128);
- compiled decode (static cache, torch.compile fullgraph): the median time of a compiled decoding
  step (each call of transformers' compiled forward timed on its own) for VAR, GIFT, PAI's attention
  intervention, VAF and VCD (its contrast rows: twice the batch) against plain, or why the compilation failed;
- aten operator counts (vlmfix.core.profiling.OpCounter) of one decode step, total and per layer, and
  the host reads (device syncs) of the prefill and of a decode step.

    python bench/host.py [--width 256] [--new-tokens 16] [--repeats 5] [--no-compile]
    python bench/host.py --smoke                  (4 layers, 1 repeat, 4 new tokens: checks the script)
    python bench/host.py --device cuda [--batch B] (the real 7B width, bf16, CLIP ViT-L; ~60 GB with compile)

Targets: attach with no methods <= 1.02 (prefill and decode); VAR decode <= 1.05, prefill <= 1.10;
GIFT decode <= 1.03; FastV keep 128 prefill <= 0.40, decode <= 0.85; every pruner at keep 64 prefill <= 0.35,
decode <= 0.85 (the TARGETS table; bench/prune.py: every pruner at keep 64 and 128); compiled VAR and GIFT
decode <= 1.03 of compiled plain.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import Counter
from typing import Callable

import torch
from common import busy_tau, interleaved, timed, word_tokenizer
from torch._dynamo.utils import counters
from transformers import CompileConfig
from var_7b import IMAGE, inputs_for, llava_layout

import vlmfix
from vlmfix.core.presets import model_preset
from vlmfix.core.profiling import OpCounter, count_ops

TARGETS = {  # (variant, "prefill" | "decode" | "compiled decode") -> ratio to plain
    ("none", "prefill"): 1.02, ("none", "decode"): 1.02, ("VAR", "prefill"): 1.10, ("VAR", "decode"): 1.05,
    ("GIFT", "decode"): 1.03, ("FastV keep 128", "prefill"): 0.40, ("FastV keep 128", "decode"): 0.85,
    ("VAR", "compiled decode"): 1.03, ("GIFT", "compiled decode"): 1.03,
    **{(f"{name} keep 64", phase): target for name in ("SparseVLM", "VisionZip", "DivPrune", "DART", "random", "pool")
       for phase, target in (("prefill", 0.35), ("decode", 0.85))},
}


def say(*parts: object) -> None:
    print(*parts, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def generator(model, inputs: dict, tokens: int, **kwargs) -> Callable[[], object]:
    return lambda: model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)


def verdict(variant: str, phase: str, ratio: float) -> str:
    target = TARGETS.get((variant, phase))
    if target is None:
        return ""
    return f"(<= {target} {'ok' if ratio <= target else 'ABOVE TARGET'})"


def attach_kwargs(model, processor, methods: list, sink_dims: dict) -> dict:
    """`sink_dims` for the variants that track sinks (VAR; random weights have no sinks to discover), {}
    for the others, which then track none; checks that `methods` attach."""
    kwargs = sink_dims if any(isinstance(m, vlmfix.VAR) for m in methods) else {}
    vlmfix.attach(model, processor, methods, **kwargs).detach()
    return kwargs


def attachable(model, processor, variants: dict, sink_dims: dict) -> dict:
    """{name: (methods, attach kwargs)} of the variants that attach to `model`; the others are
    reported and left out."""
    kept = {}
    for name, methods in variants.items():
        try:
            kept[name] = (methods, {} if methods is None else attach_kwargs(model, processor, methods, sink_dims))
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            say(f"  {name}: cannot attach: {first_line(exc)}")
    return kept


def eager_times(model, processor, inputs: dict, variants: dict, n: int, repeats: int) -> None:
    """Interleaved prefill and decode times of every variant (`eager_measure`); prints ratios to plain."""
    prefill, decode, forward, count = eager_measure(model, processor, inputs, variants, n, repeats)
    say(f"  plain: prefill {1000 * prefill['plain']:.1f} ms, decode {1000 * decode['plain']:.2f} ms per token, of "
        f"which the forward {1000 * forward['plain']:.2f} ms (medians of {count})")
    say(f"  {'variant':<16}{'prefill':>9}{'decode':>9}{'forward':>9}   (decode: per token; forward: the step alone)")
    for name in variants:
        p, d, f = prefill[name] / prefill["plain"], decode[name] / decode["plain"], forward[name] / forward["plain"]
        say(f"  {name:<16}{p:>9.3f}{d:>9.3f}{f:>9.3f}  {verdict(name, 'prefill', p)} "
            f"{verdict(name, 'decode', d)}".rstrip())


def eager_measure(model, processor, inputs: dict, variants: dict, n: int,
                  repeats: int) -> tuple[dict, dict, dict, int]:
    """Interleaved prefill times (generate 1 token) and decode times per token of every variant: ({name: prefill
    s}, {name: decode s per token}, {name: the decode forward alone}, the plain decode samples). A token's time is
    the interval between the starts of two consecutive one-token forwards of `generate(n tokens)` (a model
    pre-hook): the step and generate's own work around it, with the prefill's noise kept out; medians over
    tokens and repeats."""
    starts: list[float] = []
    ends: list[float] = []

    def start(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            sync()
            starts.append(time.perf_counter())

    def stop(module, args, kwargs, output):
        if len(starts) > len(ends):
            sync()
            ends.append(time.perf_counter())

    hooks = [model.register_forward_pre_hook(start, with_kwargs=True, prepend=True),
             model.register_forward_hook(stop, with_kwargs=True, always_call=True)]
    prefill_runs, decode_steps, forwards = {}, {}, {}
    try:
        for name, (methods, kwargs) in variants.items():
            attach = () if methods is None else (methods, model, processor, kwargs)
            prefill_runs[name] = (generator(model, inputs, 1), *attach)
        prefill = interleaved(prefill_runs, repeats)
        for name, (methods, kwargs) in variants.items():  # warm-up
            timed(generator(model, inputs, n), *(() if methods is None else (methods, model, processor, kwargs)))
        decode_steps = {name: [] for name in variants}
        forwards = {name: [] for name in variants}
        for _ in range(repeats):
            for name, (methods, kwargs) in variants.items():
                starts.clear()
                ends.clear()
                timed(generator(model, inputs, n), *(() if methods is None else (methods, model, processor, kwargs)))
                decode_steps[name].extend(b - a for a, b in zip(starts, starts[1:]))
                forwards[name].extend(b - a for a, b in zip(starts, ends))
    finally:
        for h in hooks:
            h.remove()
    decode = {name: statistics.median(v) for name, v in decode_steps.items()}
    forward = {name: statistics.median(v) for name, v in forwards.items()}
    return prefill, decode, forward, len(decode_steps["plain"])


def compiled_times(model, processor, inputs: dict, variants: dict, n: int, repeats: int) -> None:
    """Decode step times under transformers' compiled generation (static cache, fullgraph), each variant on
    its own copy of the model, attached throughout, so that interleaving never invalidates a graph. Each
    compiled step (transformers' `_compiled_call`) is timed on its own; the prefill, eager, is not."""
    cc = CompileConfig(fullgraph=True)
    cc._compile_all_devices = True  # compile on the CPU too
    gens, steps, handles = {}, {}, []
    try:
        for name, (methods, kwargs) in variants.items():
            twin = copy.deepcopy(model)
            if methods is not None:
                handles.append(vlmfix.attach(twin, processor, methods, **kwargs))
            gen = generator(twin, inputs, n, cache_implementation="static", compile_config=cc)
            say(f"  compiling {name} ...")
            try:
                timed(gen)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
                say(f"  {name}: compile failed: {first_line(exc)}")
                continue
            steps[name] = time_steps(twin, steps.setdefault(name, []))
            gens[name] = gen
        if "plain" not in gens:
            return
        say("  timing compiled generation ...")
        graphs = counters["stats"]["unique_graphs"]
        for name in gens:
            steps[name].clear()
        interleaved({name: (gen,) for name, gen in gens.items()}, repeats)
        if counters["stats"]["unique_graphs"] != graphs:
            say("  warning: recompiled while timing, so the times below include compilation")
        decode = {name: statistics.median(times) for name, times in steps.items() if times}
        say(f"  compiled plain: decode {1000 * decode['plain']:.2f} ms per step (median of {len(steps['plain'])})")
        for name in decode:
            if name != "plain":
                ratio = decode[name] / decode["plain"]
                say(f"  compiled {name:<7} decode {ratio:.3f}  {verdict(name, 'compiled decode', ratio)}")
    finally:
        for handle in handles:
            handle.detach()
        torch._dynamo.reset()  # let go of the copies' graphs (and so of their weights)


def time_steps(model, into: list) -> list:
    """Time every call of `model`'s compiled forward (the decode steps of compiled generation) into `into`."""
    compiled = model._compiled_call

    def timed_step(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = compiled(*args, **kwargs)
        sync()
        into.append(time.perf_counter() - start)
        return out

    model._compiled_call = timed_step
    return into


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def op_counts(model, processor, inputs: dict, variants: dict, layers: int) -> None:
    """Operators of one decode step (a 1-token forward on the prefill's cache) and host reads of the prefill."""
    say(f"  {'variant':<16}{'total':>7}{'compute':>8}{'host rd':>8}  {'per layer: total':>16}{'compute':>8}"
        f"{'host rd':>8}  {'prefill host rd':>15}")
    plain: Counter | None = None
    for name, (methods, kwargs) in variants.items():
        handle = None if methods is None else vlmfix.attach(model, processor, methods, **kwargs)
        try:
            with torch.inference_mode():
                with OpCounter() as prefill:
                    out = model(**inputs, use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], dim=1)
                step = count_ops(model, input_ids=ids, attention_mask=mask, cache=out.cache)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            say(f"  {name:<16}failed: {first_line(exc)}")
            continue
        finally:
            if handle is not None:
                handle.detach()
        say(f"  {name:<16}{step.total:>7}{step.compute:>8}{step.host_reads:>8}  {step.total / layers:>16.1f}"
            f"{step.compute / layers:>8.1f}{step.host_reads / layers:>8.2f}  {prefill.host_reads:>15}")
        if plain is None:
            plain = step.counts
        else:
            extra = (step.counts - plain).most_common(6)
            if extra:
                say(f"  {'':<16}most added: " + ", ".join(f"{op.removeprefix('aten.')} +{k}" for op, k in extra))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (width 256, fp32) or cuda (the real 7B, bf16)")
    ap.add_argument("--width", type=int, default=None, help="decoder width (default 256 on the CPU, 4096 on cuda)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-generation timings")
    ap.add_argument("--smoke", action="store_true", help="4 layers, 1 repeat, 4 new tokens: checks the script")
    args = ap.parse_args()
    layers, repeats, n = (4, 1, 4) if args.smoke else (32, args.repeats, args.new_tokens)
    width = args.width or (4096 if args.device == "cuda" else 256)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.set_num_threads(1)
    say(f"building LLaVA-1.5-7B layout: {layers} layers, width {width}, {dtype}, {args.device}, batch {args.batch}")
    model = llava_layout(args.device, layers, width, dtype)
    inputs = inputs_for(args.device, args.batch, dtype)
    tokenizer = word_tokenizer(model.config.text_config.vocab_size, {IMAGE: "<image>"})  # GIFT reads the question
    preset = model_preset(model.config._name_or_path, width)
    dims = {} if preset else {"sink_dims": [d % width for d in model_preset("llava-1.5-7b", 4096)["sink_dims"]]}

    say("finding tau (10 % of the image tokens sinks) ...")
    tau = busy_tau(model, inputs, dims)
    say(f"  tau = {tau:.3f}, sink dims {dims.get('sink_dims') or preset['sink_dims']}")
    # the CPU proxy's 1-layer tower feeds the projector its embeddings (feature layer -2): VisionZip reads layer 0
    zip_layer = 0 if model.config.vision_config.num_hidden_layers == 1 else None
    variants = {
        "plain": None, "none": [], "VAR": [vlmfix.VAR(tau=tau)], "GIFT": [vlmfix.GIFT()],
        "VAR+GIFT": [vlmfix.VAR(tau=tau), vlmfix.GIFT()], "FastV keep 128": [vlmfix.FastVPrune(keep=128)],
        "StagedPrune": [vlmfix.StagedPrune() if layers == 32 else vlmfix.StagedPrune(layers=(1, 2, 3))],
        "DART keep 64": [vlmfix.DART(keep=64)], "random keep 64": [vlmfix.RandomPrune(keep=64)],
        "pool keep 64": [vlmfix.PoolPrune(keep=64)],
        "SparseVLM keep 64": [vlmfix.SparseVLM(keep=64, **({} if layers == 32 else {"layers": (1, 2, 3)}))],
        "SparseVLM keep 128": [vlmfix.SparseVLM(keep=128, **({} if layers == 32 else {"layers": (1, 2, 3)}))],
        "VisionZip keep 64": [vlmfix.methods.VisionZip(keep=64, vision_layer=zip_layer)],
        "VisionZip keep 128": [vlmfix.methods.VisionZip(keep=128, vision_layer=zip_layer)],
        "DivPrune keep 64": [vlmfix.methods.DivPrune(keep=64)],
        "DivPrune keep 128": [vlmfix.methods.DivPrune(keep=128)],
        # OPERA is a 5-beam search: compare it with "beam 5" (its neutral setting, transformers' beam search)
        "beam 5": [vlmfix.OPERA(alpha=0.0, threshold=None)], "OPERA": [vlmfix.OPERA()],
        "PAI attention": [vlmfix.PAI(gamma=1.0)], "PAI": [vlmfix.PAI()], "VCD": [vlmfix.VCD()], "ICD": [vlmfix.ICD()],
        "M3ID": [vlmfix.M3ID()], "VAF": [vlmfix.VAF()], "ONLY": [vlmfix.ONLY()],
    }
    say("checking that each variant attaches ...")
    variants = attachable(model, tokenizer, variants, dims)

    def some(*names: str) -> dict:
        return {k: variants[k] for k in names if k in variants}

    say(f"eager generate, {n} new tokens, medians of {repeats} interleaved repeats ...")
    eager_times(model, tokenizer, inputs, variants, n, repeats)
    if not args.no_compile:
        say(f"compiled generate (static cache, fullgraph), {n} new tokens ...")
        compiled_times(model, tokenizer, inputs, some("plain", "VAR", "GIFT", "PAI attention", "VAF", "VCD"), n,
                       repeats)
    say(f"aten operators of one decode step ({layers} layers) ...")
    op_counts(model, tokenizer, inputs, some("plain", "none", "VAR", "GIFT", "FastV keep 128", "PAI attention",
                                             "SparseVLM keep 64", "VisionZip keep 64", "DivPrune keep 64", "DART keep 64",
                                             "pool keep 64", "VAF", "VCD", "ICD"), layers)


if __name__ == "__main__":
    main()
