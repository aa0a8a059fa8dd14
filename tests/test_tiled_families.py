"""Layouts the family harness (tests/test_families.py) does not reach: several images in one row (Idefics3's
<global-img> tag, LLaVA-OneVision's uncropped multi-image views) and inputs that do not add up (InternVL)."""

from __future__ import annotations

import pytest
import torch
from families import idefics3, internvl, llava_onevision
from tiny import IMAGE, tokenizer

import vlmfix
from vlmfix.adapters import VlmfixInputError


def layout(model, batch, processor):
    with vlmfix.attach(model, processor) as fixed:
        with torch.no_grad():
            model(**batch)  # the model itself checks that the image features fill the image tokens
        return fixed.last_state.rows[0]


def one_row(ids: list[int], **pixels) -> dict:
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **pixels}


def test_idefics3_images_end_at_the_global_view():
    """A 2 x 2-tile image and a lone global view in one row: with the tokenizer, two images; without it,
    one image of six views, with a warning."""
    model = idefics3.make_model()
    ids = [1, 5] + idefics3.image_ids(2, 2) + [6, 7] + idefics3.image_ids(0, 0) + [8]
    batch = one_row(ids, pixel_values=torch.randn(1, 6, 3, 24, 24),
                    pixel_attention_mask=torch.ones(1, 6, 24, 24, dtype=torch.bool))
    row = layout(model, batch, tokenizer())
    assert [(s.name, s.image_index) for s in row.segments] == [
        ("tile0", 0), ("tile1", 0), ("tile2", 0), ("tile3", 0), ("global", 0), ("image", 1)]
    # each tile's 2 x 2 tokens follow its "<fake_token_around_image><row_i_col_j>"; rows end with a newline
    assert [s.start for s in row.segments] == [4, 10, 17, 23, 31, 40]
    with pytest.warns(UserWarning, match="6 runs of image tokens and no tokenizer that knows <global-img>"):
        row = layout(model, batch, None)
    assert {s.image_index for s in row.segments} == {0} and row.segments[-1].name == "global"


def test_onevision_images_of_a_multi_image_row_are_not_cropped():
    """batch_num_images = 2: each image is its 4 x 4 base view and one newline token."""
    model = llava_onevision.make_model()
    ids = [1, 5] + [IMAGE] * 17 + [6] + [IMAGE] * 17 + [7]
    batch = one_row(ids, pixel_values=torch.randn(2, 1, 3, 24, 24), image_sizes=torch.tensor([[56, 84], [30, 30]]),
                    batch_num_images=torch.tensor([2]))
    row = layout(model, batch, tokenizer())
    assert [(s.name, s.rows, s.cols, s.image_index) for s in row.segments] == [("base", 4, 4, 0), ("base", 4, 4, 1)]
    assert row.newline_positions.tolist() == [18, 36]


@pytest.mark.parametrize("tokens, tiles, message", [(9 * 3 + 1, 3, "not a whole number of tiles of 9"),
                                                    (9 * 3, 2, "make 3 InternVL tiles of 9 tokens but 2 tiles")])
def test_internvl_tiles_must_add_up(tokens, tiles, message):
    model = internvl.make_model()
    batch = one_row([1, 101] + [IMAGE] * tokens + [102, 5], pixel_values=torch.randn(tiles, 3, 24, 24))
    with vlmfix.attach(model, tokenizer()):
        with pytest.raises(VlmfixInputError, match=message):
            model(**batch)
