"""OPERA (vlmfix.methods.opera) against the literal reference (tests/reference_opera.py) on the tiny models, the
neutral setting against transformers' own beam search, batches against rows alone, composition and refusals."""

import pytest
import torch

import vlmfix
from reference_opera import opera_reference
from tiny import make_batch, make_model, tokenizer
from vlmfix.core.errors import VlmfixError
from vlmfix.methods.opera import OPERA
from probes import lmms_eval_logs

torch.set_num_threads(2)
STEPS = 5
BEFORE, AFTER = [1, 5, 6], [7, 8, 9, 10, 11]


def generated(model, inputs, steps=STEPS, **kw):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kw)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("family,settings", [("llava", dict(threshold=2)), ("qwen2_vl", dict(threshold=2)),
                                             ("llava_next", dict(alpha=2.0, window=3, threshold=3))])
def test_equals_the_reference(family, settings):
    model = make_model(family)
    model.generation_config.eos_token_id = None  # the reference runs every beam to the end
    one = make_batch(family, model, [(BEFORE, (60, 90), AFTER)])
    last = model.config.text_config.num_hidden_layers - 1
    ref_tokens, ref_rollbacks = opera_reference(model, one, [last], steps=STEPS, **settings)
    with vlmfix.attach(model, tokenizer(), OPERA(**settings)) as fixed:
        tokens = generated(fixed, one)
        record = fixed.last_state.record(OPERA)
    assert tokens[0].tolist() == ref_tokens
    assert record.rollbacks[0] == ref_rollbacks
    assert record.acted() == [True] and record.steps[0] > 0 and record.row(0)["penalty_max"] > 0


def test_the_penalty_changes_the_beams():
    """Without the penalty the reference is plain beam search; with it the beams differ (the test can fail)."""
    model = make_model("qwen2_vl")
    model.generation_config.eos_token_id = None
    one = make_batch("qwen2_vl", model, [(BEFORE, (60, 90), AFTER)])
    with vlmfix.attach(model, tokenizer(), OPERA(alpha=2.0, threshold=None)) as fixed:
        penalised = generated(fixed, one)
    assert penalised[0].tolist() != generated(model, one, num_beams=5)[0].tolist()


@pytest.mark.parametrize("family", ["llava"])
def test_neutral_setting_is_transformers_beam_search(family):
    """alpha = 0 and no roll-back: transformers' own beam search exactly, EOS, finished hypotheses, length
    penalty and several returned sequences included (two frequent tokens play EOS so that beams finish)."""
    model = make_model(family)
    model.generation_config.eos_token_id = None
    batch = make_batch(family, model, [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18])])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=[61, 30], length_penalty=0.7,
              num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    plain = model.generate(**batch, num_beams=5, **kw)
    with vlmfix.attach(model, tokenizer(), OPERA(alpha=0.0, threshold=None)) as fixed:
        ours = fixed.generate(**batch, **kw)
        assert fixed.last_state.record(OPERA).acted() == [False, False]
    assert torch.equal(ours.sequences, plain.sequences)
    assert torch.allclose(ours.sequences_scores, plain.sequences_scores, atol=1e-5)
    assert (plain.sequences[:, batch["input_ids"].shape[1]:] == 61).any()  # some beams finished on "EOS"


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_batch_rows_equal_rows_alone(family):
    """Left padding, mixed lengths, a row without an image; roll-backs shorten some rows while others go on."""
    model = make_model(family)
    model.generation_config.eos_token_id = None
    prompts = [(BEFORE, (60, 90), AFTER), ([1, 12], None, [13, 14, 15, 16]),
               ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18, 19, 20])]
    batch = make_batch(family, model, prompts)
    assert (batch["attention_mask"] == 0).any()
    with vlmfix.attach(model, tokenizer(), OPERA(threshold=2, window=4)) as fixed:
        tokens = generated(fixed, batch)
        together = fixed.last_state.record(OPERA).rollbacks
        for r, p in enumerate(prompts):
            alone = generated(fixed, make_batch(family, model, [p]))
            assert tokens[r].tolist() == alone[0].tolist()
            assert together[r] == fixed.last_state.record(OPERA).rollbacks[0]
    assert any(together) and len({len(r) for r in together} | {tuple(r) for r in together}) > 1


