"""M3ID (vlmfix.methods.m3id) against the slow two-model-call reference (tests/reference_m3id.py) on the tiny
models: tokens and scores, the neutral setting, batches, its step counter, compositions, the CLI."""

import pytest
import torch

import vlmfix
from reference_m3id import m3id_generate_reference
from test_pai import AFTER, BEFORE, assert_scores, greedy
from tiny import make_batch, make_model, tokenizer
from vlmfix.core.attach import VlmfixError
from vlmfix.methods.m3id import M3ID
from probes import lmms_eval_logs

torch.set_num_threads(2)
STEPS = 5


@pytest.mark.parametrize("lam,threshold", [(0.02, None), (0.7, 0.05)])
def test_equals_the_reference(family_model, lam, threshold):
    family, model = family_model
    with_image = make_batch(family, model, [(BEFORE, (60, 90), AFTER)])
    without = make_batch(family, model, [(BEFORE, None, AFTER)])
    ref_tokens, ref_scores = m3id_generate_reference(model, with_image, without, lam, STEPS, threshold)
    with vlmfix.attach(model, tokenizer(), M3ID(lam=lam, threshold=threshold)) as fixed:
        tokens, scores = greedy(fixed, with_image)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert_scores(scores[0], ref_scores)


def test_the_weight_grows_with_t_and_changes_the_tokens():
    """With a large lambda M3ID departs from the plain model after the first token (the weight is 0 at t = 0)."""
    model = make_model("llava")
    batch = make_batch("llava", model, [(BEFORE, (60, 90), AFTER)])
    plain_tokens, plain_scores = greedy(model, batch)
    with vlmfix.attach(model, tokenizer(), M3ID(lam=3.0)) as fixed:
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(M3ID)
    assert torch.allclose(scores[0, 0], torch.log_softmax(plain_scores[0, 0], -1), atol=1e-5)
    assert tokens[0, 0] == plain_tokens[0, 0] and not torch.equal(tokens, plain_tokens)
    assert record.row(0) == {"image": True, "lam": 3.0, "steps": STEPS - 1} and record.acted() == [True]


def test_neutral_setting_equals_plain_generate(family_model):
    family, model = family_model
    batch = make_batch(family, model, [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18])])
    plain_tokens, plain_scores = greedy(model, batch)
    with vlmfix.attach(model, tokenizer(), M3ID(lam=0.0)) as fixed:
        assert fixed.brancher is None
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(M3ID)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(scores, plain_scores)
    assert record.acted() == [False, False] and "lam = 0" in record.notes(0)[0]


def test_batch_rows_equal_rows_alone(family_model):
    """Left padding, mixed lengths, a row without an image; the step counter restarts at each call."""
    family, model = family_model
    prompts = [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18, 19, 20]),
               ([1, 12], None, [13, 14, 15, 16])]
    batch = make_batch(family, model, prompts)
    assert (batch["attention_mask"] == 0).any()
    plain_text, plain_text_scores = greedy(model, make_batch(family, model, [prompts[2]]))
    with vlmfix.attach(model, tokenizer(), M3ID(lam=0.7)) as fixed:
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(M3ID)
        for r, p in enumerate(prompts):
            alone_tokens, alone_scores = greedy(fixed, make_batch(family, model, [p]))
            assert tokens[r].tolist() == alone_tokens[0].tolist()
            assert_scores(scores[r], alone_scores[0], atol=1e-4)
    assert record.acted() == [True, True, False]
    assert record.to_json()["rows"][2]["image"] is False and "text-only" in record.notes(2)[0]
    assert tokens[2].tolist() == plain_text[0].tolist()
    assert torch.allclose(scores[2], plain_text_scores[0], atol=1e-5)


def test_compiled_static_cache_generation_equals_eager():
    """The branch rows in a static cache and compiled decoding steps: the eager dynamic cache's tokens and scores, a
    text-only row included (the decoding step reads tensors only)."""
    from torch._dynamo.utils import counters

    from test_runtime import compile_config

    torch._dynamo.reset()
    model = make_model("llava")
    batch = make_batch("llava", model, [(BEFORE, (60, 90), AFTER), ([1, 12, 20], None, [13, 14, 15, 16])])
    with vlmfix.attach(model, tokenizer(), M3ID(lam=0.7)) as fixed:
        tokens, scores = greedy(fixed, batch)
        static_tokens, static_scores = greedy(fixed, batch, cache_implementation="static", disable_compile=True)
        counters.clear()
        compiled_tokens, compiled_scores = greedy(fixed, batch, cache_implementation="static",
                                                  compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] > 0, "the decoding steps were not compiled"
        record = fixed.last_state.record(M3ID)
    assert record.row(0)["steps"] == STEPS - 1  # the step counter advanced inside the compiled steps too
    assert torch.equal(static_tokens, tokens) and torch.equal(compiled_tokens, tokens)
    assert_scores(static_scores, scores)
    assert_scores(compiled_scores, scores)


def test_composes_with_var_and_gift_and_refuses_pruning():
    """Beside VAR or GIFT (attention edits on the real rows) the contrast is that of the edited model: M3ID's
    combination of the edited image-conditioned scores with the branch's; beside token pruning attach refuses."""
    model = make_model("llava")
    batch = make_batch("llava", model, [(BEFORE, (60, 90), AFTER)])
    with vlmfix.attach(model, tokenizer(), M3ID(lam=0.7)) as fixed:
        alone = greedy(fixed, batch)[1]
    for other in (vlmfix.VAR(tau=1.0, p=0.9), vlmfix.GIFT()):
        with vlmfix.attach(model, tokenizer(), [other]) as fixed:
            edited = greedy(fixed, batch)[1]
        with vlmfix.attach(model, tokenizer(), [M3ID(lam=0.7), other]) as fixed:
            both = greedy(fixed, batch)[1]
            assert fixed.last_state.record(M3ID).acted() == [True]
        assert torch.allclose(both[0, 0], torch.log_softmax(edited[0, 0], -1), atol=1e-5)  # t = 0: the edited l_c
        assert both.shape == alone.shape
    with pytest.raises(VlmfixError, match="pruning"):
        vlmfix.attach(model, tokenizer(), [M3ID(), vlmfix.FastVPrune(keep=8)])


def test_config_checks():
    with pytest.raises(ValueError, match="lam"):
        M3ID(lam=-0.1)
    with pytest.raises(ValueError, match="2 mistakes"):
        M3ID(lam=float("nan"), threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        M3ID(threshold=1.5)
    assert vlmfix.methods.registry.build("m3id") == M3ID()


def test_lmms_eval_runs_m3id_and_logs_its_record():
    logs = lmms_eval_logs("m3id")
    assert [log["m3id_image"] for log in logs] == [True, True] and all(log["m3id_lam"] == 0.02 for log in logs)


@pytest.mark.smollm2
def test_equals_the_reference_on_smollm2_llava(smol_one):
    """The paper's defaults on the real test-bed; the image-free prompt is the same prompt without its image
    tokens."""
    model, processor, one = smol_one
    ids = one["input_ids"][0]
    free = ids[ids != model.config.image_token_id][None]
    assert free.shape[1] < ids.shape[0]
    without = {"input_ids": free, "attention_mask": torch.ones_like(free)}
    ref_tokens, ref_scores = m3id_generate_reference(model, one, without, M3ID().lam, 2, M3ID().threshold)
    with vlmfix.attach(model, processor, M3ID()) as fixed:
        tokens, scores = greedy(fixed, one, steps=2)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert_scores(scores[0], ref_scores, atol=2e-3)
