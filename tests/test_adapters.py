"""Row layouts: image positions, grids, newline tokens, query spans, padding."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, IMAGE, PAD, VEND, make_batch, make_model, prompts_two

import vlmfix
from vlmfix.adapters import get_adapter


def layouts_both_ways(family):
    """Layouts seen by a plain forward (raw pixel inputs) and by generate (pre-encoded features)."""
    model = make_model(family)
    batch = make_batch(family, model, prompts_two())
    with vlmfix.attach(model) as fixed:
        model(**batch)
        forward_rows = fixed.last_state.rows
        model.generate(**batch, max_new_tokens=1, pad_token_id=PAD)
        generate_rows = fixed.last_state.rows
    return model, batch, forward_rows, generate_rows


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_generate_layouts_agree(family):
    _, batch, a, b = layouts_both_ways(family)
    for ra, rb in zip(a, b):
        assert ra.segments == rb.segments
        assert torch.equal(ra.image_positions, rb.image_positions)
        assert torch.equal(ra.newline_positions, rb.newline_positions)
        assert ra.query_span == rb.query_span and ra.pad_left == rb.pad_left


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_covers_exactly_the_image_tokens(family):
    _, batch, rows, _ = layouts_both_ways(family)
    for row in rows:
        ids = batch["input_ids"][row.index]
        assert torch.equal(row.image_positions, (ids == IMAGE).nonzero().flatten())
        grid = torch.cat([s.grid_positions().flatten() for s in row.segments] + [row.newline_positions])
        assert sorted(grid.tolist()) == row.image_positions.tolist()  # patches + newlines = all image tokens
        assert row.pad_left == int((batch["attention_mask"][row.index] == 0).sum())


def test_llava_grid_is_square_raster():
    _, batch, rows, _ = layouts_both_ways("llava")
    seg = rows[0].segments[0]
    assert (seg.rows, seg.cols) == (5, 5)
    start = int(rows[0].image_positions[0])
    assert seg.grid_positions()[1, 0] == start + 5 and seg.grid_positions()[4, 4] == start + 24


def test_qwen_grid_from_thw():
    # image 2 of prompts_two is 40 x 70 px -> 2 x 4 patches of 14 px -> merged 2 x 2 -> 1 x 2 tokens
    _, batch, rows, _ = layouts_both_ways("qwen2_vl")
    assert [(s.rows, s.cols) for s in rows[1].segments] == [(1, 2)]
    # the query span starts after the vision-end token? without a tokenizer: right after the image
    assert rows[1].query_span[0] == int(rows[1].image_positions[-1]) + 1
    assert batch["input_ids"][1, rows[1].query_span[0]] == VEND


def test_llava_next_newlines_are_the_newline_embedding():
    """The positions the adapter calls newline tokens hold exactly the model's image_newline vector."""
    model, batch, rows, _ = layouts_both_ways("llava_next")
    captured = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: captured.update(x=k["inputs_embeds"]), with_kwargs=True)
    model(**batch)
    handle.remove()
    newline = model.model.image_newline
    for row in rows:
        x = captured["x"][row.index]
        is_newline = (x == newline).all(-1)
        assert is_newline.nonzero().flatten().tolist() == row.newline_positions.tolist()
        assert len(row.newline_positions) > 0
    assert [s.name for s in rows[0].segments] == ["base", "crops"]


def test_query_span_with_tokenizer(small_smol_llava):
    from PIL import Image

    from vlmfix.demo.assemble import prompt_for

    model, processor = small_smol_llava
    question = "Is there a dog in the image?"
    inputs = processor(images=Image.new("RGB", (64, 48), "red"), text=prompt_for(question), return_tensors="pt")
    adapter = get_adapter(model, processor)
    row = adapter.row_layouts(inputs)[0]
    start, end = row.query_span
    assert processor.tokenizer.decode(inputs["input_ids"][0, start:end]).strip() == question
    assert len(row.image_positions) == 144 and (row.segments[0].rows, row.segments[0].cols) == (12, 12)


def test_processor_tokenizer_vocab_mismatch(small_smol_llava):
    _, processor = small_smol_llava
    model = make_model("llava")
    with pytest.raises(vlmfix.VlmfixInputError, match="mismatch"):
        vlmfix.attach(model, processor)
