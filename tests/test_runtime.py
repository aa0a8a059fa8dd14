"""The method runtime layer: configs stay the user's, several instances of one method, compiled
static-cache generation, pruning under a static cache, and the host reads of a prefill / decoding step.

All on the tiny random models of tests/tiny.py (4 decoder layers unless a test builds its own).
The compile tests dominate the file's run time (13-33 s per compiled generate on 2 CPU cores, cold).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from tiny import FAMILIES, IMAGE, PAD, VEND, VSTART, _text, _vision, make_batch, make_model, prompts_two, tokenizer
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmfix

GEN = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
#: sink dims and VAR settings that make VAR act on every tiny family (as in tests/test_var.py):
#: visual sinks at layer 2 of both batch rows of llava (and of one row of llava_next / qwen2_vl)
SINK_DIMS = [0, 1]
VAR_ACTS = dict(tau=1.2, m_min=0.05, rho=0.3)


def gift() -> vlmfix.GIFT:
    return vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))


METHODS = {
    "none": lambda: [],
    "var": lambda: [vlmfix.VAR(**VAR_ACTS)],
    "gift": lambda: [gift()],
    "var+gift": lambda: [vlmfix.VAR(**VAR_ACTS), gift()],
}


def moved(state, index=None) -> float:
    return sum(sum(v["moved"]) for v in vlmfix.VAR.summary(state, index).values())


def compile_prompts(family: str) -> list:
    """`prompts_two()`, with larger images for qwen2_vl: its 1- and 2-token images give GIFT a flat
    saliency map (no boost), these 6-token ones do not."""
    prompts = prompts_two()
    if family == "qwen2_vl":
        prompts = [(prompts[0][0], (56, 84), prompts[0][2]), (prompts[1][0], (84, 56), prompts[1][2])]
    return prompts


def other_batch(family: str, model, prompts: list) -> dict:
    """A batch of exactly the shapes of `make_batch(family, model, prompts)` with other text token ids
    and other pixel values (same image sizes, lengths and padding)."""
    taken = {PAD, IMAGE, VSTART, VEND, 1, 2}
    text = [t for t in range(30, 100) if t not in taken]
    other = [(p[0][:1] + text[:len(p[0]) - 1], p[1], text[10:10 + len(p[2])]) for p in prompts]
    batch = make_batch(family, model, other)
    g = torch.Generator().manual_seed(1234)
    batch["pixel_values"] = torch.randn(batch["pixel_values"].shape, generator=g)
    reference = make_batch(family, model, prompts)
    assert {k: v.shape for k, v in batch.items()} == {k: v.shape for k, v in reference.items()}
    assert not torch.equal(batch["input_ids"], reference["input_ids"])
    assert not torch.equal(batch["pixel_values"], reference["pixel_values"])
    return batch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles (or not) from scratch."""
    torch._dynamo.reset()
    counters.clear()
    yield


