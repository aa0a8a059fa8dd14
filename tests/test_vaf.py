"""VAF (vlmfix.methods.vaf) against the slow full-eager reference (tests/reference_vaf.py) on the tiny models: tokens
and log-probabilities, the neutral setting, batches, the system-prompt layout, compiled generation, compositions,
the CLI and lmms-eval."""

import pytest
import torch

import vlmfix
from reference_vaf import vaf_generate_reference
from test_pai import AFTER, BEFORE, greedy
from tiny import VEND, VSTART, make_batch, make_model, tokenizer
from vlmfix.methods.vaf import VAF, middle_layers

torch.set_num_threads(2)
STEPS = 5


def log_probs(scores):
    return torch.log_softmax(scores, -1)


@pytest.mark.parametrize("alpha,beta,layers", [(0.15, 0.05, None), (2.0, 0.6, [1, 2, 3]), (0.0, 0.9, [0, 2])])
def test_equals_the_reference(family_model, alpha, beta, layers):
    family, model = family_model
    batch = make_batch(family, model, [(BEFORE, (60, 90), AFTER)])
    used = middle_layers(4) if layers is None else layers
    ref_tokens, ref_scores = vaf_generate_reference(model, batch, used, alpha, beta, STEPS, markers=(VSTART, VEND))
    with vlmfix.attach(model, tokenizer(), VAF(alpha=alpha, beta=beta, layers=layers)) as fixed:
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(VAF)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert torch.allclose(log_probs(scores[0]), ref_scores, atol=1e-4), (log_probs(scores[0]) - ref_scores).abs().max()
    assert record.system == [len(BEFORE)] and record.acted() == [True]


def test_the_paper_layers_map_to_the_depth():
    assert list(middle_layers(32)) == [9, 10, 11, 12, 13, 14]
    assert list(middle_layers(4)) == [1] and list(middle_layers(1)) == [0]
    assert list(middle_layers(24)) == [7, 8, 9, 10] and list(middle_layers(40)) == list(range(11, 19))


def test_neutral_setting_equals_plain_generate(family_model):
    family, model = family_model
    batch = make_batch(family, model, [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18])])
    plain_tokens, plain_scores = greedy(model, batch)
    with vlmfix.attach(model, tokenizer(), VAF(alpha=0.0, beta=0.0)) as fixed:
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(VAF)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(scores, plain_scores)
    assert record.acted() == [False, False] and "alpha = 0 and beta = 0" in record.notes(0)[0]


def test_batch_rows_equal_rows_alone(family_model):
    """Left padding, mixed lengths, a row without an image, a row with no text before its image (nothing to
    suppress: its record says so)."""
    family, model = family_model
    prompts = [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18, 19, 20]),
               ([1, 12], None, [13, 14, 15, 16]), ([], (40, 70), [13, 14])]
    batch = make_batch(family, model, prompts)
    assert (batch["attention_mask"] == 0).any()
    plain_text, plain_text_scores = greedy(model, make_batch(family, model, [prompts[2]]))
    with vlmfix.attach(model, tokenizer(), VAF(alpha=1.0, beta=0.5, layers=[1, 2])) as fixed:
        tokens, scores = greedy(fixed, batch)
        record = fixed.last_state.record(VAF)
        for r, p in enumerate(prompts):
            alone_tokens, alone_scores = greedy(fixed, make_batch(family, model, [p]))
            assert tokens[r].tolist() == alone_tokens[0].tolist()
            assert torch.allclose(log_probs(scores[r]), log_probs(alone_scores[0]), atol=1e-4)
    assert record.system == [3, 2, 0, 0]
    assert record.acted() == [True, True, False, True]
    assert "text-only" in record.notes(2)[0] and "no system-prompt tokens" in record.notes(3)[0]
    assert record.row(3) == {"image": True, "alpha": 1.0, "beta": 0.0, "system": 0}
    assert tokens[2].tolist() == plain_text[0].tolist()
    assert torch.allclose(scores[2], plain_text_scores[0], atol=1e-5)


