"""GIFT against an explicit two-pass reference implementation of the spec (tests/reference_gift.py)."""

from __future__ import annotations

import pytest
import torch
from reference_gift import Booster, boosted, saliency
from tiny import FAMILIES, PAD, QUESTION, chat_after, make_batch, make_model, tokenizer, user_turn

import vlmfix
from vlmfix.core.attention import ROUTE
from vlmfix.methods.gift import default_layers
from vlmfix.core.words import informative_tokens, informative_words

GEN = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)


def prompts():
    """Two prompts, the images big enough to give Qwen2-VL a 2 x 3 token grid."""
    return [([1, 5, 6], (60, 90), [7, 8, 9, 10, 11]), ([1, 12], (90, 60), [13, 14, 15, 16, 17, 18, 19, 20])]


def generate(model, inputs, **kw):
    out = model.generate(**inputs, **GEN, **kw)
    return out.sequences, torch.stack(out.logits)


def spans_and_flags(state):
    """Per batch row the question's positions and its informative flags (lists; None where there is none)."""
    spans = [None if r.query_positions is None else r.query_positions.tolist() for r in state.rows]
    flags = [state.record(vlmfix.GIFT).rows[r.index].informative for r in state.rows]
    return spans, [None if f is None else f.tolist() for f in flags]


def check_against_reference(model, processor, inputs, gift, gen_kw):
    """Saliency maps equal (the model runs eager underneath, as the reference's first pass does,
    so the hidden states entering the saliency layer are the same), and so do the tokens."""
    text = model.config.get_text_config()
    before = text._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    with vlmfix.attach(model, processor, gift) as fixed:
        ours = generate(fixed, inputs, **gen_kw)
        state = fixed.last_state
        gift = fixed.runtimes[0]  # the resolved layers and alpha
    model.set_attn_implementation({"text_config": before})
    spans, flags = spans_and_flags(state)
    maps = saliency(model, inputs, spans, flags, gift.saliency_layers, gift.alpha)
    assert any(m is not None and float(m[0].max()) == 1.0 for m in maps)  # a real, non-flat map
    for row, m in enumerate(maps):
        got = vlmfix.GIFT.saliency(state, row)
        if m is None:
            assert got is None
            continue
        assert torch.allclose(got, m[0], atol=1e-6, rtol=0), f"saliency of row {row}"
    with boosted(model, Booster(model, inputs, spans, maps, gift.boost_layers, gift.beta)):
        ref = generate(model, inputs, **gen_kw)
    assert torch.equal(ours[0], ref[0])
    assert torch.allclose(ours[1], ref[1], atol=1e-4, rtol=0)
    return ours, state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", ["one-prefill", "prepass"])
def test_gift_matches_reference_on_tiny_models(family, order):
    model = make_model(family)
    batch = make_batch(family, model, prompts())
    layers = dict(saliency_layers=(1,), boost_layers=(2, 3)) if order == "one-prefill" else \
        dict(saliency_layers=(2,), boost_layers=(1, 2, 3))
    gift = vlmfix.GIFT(alpha=3.0, **layers)
    plain = generate(model, batch, pad_token_id=PAD)
    ours, state = check_against_reference(model, tokenizer(), batch, gift, dict(pad_token_id=PAD))
    with vlmfix.attach(model, tokenizer(), gift) as fixed:
        assert fixed.runtimes[0].needs_prepass == (order == "prepass")
    assert not torch.equal(ours[1], plain[1]), "GIFT changed nothing in this construction"


