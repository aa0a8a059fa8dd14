"""VCD (vlmfix.methods.vcd) against the slow reference (tests/reference_vcd.py) on the tiny models: the noised
contrast branch of vlmfix.core.contrast."""

import math

import pytest
import torch

import vlmfix
from reference_vcd import abar, vcd_generate_reference
from tiny import make_batch, make_model, tokenizer
from vlmfix.core.attach import VlmfixError
from vlmfix.core.contrast import diffusion_noise
from vlmfix.methods.vcd import VCD

torch.set_num_threads(2)
STEPS = 4
WITH = ([1, 5, 6], (60, 90), [7, 8, 9, 10, 11])
OTHER = ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18])
TEXT = ([1, 12, 20], None, [13, 14, 15, 16])


def generate(model, inputs, steps=STEPS, **kw):
    """generate()'s tokens and the scores it saw (B, steps, V) (EOS never stops it); greedy unless told."""
    config = (model.model if isinstance(model, vlmfix.Attached) else model).generation_config
    eos, config.eos_token_id = config.eos_token_id, None
    kw.setdefault("do_sample", False)
    try:
        out = model.generate(**inputs, max_new_tokens=steps, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True, **kw)
    finally:
        config.eos_token_id = eos
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()


def assert_scores(ours, ref, atol=1e-4):
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], atol=atol), (ours[fin] - ref[fin]).abs().max()


@pytest.mark.parametrize("alpha,beta,step", [(1.0, 0.1, 500), (0.5, 0.0, 900)])
def test_equals_the_reference(family_model, alpha, beta, step):
    family, model = family_model
    if step == 900 and family != "llava":
        pytest.skip("other settings: once is enough (llava)")
    inputs = make_batch(family, model, [WITH])
    ref_tokens, ref_scores = vcd_generate_reference(model, inputs, alpha, beta, step, 3, STEPS)
    with vlmfix.attach(model, tokenizer(), VCD(alpha=alpha, beta=beta, noise_step=step, seed=3)) as fixed:
        tokens, scores = generate(fixed, inputs)
        record = fixed.last_state.record(VCD)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert_scores(scores[0], ref_scores)
    assert record.acted() == [True] and int(record.steps) == STEPS
    assert record.row(0)["noise_step"] == step


