"""PAI (vlmfix.methods.pai) against the slow reference (tests/reference_pai.py) on the tiny models, and the
contrast branch it runs (vlmfix.core.contrast)."""

import pytest
import torch

import vlmfix
from reference_pai import pai_generate_reference
from tiny import IMAGE, VEND, VSTART, make_batch, make_model, tokenizer
from vlmfix.methods.pai import PAI
from probes import lmms_eval_logs

torch.set_num_threads(2)
STEPS = 5
BEFORE, AFTER = [1, 5, 6], [7, 8, 9, 10, 11]


def greedy(model, inputs, steps=STEPS, **kw):
    """generate()'s greedy tokens and scores (B, steps, V) (EOS never stops it)."""
    config = (model.model if isinstance(model, vlmfix.Attached) else model).generation_config
    eos, config.eos_token_id = config.eos_token_id, None
    try:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True, **kw)
    finally:
        config.eos_token_id = eos
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()


def assert_scores(ours, ref, atol=1e-4):
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], atol=atol), (ours[fin] - ref[fin]).abs().max()


@pytest.mark.parametrize("alpha,gamma", [(0.2, 1.1), (0.5, 1.5), (0.0, 1.3), (0.8, 1.0)])
def test_equals_the_reference(family_model, alpha, gamma):
    family, model = family_model
    with_image = make_batch(family, model, [(BEFORE, (60, 90), AFTER)])
    without = make_batch(family, model, [(BEFORE, None, AFTER)])
    layers = range(2, model.config.text_config.num_hidden_layers)
    ref_tokens, ref_scores = pai_generate_reference(model, with_image, without, layers, alpha, gamma, 0.1, STEPS)
    with vlmfix.attach(model, tokenizer(), PAI(alpha=alpha, gamma=gamma, beta=0.1)) as fixed:
        tokens, scores = greedy(fixed, with_image)
    assert tokens[0].tolist() == ref_tokens.tolist()
    if gamma == 1:  # no contrast branch: generate sees the raw logits (no cut); the reference's log-probabilities
        kept = torch.isfinite(ref_scores)
        assert torch.allclose(torch.log_softmax(scores[0], -1)[kept], ref_scores[kept], atol=1e-4)
    else:
        assert_scores(scores[0], ref_scores)


def test_neutral_settings_equal_plain_generate(family_model):
    family, model = family_model
    batch = make_batch(family, model, [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18])])
    plain_tokens, plain_scores = greedy(model, batch)
    with vlmfix.attach(model, tokenizer(), PAI(alpha=0.0, gamma=1.0)) as fixed:
        tokens, scores = greedy(fixed, batch)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(scores, plain_scores)


def test_batch_rows_equal_rows_alone(family_model):
    family, model = family_model
    prompts = [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18, 19, 20])]
    batch = make_batch(family, model, prompts)
    assert (batch["attention_mask"] == 0).any()  # left padding
    with vlmfix.attach(model, tokenizer(), PAI(alpha=0.5, gamma=1.5)) as fixed:
        tokens, scores = greedy(fixed, batch)
        for r, p in enumerate(prompts):
            alone_tokens, alone_scores = greedy(fixed, make_batch(family, model, [p]))
            assert tokens[r].tolist() == alone_tokens[0].tolist()
            assert_scores(scores[r], alone_scores[0], atol=1e-4)


def test_a_row_without_an_image_is_left_alone(family_model):
    family, model = family_model
    prompts = [(BEFORE, (60, 90), AFTER), ([1, 12], None, [13, 14, 15, 16])]
    batch = make_batch(family, model, prompts)
    plain_tokens, plain_scores = greedy(model, make_batch(family, model, [prompts[1]]))
    with vlmfix.attach(model, tokenizer(), PAI(alpha=0.5, gamma=1.5)) as fixed:
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(PAI)
    assert tokens[1].tolist() == plain_tokens[0].tolist()
    assert torch.allclose(scores[1], plain_scores[0], atol=1e-5)
    assert record.acted() == [True, False]
    assert record.notes(1) and not record.notes(0)
    assert record.to_json()["rows"][1]["image"] is False


