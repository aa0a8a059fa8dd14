"""DART (vlmfix.methods.dart) against its slow reference (tests/reference_dart.py) on hand-sized inputs and on the
tiny LLaVA run by hand; keep = all is the model; batch = rows alone; the two forms; compiled static-cache
generation (mask form) and the refusal of the in-place form there; composition with VAR and GIFT; configs;
the CLI and lmms-eval."""

from __future__ import annotations

import pytest
import torch
from reference_dart import dart_choice_reference, decoder_reference
from tiny import PAD, make_batch, make_model, prompts_two, tokenizer

import vlmfix
from vlmfix.methods import build, methods, parse_methods
from vlmfix.methods.dart import dart_choice
from vlmfix.methods.prune import kept_tokens, prune_record

GEN = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)
#: a row with an image, one without, and one with a larger image (left padding, mixed lengths)
PROMPTS = [([1, 5, 6], (30, 30), [7, 8, 9, 10, 11]), ([1, 12, 13, 14], None, [15, 16]),
           ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18, 19, 20])]


def run(model, batch, methods=None, **kw):
    if methods is None:
        out = model.generate(**batch, **GEN, **kw)
        return out.sequences, torch.stack(out.logits), None
    with vlmfix.attach(model, tokenizer(), methods) as fixed:
        out = fixed.generate(**batch, **GEN, **kw)
        state = fixed.last_state
    return out.sequences, torch.stack(out.logits), state


@pytest.fixture(scope="module")
def llava():
    return make_model("llava")


@pytest.mark.parametrize("n,t,budget,pivots", [(12, 5, 7, (4, 4)), (12, 5, 3, (4, 4)), (9, 0, 6, (2, 4)),
                                               (16, 6, 10, (3, 0)), (5, 3, 5, (4, 4))])
def test_choice_equals_the_reference_on_hand_sized_inputs(n, t, budget, pivots):
    g = torch.Generator().manual_seed(n * 100 + budget)
    image, text = torch.randn(n, 6, generator=g), torch.randn(t, 6, generator=g)
    kept, scores = dart_choice(image, text, budget, *pivots)
    assert kept.tolist() == dart_choice_reference(image, text, budget, *pivots)
    assert len(kept) == min(budget, n) and scores.shape == (n,)


def test_choice_keeps_distinct_tokens_and_drops_duplicates():
    """A planted duplicate of a pivot is dropped first; tokens orthogonal to every pivot are kept."""
    e = torch.eye(8)
    image = torch.stack([9 * e[0], 8 * e[1], e[0] + 0.01 * e[1], e[2], e[3], e[0] * 1.1 + 0.05 * e[2]])
    kept, _ = dart_choice(image, torch.zeros(0, 8), 4, image_pivots=2, text_pivots=0)
    assert kept.tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("layer,keep", [(2, 7), (1, 3)])
@pytest.mark.parametrize("form", ["inplace", "mask"])
def test_pruned_model_equals_the_hand_run_decoder(llava, layer, keep, form):
    """The prefill's next-token logits equal the tiny LLaVA's decoder run by hand: all tokens through layers
    0 .. K-1, then the text and the reference's kept image tokens only, at their original positions."""
    batch = make_batch("llava", llava, [([1, 5, 6], (30, 30), [7, 8, 9, 10, 11])])
    with vlmfix.attach(llava, None, vlmfix.DART(layer=layer, keep=keep, form=form)) as fixed:
        out = fixed.generate(**batch, **GEN)
        state = fixed.last_state
    img = state.rows[0].image_positions
    after = state.rows[0].after_image

    def choose(h):
        return img[dart_choice_reference(h[img], h[after:], keep)]

    kept, logits = decoder_reference(llava, batch, img, layer, choose)
    assert kept_tokens(state).tolist() == kept
    torch.testing.assert_close(out.logits[0][0], logits, atol=1e-4, rtol=0)


def test_keep_all_is_the_model_exactly(llava):
    batch = make_batch("llava", llava, PROMPTS)
    plain = run(llava, batch)
    for method in (vlmfix.DART(keep=1000), vlmfix.DART(keep_ratio=1.0, form="mask")):
        tokens, logits, state = run(llava, batch, method)
        assert torch.equal(tokens, plain[0]) and torch.equal(logits, plain[1])
        assert not prune_record(state).stages


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_batch_rows_equal_rows_alone_and_forms_agree(family):
    model = make_model(family)
    prompts = PROMPTS if family != "qwen2_vl" else [(p[0], None if p[1] is None else (56, 84), p[2]) for p in PROMPTS]
    batch = make_batch(family, model, prompts)
    method = vlmfix.DART(layer=1, keep=5, image_pivots=2, text_pivots=2)
    together = run(model, batch, method)
    mask = run(model, batch, vlmfix.DART(layer=1, keep=5, image_pivots=2, text_pivots=2, form="mask"))
    rec = prune_record(together[2])
    assert [k.tolist() for k in rec.stages[0].kept] == [k.tolist() for k in prune_record(mask[2]).stages[0].kept]
    assert torch.equal(together[0], mask[0]) and torch.allclose(together[1], mask[1], atol=1e-4, rtol=0)
    assert rec.acted() == [True, False, True] and len(rec.stages[0].kept[1]) == 0
    for r, prompt in enumerate(prompts):
        alone = run(model, make_batch(family, model, [prompt]), method)
        shift = together[2].rows[r].pad_left - alone[2].rows[0].pad_left
        assert (kept_tokens(together[2], r) - shift).tolist() == kept_tokens(alone[2]).tolist()
        new = alone[0][0, -GEN["max_new_tokens"]:]
        assert torch.equal(together[0][r, -GEN["max_new_tokens"]:], new)
        torch.testing.assert_close(together[1][:, r], alone[1][:, 0], atol=1e-4, rtol=0)


