"""ICD (vlmfix.methods.icd) against the slow reference (tests/reference_icd.py) on the tiny models: the disturbed
contrast branch of vlmfix.core.contrast (the instruction inserted before the question, the prompt widened)."""

import pytest
import torch

import vlmfix
from reference_icd import icd_generate_reference
from test_vcd import assert_scores, generate
from tiny import chat_after, make_batch, make_model, tokenizer, user_turn
from vlmfix.core.attach import VlmfixError
from vlmfix.methods.icd import DISTURBANCE, ICD
from probes import lmms_eval_logs

torch.set_num_threads(2)
CHAT = (user_turn(), (60, 90), chat_after())
PLAIN = ([1, 5, 6], (40, 70), [7, 8, 9, 10, 11])  # no chat template: the question is the text from token 5 on
TEXT = (user_turn(), None, chat_after(" Is the sky blue?"))


def prefix(instruction=DISTURBANCE):
    return tokenizer()(instruction + "\n", add_special_tokens=False).input_ids


def disturbed(prompt, instruction=DISTURBANCE):
    """The prompt with the instruction's tokens written out before its question (the reference's own build)."""
    before, size, after = prompt
    if prompt is PLAIN:
        return ([1] + prefix(instruction) + before[1:], size, after)
    return (before, size, prefix(instruction) + after)


@pytest.mark.parametrize("which", ["chat", "plain"])
def test_equals_the_reference(family_model, which):
    family, model = family_model
    if which == "plain" and family != "llava":
        pytest.skip("the prompt without a chat template: once is enough (llava)")
    prompt = CHAT if which == "chat" else PLAIN
    inputs = make_batch(family, model, [prompt])
    ref_tokens, ref_scores = icd_generate_reference(model, inputs, make_batch(family, model, [disturbed(prompt)]),
                                                    1.0, 0.1, 4)
    with vlmfix.attach(model, tokenizer(), ICD()) as fixed:
        tokens, scores = generate(fixed, inputs)
        state = fixed.last_state
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert_scores(scores[0], ref_scores)
    n = len(prefix())
    assert state.prompt_len == inputs["input_ids"].shape[1] + n and state.rows[0].pad_left == n  # widened
    assert state.record(ICD).acted() == [True]


def test_neutral_alpha_is_the_plain_model(family_model):
    family, model = family_model
    batch = make_batch(family, model, [CHAT, PLAIN])
    plain_tokens, plain_scores = generate(model, batch)
    with vlmfix.attach(model, tokenizer(), ICD(alpha=0.0)) as fixed:
        tokens, scores = generate(fixed, batch)
        assert fixed.brancher is None
    assert torch.equal(tokens, plain_tokens) and torch.equal(scores, plain_scores)


def test_batch_rows_equal_rows_alone_and_a_text_row_is_plain(family_model):
    family, model = family_model
    prompts = [PLAIN, TEXT, CHAT]
    batch = make_batch(family, model, prompts)
    assert (batch["attention_mask"] == 0).any()
    with vlmfix.attach(model, tokenizer(), ICD(alpha=2.0)) as fixed:
        tokens, scores = generate(fixed, batch)
        record = fixed.last_state.record(ICD)
        for r, p in enumerate(prompts):
            alone_tokens, alone_scores = generate(fixed, make_batch(family, model, [p]))
            assert tokens[r].tolist() == alone_tokens[0].tolist()
            assert_scores(scores[r], alone_scores[0])
    plain_tokens, plain_scores = generate(model, make_batch(family, model, [TEXT]))
    assert tokens[1].tolist() == plain_tokens[0].tolist()
    assert torch.allclose(scores[1], plain_scores[0], atol=1e-5)
    assert record.acted() == [True, False, True] and "text-only" in record.notes(1)[0]
    assert record.to_json()["instruction"] == DISTURBANCE


def test_composes_with_var_and_gift():
    """VAR and GIFT read the widened prompt (the call's positions count the new padding): VCD's batch = alone holds
    with both attached, and VAR acts."""
    model = make_model("llava")
    prompts = [CHAT, PLAIN]
    methods = [ICD(), vlmfix.VAR(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3)),
               vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))]
    with vlmfix.attach(model, tokenizer(), methods, sink_dims=[0, 1]) as fixed:
        tokens, scores = generate(fixed, make_batch("llava", model, prompts))
        assert any(fixed.last_state.record(vlmfix.VAR).acted())
        for r, p in enumerate(prompts):
            alone, alone_scores = generate(fixed, make_batch("llava", model, [p]))
            assert tokens[r].tolist() == alone[0].tolist()
            assert_scores(scores[r], alone_scores[0])


def test_config_checks_and_refusals():
    with pytest.raises(ValueError, match="instruction"):
        ICD(instruction="  ")
    with pytest.raises(ValueError, match="2 mistakes"):
        ICD(alpha=-1, beta=2)
    model = make_model("llava")
    with pytest.raises(VlmfixError, match="tokenizer"):
        vlmfix.attach(model, None, ICD())
    with pytest.raises(VlmfixError, match="token pruning"):
        vlmfix.attach(model, tokenizer(), [ICD(), vlmfix.FastVPrune()])
    batch = make_batch("llava", model, [CHAT])
    with vlmfix.attach(model, tokenizer(), ICD()) as fixed:
        with pytest.raises(VlmfixError, match="widens the prompt"):
            fixed.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert vlmfix.methods.registry.build("icd") == ICD()


@pytest.mark.smollm2
def test_lmms_eval_runs_icd_and_logs_its_record():
    """lmms-eval's `methods=icd` generates a batch of two with the disturbed rows, and each request's sample log holds
    ICD's record of its row."""
    logs = lmms_eval_logs("icd")
    assert [log["icd_acted"] for log in logs] == [True, True] and all(log["icd_alpha"] == 1.0 for log in logs)


@pytest.mark.smollm2
def test_equals_the_reference_on_smollm2_llava(smol_one):
    """The paper's defaults on the real test-bed: the reference's disturbed prompt is the instruction's tokens
    written before the question (the first non-blank token after the image)."""
    model, processor, one = smol_one
    ids = one["input_ids"][0].tolist()
    at = max(i for i, t in enumerate(ids) if t == model.config.image_token_id) + 1
    while not processor.tokenizer.decode([ids[at]]).strip():
        at += 1
    assert processor.tokenizer.decode(ids[at:]).startswith("Is there a red bicycle")
    instruction = processor.tokenizer(DISTURBANCE + "\n", add_special_tokens=False).input_ids
    disturbed_ids = torch.tensor([ids[:at] + instruction + ids[at:]])
    disturbed_inputs = {**one, "input_ids": disturbed_ids, "attention_mask": torch.ones_like(disturbed_ids)}
    ref_tokens, ref_scores = icd_generate_reference(model, one, disturbed_inputs, 1.0, 0.1, 2)
    with vlmfix.attach(model, processor, ICD()) as fixed:
        tokens, scores = generate(fixed, one, steps=2)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert_scores(scores[0], ref_scores, atol=2e-3)
