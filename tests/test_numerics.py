"""Numerical safety for every valid setting (issue 19): GIFT's boost at any alpha and beta, VAR with a
vanishing non-sink mass, and debiasing by a trend that (nearly) reaches zero."""

from __future__ import annotations

import math

import pytest
import torch
from probes import observed, on_edit
from reference_gift import Booster
from reference_var import Reference
from tiny import PAD, QUESTION, chat_after, make_batch, make_model, tokenizer

import vlmfix
from vlmfix.methods.base import Phase
from vlmfix.methods.debias import Trend, fit_trend

GEN = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)
LAYERS = dict(saliency_layers=(1,), boost_layers=(2, 3))


def two_questions(model):
    return make_batch("llava", model, [([1, 5], (60, 90), chat_after(QUESTION)),
                                       ([1, 12, 13], (90, 60), chat_after(" What is the colour of the dog?"))])


def boosted_rows(gift) -> list:
    """(batch row, heads' rows before (H, K), after) of each row an observed GIFT boosted: at each decoding
    step and at the prefill's last position (the batches here are left-padded: every row's last token)."""
    out = []
    for block, positions, before, after, prompt_len in gift.seen:
        if block.layer in gift.bound.boost_layers and (block.phase is Phase.DECODE or positions[-1] == prompt_len - 1):
            out += [(b, before[b, :, -1], after[b, :, -1]) for b in range(after.shape[0])]
    return out


@pytest.mark.parametrize("alpha, beta", [(89.0, 1.0), (300.0, 1.0), (600.0, 0.5), (40.0, 1e30)])
def test_gift_boost_equals_the_formula_in_float64(alpha, beta):
    """Each boosted row equals the spec's formula (M = e^(alpha S_hat), r, beta r, renormalised) computed in
    float64 on the same input row, also where M, r or beta r overflow fp32 (alpha >= 89, beta 1e30). (Where
    nothing overflows, test_gift compares GIFT with the reference end to end.)"""
    model = make_model("llava")
    inputs = two_questions(model)
    gift = observed(vlmfix.GIFT)(alpha=alpha, beta=beta, **LAYERS)
    with vlmfix.attach(model, tokenizer(), gift) as fixed:
        out = fixed.generate(**inputs, **GEN)
        state = fixed.last_state
    assert torch.isfinite(torch.stack(out.logits)).all()
    spans = [r.query_positions.tolist() for r in state.rows]
    maps = []
    for b in range(len(state.rows)):
        s_hat = vlmfix.GIFT.saliency(state, b).double()
        maps.append((s_hat, torch.exp(alpha * s_hat)))
    assert all(float(m[0].max()) == 1.0 for m in maps)  # real, non-flat maps
    ref = Booster(model, inputs, spans, maps, LAYERS["boost_layers"], beta)
    seen = boosted_rows(gift)
    assert len(seen) == 2 * 2 * GEN["max_new_tokens"]  # 2 rows, 2 boost layers, prefill + 2 steps
    for b, before, after in seen:
        expected = ref.boost(before.double(), b)
        assert torch.isfinite(after).all()
        assert torch.allclose(after.double(), expected, rtol=1e-4, atol=1e-7), (alpha, beta, b)
        assert torch.allclose(after.sum(-1), torch.ones(after.shape[0]), atol=1e-5)


@pytest.mark.parametrize("alpha, beta", [(5.0, 1.0), (30.0, 0.5), (2.0, 3.0)])
def test_gift_direct_and_log_evaluations_agree(alpha, beta, monkeypatch):
    """The boost's two evaluations (direct products in the paper's range, log factors beyond) give the same
    tokens and logits where both apply."""
    from vlmfix.methods import gift as gift_module

    model = make_model("llava")
    inputs = two_questions(model)
    results = []
    for direct_max in (gift_module.DIRECT_MAX, -1.0):  # -1: every setting takes the log factors
        monkeypatch.setattr(gift_module, "DIRECT_MAX", direct_max)
        with vlmfix.attach(model, tokenizer(), vlmfix.GIFT(alpha=alpha, beta=beta, **LAYERS)) as fixed:
            assert fixed.runtimes[0]._direct == (direct_max > 0)
            out = fixed.generate(**inputs, **GEN)
        results.append((out.sequences, torch.stack(out.logits)))
    plain = model.generate(**inputs, **GEN)
    assert not torch.allclose(torch.stack(plain.logits), results[0][1], atol=1e-3), "GIFT must act here"
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gift_logits_stay_finite_at_any_alpha(dtype):
    model = make_model("llava").to(dtype)
    inputs = two_questions(model)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    for alpha in (89.0, 1e30):  # 1e30: the largest alpha GIFT takes (ALPHA_MAX)
        with vlmfix.attach(model, tokenizer(), vlmfix.GIFT(alpha=alpha, **LAYERS)) as fixed:
            out = fixed.generate(**inputs, **GEN)
            assert bool(fixed.last_state.record(vlmfix.GIFT).has_map.all())
        assert torch.isfinite(torch.stack(out.logits)).all(), (dtype, alpha)


def test_gift_beta_zero_and_a_row_it_empties():
    """beta = 0 takes the query span's attention from the query heads; finite rows summing to 1, and a
    row whose whole attention lay on the span is left as it is (0 / 0 otherwise)."""
    model = make_model("llava")
    inputs = two_questions(model)
    gift = observed(vlmfix.GIFT)(alpha=3.0, beta=0.0, **LAYERS)
    with vlmfix.attach(model, tokenizer(), gift) as fixed:
        out = fixed.generate(**inputs, **GEN)
        call = fixed.last_state.calls[0]  # the call's boost matrices
        assert torch.isfinite(torch.stack(out.logits)).all()
        for _, _, after in boosted_rows(gift):
            assert torch.isfinite(after).all() and torch.allclose(after.sum(-1), torch.ones(len(after)), atol=1e-5)
        # every head's attention on the question of batch row 0: the query heads' rows cannot be renormalised
        question = fixed.last_state.rows[0].query_positions
        probs = torch.zeros(2, 4, 1, call._columns.shape[1])
        probs[:, :, :, question] = 1.0 / len(question)
        got = call._boosted(probs)
    assert torch.equal(got[0], probs[0])