def test_compiled_static_cache_generation_equals_eager():
    """VAF's decoding steps read tensors only: compiled static-cache generation gives the eager tokens and logits,
    and a second batch of the same shapes does not recompile."""
    from torch._dynamo.utils import counters

    from test_runtime import compile_config, compile_prompts, generate, other_batch

    model = make_model("llava")
    batch = make_batch("llava", model, compile_prompts("llava"))
    batch2 = other_batch("llava", model, compile_prompts("llava"))
    plain = generate(model, batch, cache_implementation="static", disable_compile=True)
    with vlmfix.attach(model, None, VAF(alpha=3.0, beta=0.5, layers=[1, 2])) as fixed:
        static = generate(fixed, batch, cache_implementation="static", disable_compile=True)
        static2 = generate(fixed, batch2, cache_implementation="static", disable_compile=True)
        counters.clear()
        compiled = generate(fixed, batch, cache_implementation="static", compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] > 0, "the decoding steps were not compiled"
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled2 = generate(fixed, batch2, cache_implementation="static", compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] == graphs, "the second compiled call recompiled"
    assert (static[1][1:] - plain[1][1:]).abs().max() > 1e-3, "VAF must change the decoding steps"
    assert torch.equal(compiled[0], static[0]) and torch.allclose(compiled[1], static[1], atol=1e-4, rtol=0)
    assert torch.equal(compiled2[0], static2[0]) and torch.allclose(compiled2[1], static2[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("other", ["var", "gift", "fastv-mask", "fastv-inplace"])
def test_composes(other):
    """Beside VAR, GIFT or FastV (mask or in place) VAF still acts: the pair differs from the other method alone,
    and VAF's record says it acted (in-place pruning: VAF still names its columns by prompt position)."""
    model = make_model("llava")
    batch = make_batch("llava", model, [(BEFORE, (60, 90), AFTER), ([1, 12], (40, 70), [13, 14, 15, 16])])
    config = {"var": vlmfix.VAR(tau=1.0, p=0.9), "gift": vlmfix.GIFT(),
              "fastv-mask": vlmfix.FastVPrune(layer=1, keep=8, form="mask"),
              "fastv-inplace": vlmfix.FastVPrune(layer=1, keep=8)}[other]
    with vlmfix.attach(model, tokenizer(), [config]) as fixed:
        alone = greedy(fixed, batch)[1]
    with vlmfix.attach(model, tokenizer(), [VAF(alpha=2.0, beta=0.5, layers=[2, 3]), config]) as fixed:
        both = greedy(fixed, batch)[1]
        assert fixed.last_state.record(VAF).acted() == [True, True]
    assert (both - alone).abs().max() > 1e-3


def test_config_checks():
    with pytest.raises(ValueError, match="alpha"):
        VAF(alpha=-0.1)
    with pytest.raises(ValueError, match="2 mistakes"):
        VAF(beta=1.5, layers=[])
    model = make_model("llava")
    with pytest.raises(ValueError, match="outside"):
        vlmfix.attach(model, tokenizer(), VAF(layers=[7]))
    with vlmfix.attach(model, tokenizer(), VAF()) as fixed:
        assert fixed.runtimes[0].layers == (1,)
    assert vlmfix.methods.registry.build("vaf") == VAF()


@pytest.mark.smollm2
def test_cli_generate_runs_the_decoding_baselines(tmp_path, capsys):
    """`vlmfix generate --methods m3id vaf only`: each set through the registry (one model load), VAF's heat map."""
    from vlmfix.cli.main import main

    assert main(["generate", "--methods", "m3id", "vaf", "only", "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.lower()
    assert all(name in out for name in ("m3id", "vaf", "only"))
    assert list(tmp_path.rglob("vaf_added.png"))


@pytest.mark.smollm2
def test_equals_the_reference_on_smollm2_llava(smol_one):
    """The paper's defaults on the real test-bed: the middle layers of SmolLM2's 30, the chat header before the
    image as the system prompt (no vision markers in LLaVA)."""
    model, processor, one = smol_one
    used = middle_layers(model.config.text_config.num_hidden_layers)
    ref_tokens, ref_scores = vaf_generate_reference(model, one, used, 0.15, 0.05, 2)
    with vlmfix.attach(model, processor, VAF()) as fixed:
        tokens, scores = greedy(fixed, one, steps=2)
        record = fixed.last_state.record(VAF)
    assert tokens[0].tolist() == ref_tokens.tolist()
    assert torch.allclose(log_probs(scores[0]), ref_scores, atol=2e-3), (log_probs(scores[0]) - ref_scores).abs().max()
    image_at = one["input_ids"][0].tolist().index(model.config.image_token_id)
    assert record.system == [image_at] and record.acted() == [True]
