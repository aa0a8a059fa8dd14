"""Sink dimensions (massive activations) and visual sink detection."""

from __future__ import annotations

import math

import pytest
import torch

import vlmfix
from vlmfix.methods import SinkShare
from vlmfix.core.sinks import DEFAULT_PROMPTS, check_tau, massive_dims, scaled_tau, sink_scores
from vlmfix.core.state import above_threshold

OTHER_PROMPTS = (
    "My grandmother grew tomatoes and beans in a small garden behind the house.",
    "The committee will announce the results of the election on Monday morning.",
    "Light travels faster than sound, which is why we see lightning before thunder.",
    "She opened the window, and a cold wind filled the quiet room.",
    "Tigers are the largest cats, and most of them live in the forests of Asia.",
    "He fixed the bicycle chain with a small tool and rode to school.",
)


def test_sink_score_formula():
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # row 0: rms = sqrt((9 + 16) / 4) = 2.5 -> |x_hat| = (1.2, 1.6, 0, 0)
    rms0 = math.sqrt(25 / 4 + 1e-6)
    assert torch.allclose(sink_scores(x, [0]), torch.tensor([3 / rms0, 1.0]), atol=1e-6)
    assert torch.allclose(sink_scores(x, [0, 1]), torch.tensor([4 / rms0, 1.0]), atol=1e-6)
    assert torch.equal(sink_scores(x, []), torch.zeros(2))
    # the ceiling: one dimension carrying everything gives sqrt(d)
    one = torch.zeros(576)
    one[7] = 50.0
    assert abs(float(sink_scores(one, [7])) - 24.0) < 1e-4


def test_massive_dims_criterion():
    h = torch.ones(5, 8) * 0.5  # median 0.5 -> limit max(100, 500) = 500
    h[0, 3], h[0, 5], h[1, 2] = 900.0, 400.0, 5000.0  # dim 5 fails the ratio; token 1 is not the first
    assert massive_dims(h) == {3: 900.0}
    assert massive_dims(h, ratio=100.0) == {3: 900.0, 5: 400.0}


def test_tau_rules():
    assert scaled_tau(4096) == 20.0 and abs(scaled_tau(576) - 7.5) < 1e-12
    assert check_tau("scaled", 576) == scaled_tau(576)
    assert check_tau("bos:0.8") == "bos:0.8" and check_tau(3) == 3.0
    for bad in (0, -2.0, "bos:0", "bos:2", "nope"):
        with pytest.raises(ValueError, match="tau"):
            check_tau(bad, 576)
    phi = torch.tensor([[10.0, 9.0, 4.0], [0.0, 20.0, 16.0]])
    assert above_threshold(phi, 8.0, torch.tensor([0, 1])).tolist() == [[True, True, False], [False, True, True]]
    # relative: 0.85 x phi of each row's first real token (row 1 is left-padded by one)
    assert above_threshold(phi, "bos:0.85", torch.tensor([0, 1])).tolist() == [[True, True, False],
                                                                                [False, True, False]]


@pytest.mark.smollm2
def test_find_sink_dims_stable_on_smollm2(smollm2):
    lm, tok = smollm2
    assert not set(DEFAULT_PROMPTS) & set(OTHER_PROMPTS)
    dims = vlmfix.find_sink_dims(lm, tok)
    assert dims and dims == vlmfix.find_sink_dims(lm, tok, OTHER_PROMPTS)


@pytest.mark.smollm2
def test_sink_dims_are_massive_in_middle_layers(smollm2):
    lm, tok = smollm2
    dims = vlmfix.find_sink_dims(lm, tok)
    n = lm.config.num_hidden_layers
    ids = tok(OTHER_PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    massive_layers = 0
    for layer in range(n // 4, 3 * n // 4):
        h = hidden[layer][0].abs()
        if all(h[0, d] > 100 and h[0, d] > 1000 * h.median() for d in dims):
            massive_layers += 1
    assert massive_layers > (3 * n // 4 - n // 4) / 2


@pytest.mark.smollm2
def test_visual_sinks_detected_where_planted(smol_llava):
    """Known sinks (tests/planted.py): detection finds exactly the planted image tokens, per row."""
    from PIL import Image
    from planted import TAU, planted_sinks

    from vlmfix.demo.assemble import prompt_for

    model, processor = smol_llava
    planted = {0: [0, 5, 300], 1: [17, 575]}  # image-token indices per batch row
    texts = [prompt_for("What is this?"), prompt_for("Describe all the objects you can see here, please.")]
    images = [Image.new("RGB", (80, 60), "blue"), Image.new("RGB", (50, 90), "green")]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with planted_sinks(model, processor.tokenizer, planted), vlmfix.attach(model, processor, SinkShare(), tau=TAU) as fx:
        with torch.no_grad():
            fx(**inputs)
        state = fx.last_state
    assert state.rows[0].pad_left > 0  # the shorter prompt is left-padded
    n_layers = model.config.text_config.num_hidden_layers
    for layer in range(2, n_layers - 2):
        for row, idx in planted.items():
            expected = state.rows[row].image_positions[idx]
            assert state.visual_sinks(layer, row).tolist() == expected.tolist(), f"layer {layer} row {row}"
        share = state.record(SinkShare).shares[layer]
        assert bool((share > 0).all()) and bool((share <= 1).all())
    assert len(state.visual_sinks(0, 0)) == 0 and len(state.visual_sinks(1, 0)) == 0
    # the first token is a (text) sink in the middle layers, as BOS is
    first = state.rows[0].pad_left
    assert first in state.sinks(n_layers // 2, 0).tolist()