def test_var_with_a_vanishing_non_sink_mass():
    """rho = m_min = 0 lets a pair with almost no attention on the visual non-sinks be image-centric: a
    non-sink mass at fp32's smallest normal numbers moves the sinks' attention (the ratio sum_S / sum_N is
    about 1e38, finite), one below them moves nothing (the ratio would overflow); rows stay finite and sum
    to 1, and the record stays finite."""
    model = make_model("llava")
    inputs = make_batch("llava", model, [([1, 5, 6], (30, 30), [7, 8, 9, 10, 11])])
    var = vlmfix.VAR(tau=1.2, rho=0.0, m_min=0.0, layers=(2, 3))
    planted = {}

    with vlmfix.attach(model, None, var, sink_dims=[0, 1]) as fixed:
        runtime = fixed.runtimes[0]

        def planting(edit, block, state, rows, probs):
            """Replace each row by one with all attention on the first visual sink, a little on the non-sinks."""
            sinks = state.sink_mask(block.layer, runtime.tau)[0]
            image = state.image_mask(probs.device)[0]
            visual, non = (sinks & image).nonzero().flatten(), (image & ~sinks).nonzero().flatten()
            assert len(visual) and len(non), "the construction needs visual sinks and non-sinks"
            probs = torch.zeros_like(probs)
            probs[..., visual[0]] = 1.0
            tiny = 3e-38 if block.layer == 2 else 1e-40  # per non-sink: a normal sum, or a subnormal one
            probs[..., non] = tiny / len(non)
            before = probs.clone()  # the edit works in place when no gradient is recorded
            out = edit(block, state, rows, probs)
            planted[(block.phase, block.layer)] = (before, out, set(sinks.nonzero().flatten().tolist()))
            return out

        on_edit(runtime, planting)
        out = fixed.generate(**inputs, **GEN)
        rec = fixed.last_state.record(vlmfix.VAR)
        assert torch.isfinite(rec.gain).all() and torch.isfinite(rec.received).all()
        image = fixed.last_state.rows[0].image_positions.tolist()
    assert torch.isfinite(torch.stack(out.logits)).all()
    ref = Reference(model, dims=[0, 1], tau=1.2, rho=0.0, p=var.p, m_min=0.0)
    for (phase, layer), (before, after, sinks) in planted.items():
        assert torch.isfinite(after).all() and torch.allclose(after.sum(-1), torch.ones(after.shape[:-1]), atol=1e-5)
        if layer == 3:  # below the smallest normal: nothing moves
            assert torch.equal(after, before)
            continue
        row = before[0, 0, -1]
        expected = ref.row(row.double(), image, sinks)
        assert torch.allclose(after[0, 0, -1].double(), expected, rtol=1e-4, atol=1e-6)
        assert float(after[0, 0, -1, image].sum()) > 0.5  # the sink's attention went to the non-sinks
    assert sum(vlmfix.VAR.summary(fixed.last_state)[2]["moved"]) > 0


def test_a_trend_that_reaches_zero_is_refused():
    x = torch.linspace(0, 1, 50, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot divide scores"):
        Trend("cubic", (0.2, -1.0, 0.0, 0.0))  # 0.2 - x: negative past x = 0.2
    with pytest.raises(ValueError, match="cannot divide scores"):
        Trend("cubic", (1.0, -4.0, 4.0, 0.0))  # (1 - 2x)^2: zero at x = 0.5, positive at both ends
    with pytest.raises(ValueError, match="cannot divide scores"):
        Trend("exp", (0.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        Trend("exp", (1.0, math.inf))
    with pytest.raises(ValueError, match="cannot divide scores"):  # a cubic fit to a step undershoots below 0
        fit_trend(0.01 + 0.9 * (x > 0.5).double(), "cubic")
    with pytest.raises(ValueError, match="trend: the cubic trend"):
        vlmfix.Debias(trend={"family": "cubic", "a": 0.2, "b": -1.0, "c": 0.0, "d": 0.0})


def test_debias_divides_by_a_tiny_trend_exactly():
    """A trend is a shape: mu = 1e-200 ranks as mu = 1 does (no clamp that flattens it), in finite numbers."""
    x = torch.linspace(0, 1, 40, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(40, generator=g, dtype=torch.float64) * torch.exp(3 * x)).float()
    tiny, _ = vlmfix.Debias(padding=False, trend={"family": "exp", "mu": 1e-200, "sigma": 3.0}).transform(scores, x)
    unit, _ = vlmfix.Debias(padding=False, trend={"family": "exp", "mu": 1.0, "sigma": 3.0}).transform(scores, x)
    assert torch.isfinite(tiny).all()
    assert torch.equal(torch.argsort(tiny), torch.argsort(unit))
    assert torch.allclose(tiny * 1e-200, unit, rtol=1e-12)


def test_debias_skips_a_one_sample_fit_that_is_not_positive():
    """Fitted to the scores being ranked, a cubic that dips below zero is no trend: the scores are ranked
    as they are (not divided by a clamped near-zero value, which put the smallest scores first)."""
    x = torch.linspace(0, 1, 40, dtype=torch.float64)
    scores = (0.01 + 0.9 * (x > 0.5).double()).float()
    out, _ = vlmfix.Debias(position="cubic", padding=False).transform(scores, x)
    assert torch.equal(out, scores.double())