def test_compiled_static_cache_mask_form_gives_the_eager_tokens(llava):
    from torch._dynamo.utils import counters
    from test_runtime import compile_config

    batch = make_batch("llava", llava, prompts_two())
    torch._dynamo.reset()
    with vlmfix.attach(llava, None, vlmfix.DART(keep=6, form="mask")) as fixed:
        eager = run(fixed, batch)
        counters.clear()
        out = fixed.generate(**batch, **GEN, cache_implementation="static", compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] > 0, "the decoding steps were not compiled"
        assert [k.tolist() for k in prune_record(fixed.last_state).stages[0].kept] == \
            [k.tolist() for k in prune_record(eager[2] or fixed.last_state).stages[0].kept]
    assert torch.equal(out.sequences, eager[0]) and torch.allclose(torch.stack(out.logits), eager[1], atol=1e-4, rtol=0)
    with vlmfix.attach(llava, None, vlmfix.DART(keep=6)) as fixed:
        with pytest.raises(vlmfix.VlmfixError, match="form='mask'"):
            fixed.generate(**batch, **GEN, cache_implementation="static", disable_compile=True)


def test_composes_with_var_and_gift(llava):
    """VAR and GIFT name tokens by prompt position: beside DART, both forms give the same tokens and logits, and
    the composition differs from DART alone."""
    batch = make_batch("llava", llava, prompts_two())

    def methods_(form):
        return [vlmfix.VAR(tau=1.2, m_min=0.05, rho=0.3),
                vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3)), vlmfix.DART(keep=6, form=form)]

    kw = dict(sink_dims=[0, 1])
    outs = []
    for form in ("inplace", "mask"):
        with vlmfix.attach(llava, tokenizer(), methods_(form), **kw) as fixed:
            out = fixed.generate(**batch, **GEN)
            outs.append((out.sequences, torch.stack(out.logits)))
    alone = run(llava, batch, vlmfix.DART(keep=6))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.allclose(outs[0][1], outs[1][1], atol=1e-4, rtol=0)
    assert (outs[0][1] - alone[1]).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs,message", [
    (dict(layer=-1), "layer must be an int >= 0"), (dict(keep=0), "keep must be a positive"),
    (dict(keep=4, keep_ratio=0.5), "not both"), (dict(keep_ratio=1.5), "keep_ratio"),
    (dict(image_pivots=0), "image_pivots must be an int >= 1"), (dict(text_pivots=-1), "text_pivots"),
    (dict(form="fast"), "form")])
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vlmfix.DART(**kwargs)


def test_layer_beyond_the_model_and_a_second_pruner_are_refused(llava):
    with pytest.raises(ValueError, match="out of range"):
        vlmfix.attach(llava, None, vlmfix.DART(layer=9))
    with pytest.raises(ValueError, match="at most one pruner"):
        vlmfix.attach(llava, None, [vlmfix.DART(), vlmfix.FastVPrune()])


def test_registry_presets_and_record_json(llava):
    assert methods()["dart"].config is vlmfix.DART
    assert build("dart") == vlmfix.DART(layer=2, keep=128)
    assert build("dart", "keep64").keep == 64 and parse_methods("dart:keep64-mask") == [vlmfix.DART(keep=64, form="mask")]
    batch = make_batch("llava", llava, prompts_two())
    _, _, state = run(llava, batch, vlmfix.DART(keep=5))
    data = prune_record(state).to_json()
    assert data["stages"][0]["layer"] == 2 and [len(k) for k in data["stages"][0]["kept"]] == [5, 5]


@pytest.mark.smollm2
def test_cli_generate_with_dart(tmp_path, capsys):
    from vlmfix.cli.main import main

    assert main(["generate", "--methods", "dart:keep64", "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    import json

    run_, = json.loads((tmp_path / "generate.json").read_text())["runs"]
    assert "DART(" in run_["configs"][0] and "keep=64" in run_["configs"][0]
    assert (tmp_path / "kept_tokens.png").is_file(), capsys.readouterr().out
