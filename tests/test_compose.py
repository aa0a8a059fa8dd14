"""Pruning composed with VAR and GIFT: the in-place form (tokens removed, `SlotView` translating) gives
what the mask form (nothing moves) gives; pruned tokens are neither sinks nor attended; keep-all is
VAR alone."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from probes import observed
from tiny import PAD, make_batch, make_model, prompts_two, tokenizer

import vlmfix
from vlmfix.methods.prune import FastVRuntime, kept_tokens, prune_record

GEN = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)
VAR_TINY = dict(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3))  # makes VAR act on the tiny models (see test_var)


def gift_prompts() -> list:
    """Two prompts whose images give every family at least 24 image tokens (Qwen2-VL: an 8 x 12 grid)."""
    return [([1, 5, 6], (112, 168), [7, 8, 9, 10, 11]), ([1, 12], (168, 112), [13, 14, 15, 16, 17, 18, 19, 20])]


def run(model, batch, methods, processor=None, **attach_kw):
    """(tokens, logits, state) of generate with `methods` attached (with the tiny tokenizer unless a processor is given)."""
    with vlmfix.attach(model, tokenizer() if processor is None else processor, methods, **attach_kw) as fixed:
        out = fixed.generate(**batch, **GEN)
        state = fixed.last_state
    return out.sequences, torch.stack(out.logits), state


def kept_lists(state):
    return [[k.tolist() for k in stage.kept] for stage in prune_record(state).stages]


def assert_forms_agree(model, batch, make, processor=None, **attach_kw):
    """make(form) -> the methods to attach; both forms choose the same tokens and give the same logits."""
    a = run(model, batch, make("inplace"), processor, **attach_kw)
    b = run(model, batch, make("mask"), processor, **attach_kw)
    assert kept_lists(a[2]) == kept_lists(b[2]), "the two forms chose different tokens"
    assert torch.equal(a[0], b[0]), "greedy tokens differ"
    assert torch.allclose(a[1], b[1], atol=1e-4, rtol=0), f"logits differ by {(a[1] - b[1]).abs().max()}"
    return a, b


def moved(state) -> float:
    return sum(sum(v["moved"]) for v in vlmfix.VAR.summary(state).values())


# -- VAR ---------------------------------------------------------------------------------------------
def test_var_with_fastv_forms_agree(family, model):
    batch = make_batch(family, model, prompts_two())
    make = lambda form: [vlmfix.VAR(**VAR_TINY), vlmfix.FastVPrune(layer=2, keep=3, form=form)]  # noqa: E731
    a, b = assert_forms_agree(model, batch, make, sink_dims=[0, 1])
    assert moved(a[2]) > 0 and abs(moved(a[2]) - moved(b[2])) < 1e-4, "VAR must act, the same in both forms"
    for state in (a[2], b[2]):
        for layer in (2, 3):
            for row in state.rows:
                sinks = set(state.visual_sinks(layer, row.index).tolist())
                assert sinks <= set(kept_tokens(state, row.index).tolist()), "a pruned token is still a sink"
    prune_alone = run(model, batch, vlmfix.FastVPrune(layer=2, keep=3))
    assert not torch.allclose(a[1], prune_alone[1], atol=1e-4), "VAR changed nothing on the pruned model"


def test_var_with_staged_forms_agree(family, model):
    batch = make_batch(family, model, prompts_two())
    make = lambda form: [vlmfix.VAR(**VAR_TINY),  # noqa: E731
                         vlmfix.StagedPrune(layers=(1, 3), keep_ratios=(0.6, 0.3), form=form)]
    a, _ = assert_forms_agree(model, batch, make, sink_dims=[0, 1])
    assert len(prune_record(a[2]).stages) == 2 and moved(a[2]) > 0


def test_keep_all_with_var_is_var_alone(family, model):
    batch = make_batch(family, model, prompts_two())
    ref = run(model, batch, vlmfix.VAR(**VAR_TINY), sink_dims=[0, 1])
    for pruner in (vlmfix.FastVPrune(keep=10_000), vlmfix.StagedPrune(layers=(1, 2), keep_ratios=(1.0, 0.999999))):
        got = run(model, batch, [vlmfix.VAR(**VAR_TINY), pruner], sink_dims=[0, 1])
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@dataclass
class KeepAllActive(vlmfix.FastVPrune):
    """FastV that keeps every image token but still runs its in-place machinery (slot maps, views)."""

    keep: int | None = 10_000

    def bind(self, target):
        runtime = super().bind(target)
        runtime.__class__ = _AlwaysActive
        return runtime


class _AlwaysActive(FastVRuntime):
    def begin(self, state):
        call = super().begin(state)
        call.record.active = True
        return call


def test_keep_all_through_the_slot_view_is_var_alone(family, model):
    batch = make_batch(family, model, prompts_two())
    ref = run(model, batch, vlmfix.VAR(**VAR_TINY), sink_dims=[0, 1])
    got = run(model, batch, [vlmfix.VAR(**VAR_TINY), KeepAllActive(layer=2)], sink_dims=[0, 1])
    assert got[2].slot_maps and got[2].slot_maps[0].index is not None, "the in-place path must have run"
    assert torch.equal(got[0], ref[0])
    assert torch.allclose(got[1], ref[1], atol=1e-5, rtol=0), f"{(got[1] - ref[1]).abs().max()}"
    ours, theirs = vlmfix.VAR.summary(got[2]), vlmfix.VAR.summary(ref[2])
    assert ours.keys() == theirs.keys()
    for layer, v in ours.items():
        assert v["visual_sinks"] == theirs[layer]["visual_sinks"]
        assert v["image_centric"] == theirs[layer]["image_centric"]
        assert torch.allclose(torch.tensor(v["moved"]), torch.tensor(theirs[layer]["moved"]), atol=1e-4)


def test_pruner_scores_raw_attention_whatever_the_order(model, family):
    batch = make_batch(family, model, prompts_two())
    var, prune = vlmfix.VAR(**VAR_TINY), vlmfix.FastVPrune(layer=3, keep=3)  # VAR acts at layer 2, the scoring layer
    first = run(model, batch, [prune, var], sink_dims=[0, 1])
    second = run(model, batch, [var, prune], sink_dims=[0, 1])
    alone = run(model, batch, prune)
    assert kept_lists(first[2]) == kept_lists(second[2]) == kept_lists(alone[2])
    assert torch.equal(first[1], second[1])
    with vlmfix.attach(model, None, [var, prune], sink_dims=[0, 1]) as fixed:
        assert fixed.runtimes[0].config is prune


# -- GIFT --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [
    dict(saliency_layers=(1,), boost_layers=(2, 3)),  # saliency before the pruning layer
    dict(saliency_layers=(2,), boost_layers=(3,)),  # saliency on the pruned sequence
    dict(saliency_layers=(2,), boost_layers=(1, 2, 3)),  # a pre-pass (unpruned) and boosts on both sides
])
def test_gift_with_fastv_forms_agree(family, model, layers):
    batch = make_batch(family, model, gift_prompts())
    make = lambda form: [vlmfix.GIFT(alpha=3.0, **layers), vlmfix.FastVPrune(layer=2, keep=16, form=form)]  # noqa: E731
    a, b = assert_forms_agree(model, batch, make)
    maps = [(vlmfix.GIFT.saliency(a[2], r), vlmfix.GIFT.saliency(b[2], r)) for r in range(2)]
    assert any(x is not None and float(x.max()) == 1.0 for x, _ in maps), "GIFT must find a real saliency map"
    for x, y in maps:
        assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, atol=1e-6))
    prune_alone = run(model, batch, vlmfix.FastVPrune(layer=2, keep=16))
    assert not torch.allclose(a[1], prune_alone[1], atol=1e-4), "GIFT changed nothing on the pruned model"


@pytest.mark.parametrize("form", ["inplace", "mask"])
def test_gift_gaze_shift_skips_pruned_tokens(form):
    """The question's first token after the image follows the last image token; when pruning removed
    it, the gaze shift is taken against the nearest present token."""
    model = make_model("llava")
    batch = make_batch("llava", model, gift_prompts())
    gift = observed(vlmfix.GIFT)(alpha=3.0, saliency_layers=(2,), boost_layers=(3,))
    _, _, state = run(model, batch, [gift, vlmfix.FastVPrune(layer=2, keep=8, form=form)])
    dropped_last = 0
    for row in state.rows:
        last = int(row.image_positions[-1])
        start = int(row.query_positions[row.query_positions > last][0])
        kept = kept_tokens(state, row.index).tolist()
        expected = last if last in kept else kept[-1]
        assert state.previous_token(2, row.index, start) == expected
        assert state.previous_token(1, row.index, start) == start - 1  # before pruning: the plain predecessor
        seen = [pos for block, pos, *_ in gift.seen if (block.phase.value, block.layer) == ("prefill", 2)]
        assert expected in seen[-1]
        dropped_last += last not in kept
    assert dropped_last, "the construction must prune the last image token of some row"


# -- SmolLM2 LLaVA with planted visual sinks -----------------------------------------------------------
@pytest.mark.smollm2
def test_smol_llava_var_gift_fastv_forms_agree(smol_pair):
    from planted import TAU, planted_sinks

    model, processor, _, _, batch = smol_pair
    planted = {0: [0, 5, 70, 140], 1: [17, 143]}

    def make(form):
        return [vlmfix.VAR(tau=TAU), vlmfix.GIFT(), vlmfix.FastVPrune(layer=2, keep=32, debias=vlmfix.Debias(), form=form)]

    with planted_sinks(model, processor.tokenizer, planted):
        a, _ = assert_forms_agree(model, batch, make, processor)
    state = a[2]
    assert moved(state) > 0 and vlmfix.GIFT.saliency(state, 0) is not None
    for row in state.rows:
        image = row.image_positions
        kept = set(kept_tokens(state, row.index).tolist())
        planted_pos = {int(image[i]) for i in planted[row.index]}
        assert set(state.visual_sinks(10, row.index).tolist()) == planted_pos & kept
        assert planted_pos - kept, "the construction must prune some planted sink"