# -- 1. configs ---------------------------------------------------------------------------------------------
def test_config_unchanged_by_attach_and_reusable():
    configs = [vlmfix.VAR(), vlmfix.GIFT(), vlmfix.FastVPrune()]
    before = [(dataclasses.asdict(c), repr(c)) for c in configs]
    fresh = [dataclasses.asdict(type(c)()) for c in configs]
    assert [b[0] for b in before] == fresh

    first = make_model("llava")
    batch = make_batch("llava", first, prompts_two())
    with vlmfix.attach(first, tokenizer(), configs, sink_dims=SINK_DIMS) as fixed:
        assert {id(r.config) for r in fixed.runtimes} == {id(c) for c in configs}, "runtimes keep the user's configs"
        on_first = fixed.generate(**batch, **GEN)
        first_runtimes = fixed.runtimes
    assert [(dataclasses.asdict(c), repr(c)) for c in configs] == before

    # the same instances on a model of another family
    second = make_model("qwen2_vl", seed=1)
    batch2 = make_batch("qwen2_vl", second, prompts_two())
    with vlmfix.attach(second, tokenizer(), configs, sink_dims=SINK_DIMS) as fixed:
        assert not {id(r) for r in fixed.runtimes} & {id(r) for r in first_runtimes}, "runtimes are per attach"
        reused = fixed.generate(**batch2, **GEN)
    assert [(dataclasses.asdict(c), repr(c)) for c in configs] == before
    # ... behave there exactly as brand-new configs
    with vlmfix.attach(second, tokenizer(), [vlmfix.VAR(), vlmfix.GIFT(), vlmfix.FastVPrune()], sink_dims=SINK_DIMS) as fixed:
        assert torch.equal(fixed.generate(**batch2, **GEN), reused)
    # ... and on both models at once
    with vlmfix.attach(first, tokenizer(), configs, sink_dims=SINK_DIMS) as a, \
            vlmfix.attach(second, tokenizer(), configs, sink_dims=SINK_DIMS) as b:
        assert torch.equal(b.generate(**batch2, **GEN), reused)
        assert torch.equal(a.generate(**batch, **GEN), on_first)
    assert [(dataclasses.asdict(c), repr(c)) for c in configs] == before


# -- 2. two instances of one method -------------------------------------------------------------------------
def test_two_var_instances_act_with_their_own_settings():
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())

    def run(methods):
        with torch.no_grad(), vlmfix.attach(model, tokenizer(), methods, sink_dims=SINK_DIMS) as fixed:
            logits = fixed(**batch).logits
        return logits, fixed.last_state

    alone, alone_state = run([vlmfix.VAR(p=0.6, **VAR_ACTS)])
    assert moved(alone_state) > 0, "the configuration must make VAR act"
    strong, weak = vlmfix.VAR(p=0.6, **VAR_ACTS), vlmfix.VAR(p=0.3, **VAR_ACTS)
    mixed, state = run([strong, weak])
    same, _ = run([vlmfix.VAR(p=0.6, **VAR_ACTS), vlmfix.VAR(p=0.6, **VAR_ACTS)])

    assert (mixed - same).abs().max() > 1e-4, "the second VAR must act with its own p"
    assert (mixed - alone).abs().max() > 1e-4, "the second VAR must act at all"
    assert (same - alone).abs().max() > 1e-4

    first, second = state.record(vlmfix.VAR, index=0), state.record(vlmfix.VAR, index=1)
    assert first is not second
    assert first.received.data_ptr() != second.received.data_ptr()
    assert state.record(strong) is first and state.record(weak) is second
    # the first VAR saw what a lone VAR(p=0.6) sees; the second moved its own share of what was left
    ref = alone_state.record(vlmfix.VAR)
    assert torch.allclose(first.received, ref.received, atol=1e-5) and torch.equal(first.pairs, ref.pairs)
    assert moved(state, 1) > 0 and abs(moved(state, 0) - moved(state, 1)) > 1e-3
    with pytest.raises(KeyError, match="index"):
        state.record(vlmfix.VAR)


# -- 3. compiled static-cache generation --------------------------------------------------------------------
def compile_config() -> transformers.CompileConfig:
    cc = transformers.CompileConfig(fullgraph=True)
    cc._compile_all_devices = True  # compile on the CPU too
    return cc


def generate(model, batch, **kw):
    out = model.generate(**batch, **GEN, return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits)


EAGER_STATIC = dict(cache_implementation="static", disable_compile=True)

# Every method on every family: 13-33 s per case on 2 cores with a cold inductor cache (one compile
# each), some 5 minutes for the 12; a warm cache takes a few seconds each.
COMPILE_CASES = [(f, m) for f in FAMILIES for m in METHODS]


