"""ONLY (vlmfix.methods.only) against the slow two-model-call reference (tests/reference_only.py) on the tiny models:
tokens and scores, the neutral setting, batches, compositions, the CLI and lmms-eval."""

import pytest
import torch

import vlmfix
from reference_only import only_generate_reference
from test_pai import AFTER, BEFORE, assert_scores, greedy
from tiny import make_batch, make_model, tokenizer
from vlmfix.core.attach import VlmfixError
from vlmfix.methods.only import ONLY, head_entropy_ratio
from probes import lmms_eval_logs

torch.set_num_threads(2)
STEPS = 5


def check_reference(model, batch, layer, alpha1, alpha2, gamma, beta):
    ref_tokens, ref_scores = only_generate_reference(model, batch, layer, alpha1, alpha2, gamma, beta, STEPS)
    config = ONLY(layer=layer, alpha1=alpha1, alpha2=alpha2, gamma=gamma, beta=beta)
    with vlmfix.attach(model, tokenizer(), config) as fixed:
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(ONLY)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert_scores(scores[0], ref_scores, atol=2e-4)
    assert record.row(0)["collaborative"] + record.row(0)["contrastive"] == STEPS and record.acted() == [True]
    return record


def test_equals_the_reference(family_model):
    """The paper's setting on each family."""
    family, model = family_model
    check_reference(model, make_batch(family, model, [(BEFORE, (60, 90), AFTER)]), 0, 3.0, 1.0, 0.2, 0.1)


@pytest.mark.parametrize("layer,alpha1,alpha2,gamma,beta", [(1, 3.0, 1.0, 2.0, 0.0), (2, 0.5, 2.0, 0.0, 0.05)])
def test_equals_the_reference_collaborative_and_contrastive(layer, alpha1, alpha2, gamma, beta):
    """Always collaborative (gamma 2, the largest distance) and always contrastive (gamma 0), other layers."""
    model = make_model("llava")
    record = check_reference(model, make_batch("llava", model, [(BEFORE, (60, 90), AFTER)]), layer, alpha1, alpha2,
                             gamma, beta)
    assert record.row(0)["collaborative" if gamma == 2.0 else "contrastive"] == STEPS


def test_the_enhanced_branch_differs_from_the_plain_model():
    """The head selection changes the branch's logits: with alpha2 = 1 and gamma 0 the scores are 2 f - f~, not f."""
    model = make_model("llava")
    batch = make_batch("llava", model, [(BEFORE, (60, 90), AFTER)])
    plain = greedy(model, batch)[1]
    with vlmfix.attach(model, tokenizer(), ONLY(alpha1=0.0, alpha2=1.0, gamma=0.0, beta=0.0)) as fixed:
        scores = greedy(fixed, batch)[1]
    assert (scores - plain).abs().max() > 1e-3


def test_tver_is_the_ratio_of_the_renormalised_entropies():
    probs = torch.tensor([[[[0.5, 0.0, 0.25, 0.25]]]])  # keys 0, 1 text; 2, 3 image
    image = torch.tensor([[False, False, True, True]])
    assert torch.allclose(head_entropy_ratio(probs, image), torch.tensor(0.0))  # text part one-hot: H = 0
    probs = torch.tensor([[[[0.25, 0.25, 0.4, 0.1]]]])
    h_vis = -(0.8 * torch.log(torch.tensor(0.8)) + 0.2 * torch.log(torch.tensor(0.2)))
    assert torch.allclose(head_entropy_ratio(probs, image), torch.log(torch.tensor(2.0)) / h_vis)


def test_neutral_setting_equals_plain_generate(family_model):
    family, model = family_model
    batch = make_batch(family, model, [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18])])
    plain_tokens, plain_scores = greedy(model, batch)
    with vlmfix.attach(model, tokenizer(), ONLY(alpha1=0.0, alpha2=0.0, beta=0.0)) as fixed:
        assert fixed.brancher is None
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(ONLY)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(scores, plain_scores)
    assert record.acted() == [False, False] and "alpha1 = alpha2 = beta = 0" in record.notes(0)[0]


