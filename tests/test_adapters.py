"""Row layouts: image positions, grids, newline tokens, the user's question, padding."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, IMAGE, PAD, make_batch, make_model, prompts_two

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
        assert ra.pad_left == rb.pad_left
        assert ra.query_positions is None and rb.query_positions is None  # no tokenizer: unknown, never guessed


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
    assert processor.tokenizer.decode(inputs["input_ids"][0, row.query_positions]) == question
    assert len(row.image_positions) == 144 and (row.segments[0].rows, row.segments[0].cols) == (12, 12)


def test_processor_tokenizer_vocab_mismatch(small_smol_llava):
    _, processor = small_smol_llava
    model = make_model("llava")
    with pytest.raises(vlmfix.VlmfixInputError, match="mismatch"):
        vlmfix.attach(model, processor)


# -- issue 13: visual tokens in several runs, bare tokenizers, new families, the generic fallback -----------
def test_image_layout_offsets_cover_gaps_newlines_and_extra_tokens():
    from vlmfix.adapters import ImageLayout
    from vlmfix.core.state import ImageSegment

    pixtral = ImageLayout((ImageSegment(0, rows=2, cols=3, gap=1),), length=6)
    assert pixtral.offsets.tolist() == [0, 1, 2, 4, 5, 6]  # [IMG_BREAK] at 3, [IMG_END] at 7
    tiles = ImageLayout((ImageSegment(0, 1, 2, name="tile0"), ImageSegment(4, 1, 2, name="global")), length=4)
    assert tiles.offsets.tolist() == [0, 1, 4, 5]  # two separator tokens between the tiles
    crops = ImageLayout((ImageSegment(1, rows=2, cols=2, newline=True),), length=7, extra=(0,))
    assert crops.offsets.tolist() == [0, 1, 2, 3, 4, 5, 6] and crops.segments[0].newline_positions().tolist() == [3, 6]
    with pytest.raises(ValueError, match="inconsistent image layout"):
        ImageLayout((ImageSegment(0, 2, 3, gap=1),), length=7)


def test_bare_tokenizer_is_the_adapters_tokenizer_and_is_checked():
    from tiny import tokenizer

    model = make_model("llava")
    assert get_adapter(model, tokenizer()).tokenizer is tokenizer()
    assert get_adapter(model, model.config).tokenizer is None  # no decode / convert_tokens_to_ids: not a tokenizer
    with vlmfix.attach(model, tokenizer(), vlmfix.VAR()) as fixed:  # sink-dim discovery runs on the bare tokenizer
        assert fixed.sink_source == "discovered"
    with pytest.raises(vlmfix.VlmfixError, match="discovery needs its tokenizer: pass the processor or its tokenizer"):
        vlmfix.attach(model, None, vlmfix.VAR())
    small = make_model("llava")
    small.config.text_config.vocab_size = 64
    with pytest.raises(vlmfix.VlmfixInputError, match="tokenizer has 128 tokens but the model's embedding has 64"):
        get_adapter(small, tokenizer())


def mistral3_prompt(drop_break: bool = False):
    from families import mistral3
    from families.common import IMG_BREAK

    model = mistral3.make_model()
    batch = mistral3.make_batch(model, [([1, 5], (56, 84), [7, 8])])  # 2 rows x 3 cols, a break after row 0
    if drop_break:  # a prompt whose image rows are not closed as the processor closes them
        ids = batch["input_ids"][0].tolist()
        ids.remove(IMG_BREAK)
        ids.insert(2, 9)
        batch["input_ids"] = torch.tensor([ids])
    return model, batch


def test_mistral3_rows_are_closed_by_break_tokens():
    from families.common import IMG_BREAK, IMG_END
    from tiny import tokenizer

    model, batch = mistral3_prompt()
    ids = batch["input_ids"][0]
    row = get_adapter(model, tokenizer()).row_layouts(batch)[0]
    seg = row.segments[0]
    assert (seg.start, seg.rows, seg.cols, seg.gap) == (2, 2, 3, 1)
    assert seg.grid_positions().tolist() == [[2, 3, 4], [6, 7, 8]]
    assert ids[5] == IMG_BREAK and ids[9] == IMG_END and row.image_positions.tolist() == [2, 3, 4, 6, 7, 8]
    # no chat markers: the whole prompt is the user's turn, of which BOS and [IMG_END] are no text
    assert row.query_positions.tolist() == [1, 10, 11]
    with pytest.raises(vlmfix.VlmfixInputError, match=r"offsets \[0, 1, 2, 4, 5, 6\] .* but they are at offsets "
                                                      r"\[0, 1, 2, 3, 4, 5\]"):
        get_adapter(model).row_layouts(mistral3_prompt(drop_break=True)[1])


def test_qwen3_vl_deepstack_refuses_early_inplace_pruning():
    from families import qwen3_vl
    from tiny import tokenizer

    model = qwen3_vl.make_model()
    with pytest.raises(vlmfix.VlmfixInputError, match="deepstack .* layers 0..1.*Prune from layer 2 or later, or "
                                                      "use form='mask'"):
        vlmfix.attach(model, tokenizer(), vlmfix.FastVPrune(layer=1, keep=2))
    batch = qwen3_vl.make_batch(model, [([1, 5], (56, 84), [7, 8])])
    with vlmfix.attach(model, tokenizer(), vlmfix.FastVPrune(layer=1, keep=2, form="mask")) as fixed:
        model.generate(**batch, max_new_tokens=2, pad_token_id=PAD)
        assert len(vlmfix.methods.prune.kept_tokens(fixed.last_state)) == 2


def tiny_vipllava():
    """A VLM class vlmfix has no adapter for (VipLlava: a LLaVA with multi-layer vision features)."""
    from tiny import _text, _vision
    from transformers import LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = VipLlavaConfig(vision_config=_vision(), text_config=LlamaConfig(**_text()), image_token_index=IMAGE,
                         vision_feature_layers=[-2, -1])
    return VipLlavaForConditionalGeneration(cfg).eval()


def test_generic_fallback_takes_image_runs_from_input_ids():
    from families.common import left_pad
    from reference_var import reference_var
    from test_gift import check_against_reference
    from tiny import chat_after, tokenizer

    model = tiny_vipllava()
    batch = left_pad([[1, 5, 6] + [IMAGE] * 25 + chat_after(), [1, 12] + [IMAGE] * 25 + chat_after(" Is it a dog?")])
    batch["pixel_values"] = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="no adapter for VipLlavaForConditionalGeneration.*heat maps and the "
                                         "positional trend"):
        adapter = get_adapter(model, tokenizer())
    rows = adapter.row_layouts(batch)
    assert [(s.start, s.rows, s.cols) for s in rows[0].segments] == [(3, 1, 25)]
    pad = rows[1].pad_left
    assert pad > 0 and rows[1].image_positions.tolist() == list(range(pad + 2, pad + 27))
    plain = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=PAD, output_logits=True,
                           return_dict_in_generate=True)
    with pytest.warns(UserWarning), vlmfix.attach(model, tokenizer()) as fixed:
        same = fixed.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=PAD, output_logits=True,
                              return_dict_in_generate=True)
    assert torch.equal(plain.sequences, same.sequences)
    assert torch.allclose(torch.stack(plain.logits), torch.stack(same.logits), atol=1e-5, rtol=0)
    with pytest.warns(UserWarning):
        check_against_reference(model, tokenizer(), batch, vlmfix.GIFT(alpha=3.0, saliency_layers=(1,),
                                                                       boost_layers=(2, 3)), dict(pad_token_id=PAD))
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    forms = {}
    for form in ("inplace", "mask"):
        with pytest.warns(UserWarning), vlmfix.attach(model, tokenizer(), vlmfix.FastVPrune(keep=3, form=form)) as fx:
            out = fx.generate(**batch, **gen)
            kept = [k.tolist() for k in vlmfix.methods.prune.prune_record(fx.last_state).stages[0].kept]
            forms[form] = (out.sequences, torch.stack(out.logits), kept)
    assert forms["inplace"][2] == forms["mask"][2] and len(forms["mask"][2][1]) == 3
    assert torch.equal(forms["inplace"][0], forms["mask"][0])
    assert torch.allclose(forms["inplace"][1], forms["mask"][1], atol=1e-4, rtol=0)
    var = dict(tau=1.2, m_min=0.05, rho=0.3)
    with reference_var(model, dims=[0, 1], **var):
        expected = model.generate(**batch, **gen)
    with pytest.warns(UserWarning), vlmfix.attach(model, tokenizer(), vlmfix.VAR(**var), sink_dims=[0, 1]) as fx:
        got = fx.generate(**batch, **gen)
        assert sum(sum(v["moved"]) for v in vlmfix.VAR.summary(fx.last_state).values()) > 0
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.allclose(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-5, rtol=0)


def test_model_without_image_token_lists_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny import _text

    with pytest.raises(vlmfix.VlmfixInputError, match="LlamaForCausalLM: it has no family adapter and its config "
                                                      "names no image token id.*Qwen3-VL.*Mistral 3"):
        get_adapter(LlamaForCausalLM(LlamaConfig(**_text())))


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_qwen_grids_follow_the_models_rotary_positions(name, kind):
    """Each grid (an image, a video frame) is where the model's own 3-D rotary positions put it: one
    temporal id per grid, height ids growing down the rows, width ids along the columns."""
    import importlib

    from tiny import tokenizer

    module = importlib.import_module(f"families.{name}")
    model = module.make_model()
    sizes = [(56, 84), (84, 56)] if kind == "image" else [(4, 56, 84), (2, 84, 56)]
    items = [([1, 5], sizes[0], [7, 8]), ([1, 12, 13], sizes[1], [9])]
    batch = (module.make_batch if kind == "image" else module.make_video_batch)(model, items)
    grids = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw") if k in batch}
    thw, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        attention_mask=batch["attention_mask"], **grids)
    for row in get_adapter(model, tokenizer()).row_layouts(batch):
        temporal = []
        for seg in row.segments:
            t, h, w = (thw[c, row.index][seg.grid_positions()] for c in range(3))
            assert (t == t[0, 0]).all()
            temporal.append(int(t[0, 0]))
            assert torch.equal(h - h[0, 0], torch.arange(seg.rows)[:, None].expand_as(h))
            assert torch.equal(w - w[0, 0], torch.arange(seg.cols)[None, :].expand_as(w))
        assert temporal == sorted(set(temporal)), "frames in time order"
    assert [len(r.segments) for r in get_adapter(model).row_layouts(batch)] == ([1, 1] if kind == "image" else [2, 1])


def test_hybrid_linear_attention_decoder_is_refused():
    """Qwen3.5's decoder mixes linear-attention layers (no softmax attention to route) with softmax ones."""
    from families.qwen3_vl import qwen3_text, vision_config
    from tiny import VSTART
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    vision = {k: v for k, v in vision_config().items() if k != "deepstack_visual_indexes"}
    text = qwen3_text(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                      linear_num_value_heads=4)
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(vision_config=vision, text_config=text,
                                                          image_token_id=IMAGE, vision_start_token_id=VSTART))
    with pytest.raises(vlmfix.VlmfixInputError, match=r"decoder layers \[0, 1, 2\] of Qwen3_5ForConditionalGeneration "
                                                      "have no softmax self-attention"):
        vlmfix.attach(model)