@pytest.mark.smollm2
def test_gift_matches_reference_on_smollm2_llava(smol_pair):
    model, processor, texts, images, inputs = smol_pair
    gift = vlmfix.GIFT()
    ours, state = check_against_reference(model, processor, inputs, gift, {})
    with vlmfix.attach(model, processor, gift) as fixed:
        resolved = fixed.runtimes[0]
    assert resolved.saliency_layers == (10,) and resolved.boost_layers == tuple(range(11, 22))  # the depth rule, 30 layers
    assert gift.saliency_layers is None and gift.alpha is None  # the config is left as given
    # "Is there a red bicycle near the tree?": red, bicycle, tree
    assert spans_and_flags(state)[1][0] == [False, False, False, True, True, False, False, True, False]

    # batched rows equal single runs
    single = processor(images=images[1], text=texts[1], return_tensors="pt")
    with vlmfix.attach(model, processor, vlmfix.GIFT()) as fixed:
        alone = generate(fixed, single)
        alone_map = vlmfix.GIFT.saliency(fixed.last_state, 0)
    n = GEN["max_new_tokens"]
    assert torch.equal(alone[0][0, -n:], ours[0][1, -n:])
    assert torch.allclose(alone[1][:, 0], ours[1][:, 1], atol=1e-4, rtol=0)
    assert torch.allclose(alone_map, vlmfix.GIFT.saliency(state, 1), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_is_the_model_alone(family):
    model = make_model(family)
    batch = make_batch(family, model, prompts())
    plain = generate(model, batch, pad_token_id=PAD)
    with vlmfix.attach(model, tokenizer(), vlmfix.GIFT(alpha=0.0, saliency_layers=(1,), boost_layers=(2, 3))):
        got = generate(model, batch, pad_token_id=PAD)
    assert torch.equal(plain[0], got[0]) and torch.equal(plain[1], got[1])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_bare_tokenizer_gives_the_question_span_and_words(family):
    """A tokenizer passed where the processor goes is used: the question is the user turn's text, from its
    header to its turn-end marker (neither the text before the header nor the assistant header is the
    question), only informative words count, and GIFT equals the reference."""
    model = make_model(family)
    batch = make_batch(family, model, [(user_turn([5]), (60, 90), chat_after(QUESTION)),
                                       (user_turn([12, 13]), (90, 60), chat_after(" What is the colour of the dog?"))])
    gift = vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))
    _, state = check_against_reference(model, tokenizer(), batch, gift, dict(pad_token_id=PAD))
    assert tokenizer().decode(batch["input_ids"][0, state.rows[0].query_positions]) == QUESTION
    assert spans_and_flags(state)[1] == [[False, False, False, True, True, False, False, True, False],
                                         [False, False, False, True, False, False, True, False]]


def test_gift_without_a_tokenizer_is_refused():
    model = make_model("llava")
    with pytest.raises(vlmfix.VlmfixError, match="GIFT reads the user's question as words.*processor or its tokenizer"):
        vlmfix.attach(model, None, vlmfix.GIFT())
    with pytest.raises(vlmfix.VlmfixError, match="got LlavaConfig"):
        vlmfix.attach(model, model.config, [vlmfix.VAR(), vlmfix.GIFT()], sink_dims=[0])
    assert not any(hasattr(m.self_attn, ROUTE) for m in model.model.language_model.layers)  # nothing attached


@pytest.mark.smollm2
def test_no_informative_word_leaves_attention_unchanged(small_smol_llava):
    from PIL import Image

    from vlmfix.demo.assemble import prompt_for

    model, processor = small_smol_llava
    inputs = processor(images=Image.new("RGB", (64, 64), "red"), text=prompt_for("Is it there?"),
                       return_tensors="pt")
    plain = generate(model, inputs)
    with vlmfix.attach(model, processor, vlmfix.GIFT()) as fixed:
        got = generate(fixed, inputs)
        note = fixed.last_state.record(vlmfix.GIFT).note(0)
    assert "no informative word" in note and vlmfix.GIFT.saliency(fixed.last_state) is None
    assert torch.equal(plain[0], got[0]) and torch.equal(plain[1], got[1])


def test_informative_word_list():
    text = "Is there a red bicycle near the 2 trees, or not?"
    words = [text[s:e] for s, e in informative_words(text, use_spacy=False)]
    assert words == ["red", "bicycle", "2", "trees"]
    pieces = ["Is", " there", " a", " bi", "cycle", "?"]
    assert informative_tokens(pieces, use_spacy=False) == [False, False, False, True, True, False]


def test_depth_rule_and_presets():
    assert default_layers(32) == ((11,), tuple(range(12, 23)))  # LLaVA-1.5-7B's published layers
    assert default_layers(30) == ((10,), tuple(range(11, 22)))
    from vlmfix.core.presets import model_presets

    gift = {p["name"]: p["gift"] for p in model_presets() if "gift" in p}
    assert gift["llava-1.5-7b"] == {"saliency_layers": [11], "boost_layers": [12, 22], "alpha": 5.0}
    assert gift["qwen2-vl-7b"] == {"saliency_layers": [14], "boost_layers": [5, 18], "alpha": 4.0}


@pytest.mark.parametrize("bad, match", [(dict(alpha=-1.0), "alpha"), (dict(saliency_layers=(9,)), "outside"),
                                        (dict(boost_layers=()), "empty")])
def test_gift_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        vlmfix.attach(make_model("llava"), tokenizer(), vlmfix.GIFT(**bad))
