"""Methods under autograd: with gradients enabled every method computes what it computes under no_grad,
nothing autograd needs is written in place, a gradient reaches the pixel values, and records never
require grad (issue 19)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import QUESTION, chat_after, make_batch, make_model, tokenizer

import vlmfix
from vlmfix.methods.prune import prune_record

VAR_TWO_LAYERS = vlmfix.VAR(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3))  # acts on the tiny models (test_var)
GIFT_TINY = vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))
FASTV_MASK = vlmfix.FastVPrune(layer=2, keep_ratio=0.5, form="mask")


def batch(model):
    return make_batch("llava", model, [([1, 5], (60, 90), chat_after(QUESTION)),
                                       ([1, 12, 13], (90, 60), chat_after(" What is the colour of the dog?"))])


def acted(state, method) -> bool:
    """Whether `method` changed something in the call of `state` (so the comparison means something)."""
    if isinstance(method, vlmfix.VAR):
        return sum(sum(v["moved"]) for v in vlmfix.VAR.summary(state).values()) > 0
    if isinstance(method, vlmfix.GIFT):
        return bool(state.record(vlmfix.GIFT).has_map.all())
    return prune_record(state).stages[0].budget[0] < len(state.rows[0].image_positions)


def detached(state) -> list[str]:
    """The names of record tensors that require grad (none should)."""
    found = [f"phi[{k}]" for k, v in state.phi.items() if v.requires_grad]
    for cls, names in ((vlmfix.VAR, ("visual", "pairs", "gain", "weight", "received")),
                       (vlmfix.GIFT, ("saliency_map", "has_map"))):
        if state.has_record(cls):
            rec = state.record(cls)
            found += [f"{cls.__name__}.{n}" for n in names if getattr(rec, n).requires_grad]
    if state.has_record(vlmfix.FastVPrune):
        found += ["FastVPrune.scores" for s in prune_record(state).stages for t in s.scores if t.requires_grad]
    return found


@pytest.mark.parametrize("methods", [[VAR_TWO_LAYERS], [GIFT_TINY], [FASTV_MASK],
                                     [FASTV_MASK, VAR_TWO_LAYERS, GIFT_TINY]], ids=["var", "gift", "fastv-mask", "all-three"])
def test_gradient_of_a_logit_reaches_the_pixels(methods):
    model = make_model("llava")
    inputs = batch(model)
    with vlmfix.attach(model, tokenizer(), methods, sink_dims=[0, 1]) as fixed:
        with torch.no_grad():
            expected = fixed(**inputs).logits
        assert all(acted(fixed.last_state, m) for m in methods), "the construction must make every method act"
        pixels = inputs["pixel_values"].clone().requires_grad_(True)
        out = fixed(**{**inputs, "pixel_values": pixels})
        state = fixed.last_state
        assert torch.equal(out.logits.detach(), expected)  # the same values as under no_grad
        assert detached(state) == []
        out.logits[0, -1].max().backward()
    grad = pixels.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_records_read_without_a_grad_warning():
    """The README's sink block runs `fixed(**inputs)` with gradients on and reads the record as floats."""
    model = make_model("llava")
    inputs = batch(model)
    with vlmfix.attach(model, tokenizer(), [vlmfix.SinkShare(tau=1.2), VAR_TWO_LAYERS], sink_dims=[0, 1]) as fixed:
        fixed(**inputs)
        state = fixed.last_state
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            float(state.record(vlmfix.SinkShare).shares[2][0])
            float(state.phi[2][0, 0])
            vlmfix.VAR.summary(state)
            vlmfix.VAR.why_unchanged(state)
    assert not state.record(vlmfix.SinkShare).shares[2].requires_grad