@pytest.mark.parametrize("family,methods", COMPILE_CASES, ids=[f"{f}-{m}" for f, m in COMPILE_CASES])
def test_compiled_static_cache_generation_equals_attached_eager(family, methods):
    model = make_model(family)
    batch = make_batch(family, model, compile_prompts(family))
    batch2 = other_batch(family, model, compile_prompts(family))
    plain = generate(model, batch, **EAGER_STATIC)
    with vlmfix.attach(model, tokenizer(), METHODS[methods](), sink_dims=SINK_DIMS) as fixed:
        dynamic = generate(fixed, batch)
        state = fixed.last_state
        if "var" in methods:
            assert moved(state) > 0, "the configuration must make VAR act"
        if "gift" in methods:
            assert bool(state.record(vlmfix.GIFT).has_map.any()), "the configuration must make GIFT act"
        static = generate(fixed, batch, **EAGER_STATIC)
        static_state = fixed.last_state
        static2 = generate(fixed, batch2, **EAGER_STATIC)

        cc = compile_config()
        counters.clear()
        compiled = generate(fixed, batch, cache_implementation="static", compile_config=cc)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0 and hasattr(model, "_compiled_call"), "the decoding steps were not compiled"
        compiled_state = fixed.last_state
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled2 = generate(fixed, batch2, cache_implementation="static", compile_config=cc)
        assert counters["stats"]["unique_graphs"] == graphs, "the second compiled call recompiled"

    assert torch.equal(compiled[0], static[0]), "compiled tokens differ from eager static-cache tokens"
    assert torch.allclose(compiled[1], static[1], atol=1e-4, rtol=0), "compiled logits differ from eager ones"
    assert torch.equal(compiled2[0], static2[0]), "second batch: compiled tokens differ from eager ones"
    assert torch.allclose(compiled2[1], static2[1], atol=1e-4, rtol=0), "second batch: compiled logits differ"
    decode = slice(1, None)  # the decoding steps' logits (the first comes from the eager prefill)
    if methods == "none":
        assert torch.equal(static[0], plain[0]) and torch.allclose(static[1], plain[1], atol=1e-5, rtol=0)
    else:  # the methods change what the steps compute: their equality above is not the model's alone
        assert (static[1][decode] - plain[1][decode]).abs().max() > 1e-3
    if "var" in methods:  # VAR's record sums the compiled steps' redistribution as it sums the eager steps'
        ours, theirs = compiled_state.record(vlmfix.VAR), static_state.record(vlmfix.VAR)
        assert torch.equal(ours.pairs, theirs.pairs) and torch.allclose(ours.received, theirs.received, atol=1e-4)
    # the static cache changes nothing about what the methods do
    assert torch.equal(static[0], dynamic[0]), "eager tokens: static cache != default dynamic cache"
    err = (static[1] - dynamic[1]).abs().max()
    assert err <= 1e-4, f"eager logits: static cache != default dynamic cache (max abs difference {err:.3g})"


# -- 4. pruning under a static cache ------------------------------------------------------------------------
def test_pruning_under_static_cache():
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    with vlmfix.attach(model, None, vlmfix.FastVPrune(keep=8, form="mask")) as fixed:
        dynamic = generate(fixed, batch)
        kept = [fixed.last_state.record(vlmfix.FastVPrune).kept(row) for row in range(2)]
        assert [len(k) for k in kept] == [8, 8]
        counters.clear()
        compiled = generate(fixed, batch, cache_implementation="static", compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] > 0 and hasattr(model, "_compiled_call")
        assert [torch.equal(fixed.last_state.record(vlmfix.FastVPrune).kept(row), kept[row]) for row in range(2)] \
            == [True, True]
    assert torch.equal(compiled[0], dynamic[0]), "compiled static-cache tokens differ from eager dynamic-cache ones"
    assert torch.allclose(compiled[1], dynamic[1], atol=1e-4, rtol=0)

    with vlmfix.attach(model, None, vlmfix.FastVPrune(keep=8)) as fixed:
        with pytest.raises(vlmfix.VlmfixError, match="form='mask'"):
            fixed.generate(**batch, **GEN, cache_implementation="static", disable_compile=True)