def test_branch_rows_hold_no_image_and_generate_sees_b_rows():
    model = make_model("llava")
    batch = make_batch("llava", model, [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14])])
    seen = []

    def inner(module, args, kwargs):  # the language model runs after attach's pre-hook expanded the batch
        seen.append(kwargs.get("attention_mask").shape[0] if kwargs.get("attention_mask") is not None else None)

    ids_seen = []
    hook = model.model.language_model.register_forward_pre_hook(inner, with_kwargs=True)
    probe = model.model.register_forward_pre_hook(lambda m, a, kw: ids_seen.append(kw["input_ids"].clone()),
                                                  with_kwargs=True)
    try:
        with vlmfix.attach(model, tokenizer(), PAI()) as fixed:
            tokens, _ = greedy(fixed, batch, steps=3)
            state = fixed.last_state
    finally:
        hook.remove()
        probe.remove()
    assert tokens.shape == (2, 3)
    assert seen == [4, 4, 4]
    prefill = ids_seen[0]
    assert prefill.shape[0] == 4
    assert not ({IMAGE, VSTART, VEND} & set(prefill[2:].flatten().tolist()))
    assert state.batch_size == 2 and state.branch_rows == 2


def test_static_cache_gives_the_dynamic_caches_tokens():
    """The image-free contrast rows in a static cache (generate's 4-D masks expanded for them): the dynamic cache's
    tokens and logits."""
    model = make_model("llava")
    batch = make_batch("llava", model, [(BEFORE, (60, 90), AFTER), ([1, 12], None, [13, 14, 15, 16])])
    with vlmfix.attach(model, tokenizer(), PAI(alpha=0.5, gamma=1.5)) as fixed:
        tokens, scores = greedy(fixed, batch)
        static_tokens, static_scores = greedy(fixed, batch, cache_implementation="static", disable_compile=True)
    assert torch.equal(tokens, static_tokens)
    assert_scores(static_scores, scores)


def test_config_checks():
    with pytest.raises(ValueError, match="gamma"):
        PAI(gamma=0.5)
    with pytest.raises(ValueError, match="2 mistakes"):
        PAI(alpha=-1, beta=2)
    with pytest.raises(ValueError, match="start_layer"):
        PAI(start_layer=-1)
    model = make_model("llava")
    with pytest.raises(ValueError, match="outside"):
        vlmfix.attach(model, tokenizer(), PAI(layers=[9]))
    with vlmfix.attach(model, tokenizer(), PAI()) as fixed:
        assert fixed.runtimes[0].layers == (2, 3)
    assert vlmfix.methods.registry.build("pai") == PAI()


def test_compiled_static_cache_generation_equals_eager_without_contrast():
    """The attention intervention alone (gamma = 1: no contrast branch) runs inside compiled static-cache
    generation: the decoding steps' bias reads tensors only, and the tokens and logits are the eager ones."""
    from torch._dynamo.utils import counters

    from test_runtime import compile_config, compile_prompts, generate, other_batch
    from tiny import make_batch, make_model

    model = make_model("llava")
    batch = make_batch("llava", model, compile_prompts("llava"))
    batch2 = other_batch("llava", model, compile_prompts("llava"))
    plain = generate(model, batch, cache_implementation="static", disable_compile=True)
    with vlmfix.attach(model, None, PAI(alpha=5.0, gamma=1.0)) as fixed:
        static = generate(fixed, batch, cache_implementation="static", disable_compile=True)
        static2 = generate(fixed, batch2, cache_implementation="static", disable_compile=True)
        counters.clear()
        compiled = generate(fixed, batch, cache_implementation="static", compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] > 0, "the decoding steps were not compiled"
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled2 = generate(fixed, batch2, cache_implementation="static", compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] == graphs, "the second compiled call recompiled"
    assert (static[1][1:] - plain[1][1:]).abs().max() > 1e-3, "PAI must change the decoding steps"
    assert torch.equal(compiled[0], static[0]) and torch.allclose(compiled[1], static[1], atol=1e-4, rtol=0)
    assert torch.equal(compiled2[0], static2[0]) and torch.allclose(compiled2[1], static2[1], atol=1e-4, rtol=0)


def test_lmms_eval_runs_pai_and_logs_its_record():
    """lmms-eval's `methods=pai+var` attaches PAI beside VAR, generates a batch of two with the contrast rows, and
    each request's sample log holds PAI's record of its row (the protocol's `Record.row`)."""
    logs = lmms_eval_logs("pai+var")
    assert [log["pai_image"] for log in logs] == [True, True] and all(log["pai_gamma"] == 1.1 for log in logs)
    assert all("var_moved" in log for log in logs)
