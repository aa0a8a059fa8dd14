"""Acceptance checks of every family module in tests/families (`MODULES`), on images and, where the
family takes them, on videos: attach with no methods is the model; layouts cover exactly the visual
tokens and the question is exactly the user turn's text; VAR and GIFT equal the slow references of
their specs; in-place and mask pruning agree (or in-place pruning is refused, as the module says);
a batch equals its rows run alone."""

from __future__ import annotations

import importlib
from functools import lru_cache

import pytest
import torch
from families import MODULES
from reference_var import reference_var
from test_gift import check_against_reference
from test_var import RecordingVAR, compare_rows
from tiny import PAD, QUESTION, VOCAB, chat_after, tokenizer, user_turn

import vlmfix
from vlmfix.adapters import GenericAdapter, get_adapter
from vlmfix.methods.prune import kept_tokens, prune_record

GEN = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)
OTHER = " What is the colour of the dog?"
VAR_ACTS = dict(tau=1.2, m_min=0.05, rho=0.3)  # with sink dims 0, 1: VAR acts on the tiny models
GIFT_TINY = dict(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))

FAMILIES = {name: importlib.import_module(f"families.{name}") for name in MODULES}
CASES = [(name, "image") for name in MODULES] + [(name, "video") for name in MODULES if FAMILIES[name].VIDEO]


def prompts(kind: str, module=None, header: bool = False) -> list:
    """Two chat prompts of different lengths (a left-padded batch): images (H, W) or clips (frames, H, W), of
    the module's `VIDEO_FRAMES` (default 4 and 2; LLaVA-OneVision stacks a batch's clips: one frame count).
    Two text tokens precede the image; with `header` they stand before a user header (a system prompt),
    without it they are the start of the user's text (a prompt without chat markers is one user turn)."""
    frames = getattr(module, "VIDEO_FRAMES", (4, 2))
    sizes = [(56, 84), (84, 56)] if kind == "image" else [(frames[0], 56, 84), (frames[1], 84, 56)]
    before = (user_turn([5, 6]), user_turn([12])) if header else ([1, 5, 6], [1, 12])
    return [(before[0], sizes[0], chat_after(QUESTION)), (before[1], sizes[1], chat_after(OTHER))]


@lru_cache(maxsize=None)
def model_of(name: str) -> torch.nn.Module:
    return FAMILIES[name].make_model()


def batch_of(name: str, kind: str, model, items: list) -> dict:
    module = FAMILIES[name]
    return (module.make_batch if kind == "image" else module.make_video_batch)(model, items)


@pytest.fixture(params=CASES, ids=[f"{n}-{k}" for n, k in CASES])
def case(request):
    """(family module, model, kind, the two-prompt batch)."""
    name, kind = request.param
    model = model_of(name)
    return FAMILIES[name], model, kind, batch_of(name, kind, model, prompts(kind, FAMILIES[name]))


def generate(model, batch):
    out = model.generate(**batch, **GEN)
    return out.sequences, torch.stack(out.logits)


def run(model, batch, methods, **kw):
    with vlmfix.attach(model, tokenizer(), methods, **kw) as fixed:
        tokens, logits = generate(fixed, batch)
        state = fixed.last_state
    return tokens, logits, state


@pytest.mark.parametrize("name", MODULES)
def test_module_follows_the_protocol(name):
    module = FAMILIES[name]
    for attr in ("NAME", "make_model", "make_batch", "VIDEO", "PRUNE_IN_PLACE"):
        assert hasattr(module, attr), f"families.{name} lacks {attr}"
    assert module.NAME == name and isinstance(module.VIDEO, bool) and isinstance(module.PRUNE_IN_PLACE, bool)
    assert callable(getattr(module, "make_video_batch", None)) == module.VIDEO, "make_video_batch exactly when VIDEO"
    model = model_of(name)
    adapter = get_adapter(model, tokenizer())
    assert not isinstance(adapter, GenericAdapter), f"{type(model).__name__} has no family adapter"
    assert (adapter.num_layers, adapter.hidden_size, adapter.text_config.vocab_size) == (4, 64, VOCAB)
    assert not model.training


def test_no_methods_is_the_model(case):
    module, model, kind, batch = case
    single = batch_of(module.NAME, kind, model, prompts(kind, module)[1:])
    for inputs in (batch, single):
        plain = generate(model, inputs)
        with vlmfix.attach(model, tokenizer()) as fixed:
            got = generate(fixed, inputs)
        assert torch.equal(plain[0], got[0])
        assert torch.allclose(plain[1], got[1], atol=1e-5, rtol=0)