def test_sampling_draws_from_the_contrasted_distribution(family_model):
    """do_sample: generate samples softmax of the contrasted logits (no top-k / top-p): the reference's draws with
    the same torch seed."""
    family, model = family_model
    inputs = make_batch(family, model, [WITH])
    torch.manual_seed(7)
    ref_tokens, _ = vcd_generate_reference(model, inputs, 3.0, 0.6, 999, 0, STEPS, sample=True)
    with vlmfix.attach(model, tokenizer(), VCD(alpha=3.0, beta=0.6, noise_step=999)) as fixed:
        torch.manual_seed(7)
        tokens, _ = generate(fixed, inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(7)
    plain, _ = generate(model, inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert plain[0].tolist() != ref_tokens.tolist(), "the plain model's draws must differ (else this proves nothing)"


def test_neutral_alpha_is_the_plain_model(family_model):
    family, model = family_model
    batch = make_batch(family, model, [WITH, OTHER])
    plain_tokens, plain_scores = generate(model, batch)
    with vlmfix.attach(model, tokenizer(), VCD(alpha=0.0)) as fixed:
        tokens, scores = generate(fixed, batch)
        record = fixed.last_state.record(VCD)
        assert fixed.brancher is None
    assert torch.equal(tokens, plain_tokens) and torch.equal(scores, plain_scores)
    assert record.acted() == [False, False] and "alpha = 0" in record.notes(0)[0]


def test_batch_rows_equal_rows_alone_and_a_text_row_is_plain(family_model):
    """Left padding, mixed lengths and image sizes, a row without an image: each row as alone (its noise drawn from
    its own image); the text-only row is the plain model (VCD leaves it alone: no image to noise)."""
    family, model = family_model
    prompts = [WITH, TEXT, OTHER]
    batch = make_batch(family, model, prompts)
    assert (batch["attention_mask"] == 0).any()
    with vlmfix.attach(model, tokenizer(), VCD()) as fixed:
        tokens, scores = generate(fixed, batch)
        record = fixed.last_state.record(VCD)
        for r, p in enumerate(prompts):
            alone_tokens, alone_scores = generate(fixed, make_batch(family, model, [p]))
            assert tokens[r].tolist() == alone_tokens[0].tolist()
            assert_scores(scores[r], alone_scores[0])
    plain_tokens, plain_scores = generate(model, make_batch(family, model, [TEXT]))
    assert tokens[1].tolist() == plain_tokens[0].tolist()
    assert torch.allclose(scores[1], plain_scores[0], atol=1e-5)
    assert record.acted() == [True, False, True]
    assert "text-only" in record.notes(1)[0] and record.to_json()["rows"][1]["acted"] is False


def test_noise_follows_the_forward_diffusion_and_its_seed():
    """v_T = sqrt(abar_T) v + sqrt(1 - abar_T) eps with eps ~ N(0, I), abar_T the paper's product (reference_vcd);
    the same image and seed give the same noise, another seed other noise."""
    x = torch.rand(2, 3, 64, 64) * 4 - 2
    for step in (0, 500, 999):
        eps = (diffusion_noise(x, step, 0) - math.sqrt(abar(step)) * x) / math.sqrt(1 - abar(step))
        assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1) < 0.02
    assert torch.equal(diffusion_noise(x, 500, 0), diffusion_noise(x, 500, 0))
    assert torch.equal(diffusion_noise(x, 500, 0)[1], diffusion_noise(x[1:], 500, 0)[0])  # per image
    assert not torch.equal(diffusion_noise(x, 500, 0), diffusion_noise(x, 500, 1))


def test_config_checks_and_refusals():
    with pytest.raises(ValueError, match="alpha"):
        VCD(alpha=-1)
    with pytest.raises(ValueError, match="2 mistakes"):
        VCD(beta=2, noise_step=1000)
    with pytest.raises(ValueError, match="seed"):
        VCD(seed=-1)
    model = make_model("llava")
    with pytest.raises(VlmfixError, match="token pruning"):
        vlmfix.attach(model, tokenizer(), [VCD(), vlmfix.FastVPrune()])
    assert vlmfix.methods.registry.build("vcd") == VCD()
    assert getattr(model.base_model, "get_image_features").__self__ is model.base_model, "detach unwraps"


def test_composes_with_var_and_gift():
    """VAR and GIFT act on the real rows (the branch rows keep the model's attention): VCD + VAR + GIFT runs, both
    act, and each batch row is as alone."""
    model = make_model("llava")
    prompts = [WITH, OTHER]
    gift = vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))
    methods = [VCD(), vlmfix.VAR(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3)), gift]
    with vlmfix.attach(model, tokenizer(), methods, sink_dims=[0, 1]) as fixed:
        tokens, scores = generate(fixed, make_batch("llava", model, prompts))
        state = fixed.last_state
        assert any(state.record(vlmfix.VAR).acted()) and all(state.record(VCD).acted())
        for r, p in enumerate(prompts):
            alone, alone_scores = generate(fixed, make_batch("llava", model, [p]))
            assert tokens[r].tolist() == alone[0].tolist()
            assert_scores(scores[r], alone_scores[0])
    with vlmfix.attach(model, tokenizer(), [vlmfix.VAR(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3)), gift],
                       sink_dims=[0, 1]) as fixed:
        without, _ = generate(fixed, make_batch("llava", model, prompts))
    with vlmfix.attach(model, tokenizer(), VCD()) as fixed:
        vcd_only, _ = generate(fixed, make_batch("llava", model, prompts))
    assert not torch.equal(tokens, without) or not torch.equal(tokens, vcd_only)


@pytest.mark.smollm2
def test_equals_the_reference_on_smollm2_llava(smol_pair):
    model, processor, _, _, inputs = smol_pair
    one = {k: v[:1] for k, v in inputs.items()}
    one = {k: v[:, (inputs["attention_mask"][0] == 0).sum():] if k in ("input_ids", "attention_mask") else v
           for k, v in one.items()}
    ref_tokens, ref_scores = vcd_generate_reference(model, one, 1.0, 0.1, 500, 0, 2)
    with vlmfix.attach(model, processor, VCD()) as fixed:
        tokens, scores = generate(fixed, inputs, steps=2)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert_scores(scores[0], ref_scores, atol=2e-3)


@pytest.mark.smollm2
def test_cli_generate_runs_vcd(tmp_path, capsys):
    from vlmfix.cli.main import main

    assert main(["generate", "--methods", "vcd", "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vcd" in out.lower()


def test_compiled_static_cache_generation_equals_eager():
    """The noised rows in a static cache and compiled decoding steps (the branch rows' inputs and the contrast are
    tensor ops in attach's hooks, traced into the graph): the eager dynamic cache's tokens and logits, a text-only
    row included; the record counts the compiled steps too."""
    from torch._dynamo.utils import counters

    from test_runtime import compile_config

    torch._dynamo.reset()
    model = make_model("llava")
    batch = make_batch("llava", model, [WITH, TEXT, OTHER])
    with vlmfix.attach(model, tokenizer(), VCD(alpha=2.0)) as fixed:
        tokens, scores = generate(fixed, batch)
        static_tokens, static_scores = generate(fixed, batch, cache_implementation="static", disable_compile=True)
        counters.clear()
        compiled_tokens, compiled_scores = generate(fixed, batch, cache_implementation="static",
                                                    compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] > 0, "the decoding steps were not compiled"
        record = fixed.last_state.record(VCD)
    assert torch.equal(static_tokens, tokens) and torch.equal(compiled_tokens, tokens)
    assert_scores(static_scores, scores)
    assert_scores(compiled_scores, scores)
    assert int(record.steps) == STEPS
