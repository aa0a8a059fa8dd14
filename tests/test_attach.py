"""attach/detach on tiny random models of the three families: exact no-op, routing, restore, errors."""

from __future__ import annotations

import pytest
import torch
from probes import EveryRow, LastRow
from tiny import IMAGE, PAD, make_batch, make_model, prompts_two
from transformers import LlamaConfig, LlamaForCausalLM

import vlmfix
from vlmfix.core.attach import _implementations

GEN = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)


def run(model, batch, **kw):
    out = model.generate(**batch, **GEN, **kw)
    return out.sequences, torch.stack(out.logits)


def assert_same(a, b, atol=1e-5):
    assert torch.equal(a[0], b[0]), "greedy tokens differ"
    assert torch.allclose(a[1], b[1], atol=atol, rtol=0), f"logits differ by {(a[1] - b[1]).abs().max()}"


@pytest.mark.parametrize("which", ["batch", "single"])
def test_no_methods_is_exact(family, model, which):
    prompts = prompts_two() if which == "batch" else prompts_two()[1:]
    batch = make_batch(family, model, prompts)
    ref = run(model, batch)
    with vlmfix.attach(model) as fixed:
        got = run(fixed, batch)
        assert fixed.last_state is not None and fixed.last_state.batch_size == len(prompts)
    assert_same(ref, got)


@pytest.mark.parametrize("probe", [EveryRow, LastRow])
def test_eager_rows_match_fast_path(family, model, probe):
    """Rows recomputed in eager form (fp32 softmax, mask conversion, GQA expansion) equal SDPA's."""
    batch = make_batch(family, model, prompts_two())
    ref = run(model, batch)
    method = probe()
    with vlmfix.attach(model, None, method):
        got = run(model, batch)
    assert_same(ref, got)
    if isinstance(method, EveryRow):
        phases = {s[0] for s in method.seen}
        assert phases == {"prefill", "decode"}
        layers = {s[1] for s in method.seen}
        assert layers == set(range(model.config.text_config.num_hidden_layers))


def test_eager_rows_match_eager_model(family):
    """With an eager model underneath, the eager-mask format is handled too and restored after."""
    model = make_model(family)
    model.set_attn_implementation("eager")
    batch = make_batch(family, model, prompts_two())
    ref = run(model, batch)
    before = _implementations(model.config)
    with vlmfix.attach(model, None, EveryRow()):
        got = run(model, batch)
    assert _implementations(model.config) == before
    assert_same(ref, got)


def test_detach_restores_every_subconfig(family, model):
    before = _implementations(model.config)
    fixed = vlmfix.attach(model)
    during = _implementations(model.config)
    text_key = next(k for k in model.config.sub_configs if getattr(model.config, k) is model.config.get_text_config())
    assert during[text_key][""] == "vlmfix"
    for key, value in before.items():  # everything but the text decoder is left alone
        if key != text_key:
            assert during[key] == value
    fixed.detach()
    assert _implementations(model.config) == before
    fixed.detach()  # twice: a no-op
    assert _implementations(model.config) == before
    with pytest.raises(vlmfix.VlmfixError, match="detached"):
        fixed.generate(**make_batch(family, model, prompts_two()))


def test_attach_twice_is_refused(family, model):
    with vlmfix.attach(model):
        with pytest.raises(vlmfix.VlmfixError, match="already attached"):
            vlmfix.attach(model)
    with vlmfix.attach(model, None, vlmfix.FastVPrune()):  # a pruner hears the real reason, not "needs sdpa"
        with pytest.raises(vlmfix.VlmfixError, match="already attached"):
            vlmfix.attach(model, None, vlmfix.StagedPrune(layers=(1,), keep_ratios=(0.5,)))
    with vlmfix.attach(model):  # after detach it attaches again
        pass


def test_plain_generate_runs_methods_while_attached(family, model):
    batch = make_batch(family, model, prompts_two())
    probe = EveryRow()
    fixed = vlmfix.attach(model, None, probe)
    model.generate(**batch, **GEN)
    assert probe.seen and fixed.last_state is not None
    fixed.detach()
    n = len(probe.seen)
    model.generate(**batch, **GEN)
    assert len(probe.seen) == n, "methods ran after detach"


def test_two_models_at_once(family):
    a, b = make_model(family, seed=1), make_model(family, seed=2)
    batch_a = make_batch(family, a, prompts_two())
    batch_b = make_batch(family, b, prompts_two()[:1])
    ref_a, ref_b = run(a, batch_a), run(b, batch_b)
    pa, pb = EveryRow(), EveryRow()
    with vlmfix.attach(a, None, pa) as fa, vlmfix.attach(b, None, pb) as fb:
        got_a, got_b = run(fa, batch_a), run(fb, batch_b)
        assert fa.last_state.batch_size == 2 and fb.last_state.batch_size == 1
    assert_same(ref_a, got_a)
    assert_same(ref_b, got_b)
    assert {s[2] for s in pa.seen} != {s[2] for s in pb.seen}


def test_text_only_row_left_untouched(family, model):
    prompts = [([1, 5, 6, 7, 8, 9], None, [10, 11]), prompts_two()[1]]
    batch = make_batch(family, model, prompts)
    ref = run(model, batch)
    with vlmfix.attach(model, None, EveryRow()) as fixed:
        got = run(fixed, batch)
        rows = fixed.last_state.rows
    assert not rows[0].has_image and "text-only" in rows[0].note
    assert rows[1].has_image and rows[1].note == ""
    assert_same(ref, got)


def test_state_is_per_call(family, model):
    with vlmfix.attach(model) as fixed:
        model(**make_batch(family, model, prompts_two()))
        first = fixed.last_state
        model(**make_batch(family, model, prompts_two()[:1]))
        second = fixed.last_state
    assert first is not second and first.batch_size == 2 and second.batch_size == 1


def test_image_token_count_mismatch(family, model):
    batch = make_batch(family, model, prompts_two())
    ids = batch["input_ids"].clone()
    pos = (ids[1] == IMAGE).nonzero()[0]
    ids[1, pos] = 7
    batch["input_ids"] = ids
    with vlmfix.attach(model):
        with pytest.raises(vlmfix.VlmfixInputError, match="image tokens"):
            model(**batch)


def test_unsupported_model_names_families():
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2))
    with pytest.raises(vlmfix.VlmfixInputError, match="LLaVA-1.5.*LLaVA-NeXT.*Qwen2-VL"):
        vlmfix.attach(lm)


@pytest.mark.parametrize("tau", [0.0, -1.0, "bos:0", "bos:1.5", "high"])
def test_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        vlmfix.attach(make_model("llava"), None, tau=tau)


def test_not_a_method():
    with pytest.raises(TypeError, match="vlmfix methods"):
        vlmfix.attach(make_model("llava"), None, ["var"])


def test_processor_of_another_family():
    model = make_model("llava")

    class Qwen2VLProcessor:  # the class name is what identifies a processor's family
        image_processor = object()
        image_token_id = IMAGE

    with pytest.raises(vlmfix.VlmfixInputError, match="another model family"):
        vlmfix.attach(model, Qwen2VLProcessor())


def test_processor_with_other_image_token():
    model = make_model("llava")

    class LlavaProcessor:
        image_processor = object()
        image_token_id = IMAGE + 1

    with pytest.raises(vlmfix.VlmfixInputError, match="image token id"):
        vlmfix.attach(model, LlavaProcessor())