# -- 5. host reads ------------------------------------------------------------------------------------------
try:
    from vlmfix.core.profiling import OpCounter
except ImportError:  # pragma: no cover - before vlmfix/core/profiling.py exists
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        """Counts the aten operators that read tensor values on the host."""

        READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.is_nonzero", "aten.equal",
                 "aten.masked_select"}

        def __init__(self):
            super().__init__()
            self.host_reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            packet = str(func.overloadpacket)
            if packet in self.READS or packet.startswith(("aten.unique", "aten._unique")) or (
                    packet == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                   for i in args[1] if i is not None)):
                self.host_reads += 1
            return func(*args, **(kwargs or {}))


def tiny_llava(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=_vision(), text_config=LlamaConfig(**_text(num_hidden_layers=layers)),
                      image_token_index=IMAGE, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


def host_reads(model, batch, methods) -> tuple[int, int, object, bool]:
    """Host reads of one prefill forward and of one decoding step (on the prefill's cache), the
    call's state and whether VAR edited pairs in that step."""
    fixed = model if methods is None else vlmfix.attach(model, tokenizer(), methods, sink_dims=SINK_DIMS)
    try:
        with torch.no_grad():
            with OpCounter() as prefill:
                out = fixed(**batch)
            state = getattr(fixed, "last_state", None)
            pairs = state.record(vlmfix.VAR).pairs.clone() if state is not None and state.has_record(vlmfix.VAR) \
                else None
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            extended = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], 1)
            with OpCounter() as step:
                fixed(input_ids=next_ids, attention_mask=extended, cache=out.cache)
            stepped = pairs is not None and bool(state.record(vlmfix.VAR).pairs.sum() > pairs.sum())
    finally:
        if methods is not None:
            fixed.detach()
    return prefill.host_reads, step.host_reads, state, stepped


def test_prefill_host_reads_do_not_grow_with_layers():
    """Each method's work grows with the layers it acts in (VAR in every layer, GIFT boosting every
    layer after its saliency layer); its host reads must not. The unattached model's own reads
    (transformers' sdpa mask checks `padding_mask.all()` on every forward) are the baseline."""
    counts = {}
    for n in (2, 8):
        model = tiny_llava(n)
        batch = make_batch("llava", model, prompts_two())
        var = dict(layers=tuple(range(n)), **VAR_ACTS)
        gift_ = dict(alpha=3.0, saliency_layers=(0,), boost_layers=tuple(range(1, n)))
        cases = {
            "model": None,
            "plain": [],
            "var": [vlmfix.VAR(**var)],
            "gift": [vlmfix.GIFT(**gift_)],
            "var+gift": [vlmfix.VAR(**var), vlmfix.GIFT(**gift_)],
        }
        for name, methods in cases.items():
            prefill, step, state, stepped = host_reads(model, batch, methods)
            counts[name, n] = prefill, step
            if n == 8 and "var" in name:  # (the 2-layer model has no sinks: they start at layer 2)
                assert moved(state) > 0 and stepped, "the configuration must make VAR act, decoding steps included"
            if "gift" in name:
                assert bool(state.record(vlmfix.GIFT).has_map.any()), "the configuration must make GIFT act"
    for name in ("model", "plain", "var", "gift", "var+gift"):
        assert counts[name, 2][0] == counts[name, 8][0], \
            f"{name}: prefill host reads grow with the layers: {counts[name, 2][0]} (2 layers) vs {counts[name, 8][0]} (8)"
    baseline = counts["model", 8][1]
    for name in ("plain", "var", "gift", "var+gift"):
        for n in (2, 8):
            assert counts[name, n][1] == baseline, \
                f"{name}, {n} layers: a decoding step reads {counts[name, n][1]} values on the host, the model {baseline}"