def test_batch_rows_equal_rows_alone(family_model):
    """Left padding, mixed lengths, a row without an image (its raw logits)."""
    family, model = family_model
    prompts = [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18, 19, 20]),
               ([1, 12], None, [13, 14, 15, 16])]
    batch = make_batch(family, model, prompts)
    assert (batch["attention_mask"] == 0).any()
    plain_text, plain_text_scores = greedy(model, make_batch(family, model, [prompts[2]]))
    with vlmfix.attach(model, tokenizer(), ONLY(layer=1, gamma=0.05)) as fixed:
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(ONLY)
        for r, p in enumerate(prompts):
            alone_tokens, alone_scores = greedy(fixed, make_batch(family, model, [p]))
            assert tokens[r].tolist() == alone_tokens[0].tolist()
            assert_scores(scores[r], alone_scores[0], atol=1e-4)
    assert record.acted() == [True, True, False] and "text-only" in record.notes(2)[0]
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
    with vlmfix.attach(model, tokenizer(), ONLY(layer=1, gamma=0.05)) as fixed:
        tokens, scores = greedy(fixed, batch)
        static_tokens, static_scores = greedy(fixed, batch, cache_implementation="static", disable_compile=True)
        counters.clear()
        compiled_tokens, compiled_scores = greedy(fixed, batch, cache_implementation="static",
                                                  compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] > 0, "the decoding steps were not compiled"
        record = fixed.last_state.record(ONLY)
    assert record.row(0)["collaborative"] + record.row(0)["contrastive"] == STEPS
    assert torch.equal(static_tokens, tokens) and torch.equal(compiled_tokens, tokens)
    assert_scores(static_scores, scores)
    assert_scores(compiled_scores, scores)


def test_composes_with_var_and_gift_and_refuses_pruning():
    """Beside VAR or GIFT (edits of the real rows) ONLY still acts on its branch rows: the pair differs from the
    other method alone; beside token pruning attach refuses (one KV cache for both halves)."""
    model = make_model("llava")
    batch = make_batch("llava", model, [(BEFORE, (60, 90), AFTER)])
    for other in (vlmfix.VAR(tau=1.0, p=0.9), vlmfix.GIFT()):
        with vlmfix.attach(model, tokenizer(), [other]) as fixed:
            alone = greedy(fixed, batch)[1]
        with vlmfix.attach(model, tokenizer(), [ONLY(gamma=0.0), other]) as fixed:
            both = greedy(fixed, batch)[1]
            assert fixed.last_state.record(ONLY).acted() == [True]
        assert (both[torch.isfinite(both)] - alone[torch.isfinite(both)]).abs().max() > 1e-3
    with pytest.raises(VlmfixError, match="pruning"):
        vlmfix.attach(model, tokenizer(), [ONLY(), vlmfix.FastVPrune(keep=8)])


def test_config_checks():
    with pytest.raises(ValueError, match="gamma"):
        ONLY(gamma=3.0)
    with pytest.raises(ValueError, match="2 mistakes"):
        ONLY(layer=-1, beta=2.0)
    with pytest.raises(ValueError, match="outside"):
        vlmfix.attach(make_model("llava"), tokenizer(), ONLY(layer=4))
    assert vlmfix.methods.registry.build("only") == ONLY()


def test_lmms_eval_runs_only_beside_vaf_and_logs_their_records():
    """lmms-eval's `methods=only+vaf`: ONLY's branch rows and VAF's edit of the real rows in one batch of two; each
    request's sample log holds both records of its row."""
    logs = lmms_eval_logs("only+vaf")
    assert [log["only_image"] for log in logs] == [True, True]
    assert all(log["only_collaborative"] + log["only_contrastive"] >= 1 for log in logs)
    assert [log["vaf_image"] for log in logs] == [True, True] and all(log["vaf_system"] > 0 for log in logs)


@pytest.mark.smollm2
def test_equals_the_reference_on_smollm2_llava(smol_one):
    """The paper's defaults (layer 0, alpha1 3, alpha2 1, gamma 0.2, beta 0.1) on the real test-bed."""
    model, processor, one = smol_one
    d = ONLY()
    ref_tokens, ref_scores = only_generate_reference(model, one, d.layer, d.alpha1, d.alpha2, d.gamma, d.beta, 2)
    with vlmfix.attach(model, processor, ONLY()) as fixed:
        tokens, scores = greedy(fixed, one, steps=2)
        record = fixed.last_state.record(ONLY)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert_scores(scores[0], ref_scores, atol=2e-3)
    assert record.row(0)["collaborative"] + record.row(0)["contrastive"] == 2 and record.acted() == [True]
