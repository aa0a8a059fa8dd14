"""Gemma 3 specifics on the tiny model (tests/families/gemma3.py) with a sliding window of 8 tokens, far
shorter than the prompts: methods see every key of the sliding layers (vlmfix keeps them in the
dynamic cache while a method acts), in-place pruning follows the window and the bidirectional image
blocks, a static cache whose sliding layers would roll is refused, and the processor is checked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from families import gemma3
from reference_gift import Booster, boosted, saliency
from reference_var import reference_var
from test_gift import spans_and_flags
from test_var import RecordingVAR, compare_rows
from tiny import PAD, QUESTION, chat_after, tokenizer
from transformers import DynamicCache

import vlmfix
from vlmfix.adapters import VlmfixInputError, get_adapter
from vlmfix.methods.prune import prune_record

GEN = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)
VAR_ACTS = dict(tau=1.2, m_min=0.05, rho=0.3)
WINDOW = 8


@pytest.fixture(scope="module")
def setup():
    model = gemma3.make_model(window=WINDOW)
    batch = gemma3.make_batch(model, [([1, 5, 6], (56, 84), chat_after(QUESTION)),
                                      ([1, 12], (84, 56), chat_after(" What is the colour of the dog?"))])
    assert batch["input_ids"].shape[1] + GEN["max_new_tokens"] > 3 * WINDOW
    return model, batch


def generate(model, batch, **kw):
    out = model.generate(**batch, **GEN, **kw)
    return out.sequences, torch.stack(out.logits)


def test_full_cache_is_the_sliding_cache(setup):
    """What vlmfix does to the cache changes nothing: the model's mask applies the window by position, so a
    cache that keeps every key gives its outputs; with no method attached, the cache is left alone."""
    model, batch = setup
    plain = generate(model, batch)
    full = generate(model, batch, cache=DynamicCache())
    assert torch.equal(plain[0], full[0]) and torch.allclose(plain[1], full[1], atol=1e-5, rtol=0)
    with vlmfix.attach(model, tokenizer()) as fixed:
        got = generate(fixed, batch)
    assert torch.equal(plain[0], got[0]) and torch.equal(plain[1], got[1])


def test_var_and_gift_equal_the_references_past_the_window(setup):
    model, batch = setup
    with reference_var(model, dims=[0, 1], **VAR_ACTS) as ref:  # the references index keys by position
        expected = generate(model, batch, cache=DynamicCache())
    var = RecordingVAR(**VAR_ACTS)
    with vlmfix.attach(model, tokenizer(), var, sink_dims=[0, 1]) as fixed:
        got = generate(fixed, batch)
    assert torch.equal(got[0], expected[0]) and torch.allclose(got[1], expected[1], atol=1e-5, rtol=0)
    assert compare_rows(var.seen, ref) > 20

    gift = vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))
    with vlmfix.attach(model, tokenizer(), gift) as fixed:
        ours = generate(fixed, batch)
        state, resolved = fixed.last_state, fixed.runtimes[0]
    spans, flags = spans_and_flags(state)
    maps = saliency(model, batch, spans, flags, resolved.saliency_layers, resolved.alpha)
    for row, m in enumerate(maps):
        assert torch.allclose(vlmfix.GIFT.saliency(state, row), m[0], atol=1e-5, rtol=0)
    with boosted(model, Booster(model, batch, spans, maps, resolved.boost_layers, resolved.beta)):
        ref = generate(model, batch, cache=DynamicCache())
    # the last prompt token's window holds no image token: GIFT's image ratio is then 1, as the spec says
    assert torch.equal(ours[0], ref[0]) and torch.allclose(ours[1], ref[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [lambda form: vlmfix.FastVPrune(layer=2, keep=3, form=form),
                                  lambda form: vlmfix.StagedPrune(layers=(1, 3), keep_ratios=(0.5, 0.25), form=form)],
                         ids=["fastv", "staged"])
def test_inplace_pruning_follows_the_window(setup, make):
    """Layer 1 is the first full-attention layer, whose cache sizes the full layers' decoding mask: pruned in
    place, it still gives the mask form's tokens and logits (both rotary tables gathered, the window kept)."""
    model, batch = setup
    outs = []
    for form in ("inplace", "mask"):
        with vlmfix.attach(model, tokenizer(), make(form)) as fixed:
            outs.append((*generate(fixed, batch), fixed.last_state))
    (a, la, sa), (b, lb, sb) = outs
    assert [s.kept[0].tolist() for s in prune_record(sa).stages] == \
        [s.kept[0].tolist() for s in prune_record(sb).stages]
    assert torch.equal(a, b) and torch.allclose(la, lb, atol=1e-5, rtol=0)


def test_static_cache_within_the_window_only(setup):
    model, batch = setup
    with vlmfix.attach(model, tokenizer(), vlmfix.VAR(**VAR_ACTS), sink_dims=[0, 1]) as fixed:
        with pytest.raises(VlmfixInputError, match="sliding-window layers keep 8 keys in this static cache"):
            generate(fixed, batch, cache_implementation="static")
    wide = gemma3.make_model(window=64)
    with vlmfix.attach(wide, tokenizer(), vlmfix.VAR(**VAR_ACTS), sink_dims=[0, 1]) as fixed:
        dynamic = generate(fixed, batch)
        static = generate(fixed, batch, cache_implementation="static")
    assert torch.equal(dynamic[0], static[0]) and torch.allclose(dynamic[1], static[1], atol=1e-5, rtol=0)


class Gemma3Processor(SimpleNamespace):
    """Stands in for transformers' Gemma3Processor (the adapter checks the class name and the ids)."""


def test_processor_ids_are_checked(setup):
    """Gemma3Processor's own `image_token_id` is the begin-of-image id; the tokenizer's ids are what is checked."""
    model, _ = setup
    ids = dict(boi_token_id=gemma3.BOI, image_token_id=gemma3.IMAGE, eoi_token_id=gemma3.EOI)
    processor = Gemma3Processor(tokenizer=SimpleNamespace(**ids), image_token_id=gemma3.BOI, image_processor=None)
    assert get_adapter(model, processor).boi_token_id == gemma3.BOI
    processor.tokenizer.image_token_id = 7
    with pytest.raises(VlmfixInputError, match="image token id is 7 but the model expects 100"):
        get_adapter(model, processor)