def test_layout_and_query_span(case):
    """Forward (raw pixels) and generate (pre-encoded features) see the same layout; it covers exactly
    the visual tokens; the question is exactly the user turn's text (Qwen3-VL's video timestamps aside)."""
    module, model, kind, _ = case
    batch = batch_of(module.NAME, kind, model, prompts(kind, module, header=True))
    tok = tokenizer()
    with vlmfix.attach(model, tok) as fixed:
        with torch.no_grad():
            model(**batch)
        forward_rows = fixed.last_state.rows
        model.generate(**batch, max_new_tokens=1, pad_token_id=PAD)
        generate_rows = fixed.last_state.rows
        visual = torch.tensor(fixed.adapter.visual_token_ids)
    for row, other, question in zip(forward_rows, generate_rows, (QUESTION, OTHER)):
        ids = batch["input_ids"][row.index]
        assert row.segments == other.segments and torch.equal(row.query_positions, other.query_positions)
        assert torch.equal(row.image_positions, other.image_positions)
        assert torch.equal(row.newline_positions, other.newline_positions)
        assert torch.equal(row.image_positions, torch.isin(ids, visual).nonzero().flatten())
        grid = torch.cat([s.grid_positions().flatten() for s in row.segments] + [row.newline_positions])
        assert sorted(grid.tolist()) == row.image_positions.tolist()
        assert tok.decode(ids[row.query_positions]) == question
        assert row.pad_left == int((batch["attention_mask"][row.index] == 0).sum())
    if kind == "video":
        assert all(s.name.startswith("frame") for r in forward_rows for s in r.segments)
        first, second = (len(r.segments) for r in forward_rows)
        per = getattr(module, "FRAMES_PER_SEGMENT", 2)  # Qwen: a grid per temporal patch of 2 frames
        assert [first, second] == [f // per for f in getattr(module, "VIDEO_FRAMES", (4, 2))], "one grid per frame"
        assert {s.image_index for r in forward_rows for s in r.segments} == {0}  # one clip per row


def test_var_equals_reference(case):
    _, model, _, batch = case
    with reference_var(model, dims=[0, 1], **VAR_ACTS) as ref:
        expected = generate(model, batch)
    var = RecordingVAR(**VAR_ACTS)
    tokens, logits, state = run(model, batch, var, sink_dims=[0, 1])
    moved = sum(sum(v["moved"]) for v in vlmfix.VAR.summary(state).values())
    assert moved > 0, "the configuration must make VAR act"
    tau = VAR_ACTS["tau"]
    for layer, rows in ref.sinks.items():  # the reference's own sink scores, from its own hooks (padding aside)
        ours = [{j for j in state.sinks(layer, b, tau).tolist() if j >= r.pad_left} for b, r in enumerate(state.rows)]
        assert ours == [{j for j in ref_row if j >= r.pad_left} for ref_row, r in zip(rows, state.rows)], layer
    assert any(len(state.visual_sinks(layer, b, tau)) for layer in ref.sinks for b in range(2))
    assert torch.equal(tokens, expected[0])
    assert torch.allclose(logits, expected[1], atol=1e-5, rtol=0)
    assert compare_rows(var.seen, ref) > 20


def test_gift_equals_reference(case):
    _, model, _, batch = case
    plain = generate(model, batch)
    ours, state = check_against_reference(model, tokenizer(), batch, vlmfix.GIFT(**GIFT_TINY), dict(pad_token_id=PAD))
    assert not torch.allclose(ours[1], plain[1], atol=1e-4), "GIFT changed nothing in this construction"
    assert all(state.record(vlmfix.GIFT).rows[r.index].acting for r in state.rows)


def test_pruning_forms_agree_or_inplace_is_refused(case):
    module, model, _, batch = case
    make = lambda form: vlmfix.FastVPrune(layer=2, keep=2, form=form)  # noqa: E731
    masked = run(model, batch, make("mask"))
    for row in masked[2].rows:
        kept = kept_tokens(masked[2], row.index)
        assert len(kept) == 2 and set(kept.tolist()) <= set(row.image_positions.tolist())
    assert not torch.allclose(masked[1], generate(model, batch)[1], atol=1e-4), "pruning changed nothing"
    if not module.PRUNE_IN_PLACE:
        with pytest.raises(vlmfix.VlmfixInputError, match="form='mask'"):
            vlmfix.attach(model, tokenizer(), make("inplace"))
        return
    inplace = run(model, batch, make("inplace"))
    kept = lambda state: [[k.tolist() for k in stage.kept] for stage in prune_record(state).stages]  # noqa: E731
    assert kept(inplace[2]) == kept(masked[2]), "the two forms chose different tokens"
    assert torch.equal(inplace[0], masked[0])
    assert torch.allclose(inplace[1], masked[1], atol=1e-4, rtol=0), f"{(inplace[1] - masked[1]).abs().max()}"


def test_batch_equals_rows_alone(case):
    module, model, kind, batch = case
    methods = lambda: [vlmfix.VAR(**VAR_ACTS), vlmfix.GIFT(**GIFT_TINY),  # noqa: E731
                       vlmfix.FastVPrune(layer=2, keep=3, form="inplace" if module.PRUNE_IN_PLACE else "mask")]
    tokens, logits, _ = run(model, batch, methods(), sink_dims=[0, 1])
    n = GEN["max_new_tokens"]
    for row, item in enumerate(prompts(kind, module)):
        alone = run(model, batch_of(module.NAME, kind, model, [item]), methods(), sink_dims=[0, 1])
        assert torch.equal(alone[0][0, -n:], tokens[row, -n:])
        assert torch.allclose(alone[1][:, 0], logits[:, row], atol=1e-4, rtol=0)


def test_heat_maps_show_each_grid(case, tmp_path):
    """Sink, saliency and kept-token heat maps of every grid (image, tile, frame) of a row, each the
    grid's rows x cols."""
    from PIL import Image

    from vlmfix import viz

    _, model, kind, batch = case
    methods = [vlmfix.VAR(**VAR_ACTS), vlmfix.GIFT(**GIFT_TINY), vlmfix.FastVPrune(layer=2, keep=3, form="mask")]
    state = run(model, batch, methods, sink_dims=[0, 1])[2]
    for k, seg in enumerate(state.rows[0].segments):
        assert viz.on_grid(state, state.phi[2], 0, k).shape == (seg.rows, seg.cols)
        folder = tmp_path / f"grid{k}"
        folder.mkdir()
        viz.record_heat_maps(state, folder, segment=k)
        for name in ("sinks.png", "kept_tokens.png", "gift_saliency.png"):
            with Image.open(folder / name) as png:
                assert png.size[0] > 0
    if kind == "video":
        assert "frame1 grid" in viz._where(state, 0, 1)