def test_model_generate_runs_opera_while_attached_and_not_after():
    model = make_model("llava")
    model.generation_config.eos_token_id = None
    one = make_batch("llava", model, [(BEFORE, (60, 90), AFTER)])
    plain = generated(model, one, num_beams=5)
    with vlmfix.attach(model, tokenizer(), OPERA(alpha=2.0, threshold=None)) as fixed:
        through_model = generated(model, one)  # plain model.generate: OPERA's loop, 5 beams
        assert fixed.last_state.record(OPERA).steps == [STEPS - 1]
    assert "generate" not in vars(model)
    assert torch.equal(generated(model, one, num_beams=5), plain)
    assert not torch.equal(through_model, plain)


def test_static_cache_and_sampling_are_refused():
    model = make_model("llava")
    one = make_batch("llava", model, [(BEFORE, (60, 90), AFTER)])
    with vlmfix.attach(model, tokenizer(), OPERA()) as fixed:
        with pytest.raises(VlmfixError, match="dynamic cache"):
            fixed.generate(**one, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
        with pytest.raises(VlmfixError, match="do_sample=False"):
            fixed.generate(**one, max_new_tokens=2, do_sample=True, pad_token_id=0)


def test_composes_with_var_gift_and_mask_pruning_and_refuses_branches_and_inplace():
    model = make_model("llava")
    model.generation_config.eos_token_id = None
    one = make_batch("llava", model, [(BEFORE, (60, 90), AFTER)])
    with vlmfix.attach(model, tokenizer(), [OPERA(threshold=2), vlmfix.VAR(), vlmfix.GIFT(),
                                            vlmfix.FastVPrune(keep=8, form="mask")], sink_dims=[0, 1]) as fixed:
        tokens = generated(fixed, one, steps=4)
        assert tokens.shape == (1, 4) and fixed.last_state.record(OPERA).steps[0] > 0
    with pytest.raises(VlmfixError, match="contrast-branch"):
        vlmfix.attach(model, tokenizer(), [OPERA(), vlmfix.PAI()])
    with pytest.raises(VlmfixError, match="form='mask'"):
        vlmfix.attach(model, tokenizer(), [OPERA(), vlmfix.FastVPrune(keep=8, form="inplace")])
    assert "generate" not in vars(model)


def test_config_checks():
    assert OPERA().num_beams == 5 and OPERA().sigma == 50 and OPERA().threshold == 15 and OPERA().candidates == 5
    with pytest.raises(ValueError, match="OPERA has 3 mistakes: sigma must be > 0, got 0; candidates must be an "
                                         "integer >= 2, got 1; threshold must be an integer >= 1 or None, got 0"):
        OPERA(candidates=1, sigma=0, threshold=0)
    with pytest.raises(ValueError, match="OPERA layers \\[9\\] are outside the model's 4 decoder layers"):
        vlmfix.attach(make_model("llava"), tokenizer(), OPERA(layers=[9]))


def test_preset_and_registry():
    from vlmfix.methods import build, parse_methods

    assert build("opera") == OPERA()
    assert parse_methods("opera:penalty-only") == [OPERA(threshold=None)]


@pytest.mark.smollm2
def test_cli_generate_runs_opera(tmp_path, capsys):
    from vlmfix.cli.main import main

    assert main(["generate", "--methods", "opera", "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "opera" in out


def test_lmms_eval_runs_opera_and_logs_its_record():
    logs = lmms_eval_logs("opera")
    assert [log["opera_beams"] for log in logs] == [5, 5] and all("opera_rollbacks" in log for log in logs)


@pytest.mark.smollm2
def test_equals_the_reference_on_smollm2_llava(smol_one):
    """The paper's defaults (5 beams, sigma 50, alpha 1, the last layer) on the real test-bed: the best beam's
    tokens (2 steps: too few for a roll-back at the default threshold 15, none in either)."""
    model, processor, one = smol_one
    config = model.generation_config
    eos, config.eos_token_id = config.eos_token_id, None  # the reference runs every beam to the end
    try:
        last = model.config.text_config.num_hidden_layers - 1
        ref_tokens, ref_rollbacks = opera_reference(model, one, [last], steps=2)
        with vlmfix.attach(model, processor, OPERA()) as fixed:
            tokens = generated(fixed, one, steps=2)
            record = fixed.last_state.record(OPERA)
    finally:
        config.eos_token_id = eos
    assert tokens[0].tolist() == ref_tokens
    assert record.rollbacks[0] == ref_rollbacks == []
    assert record.acted() == [True] and record.steps[0] > 0 and record.row(0)["penalty_max"] > 0
