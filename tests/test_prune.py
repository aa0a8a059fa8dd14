"""FastV / multi-stage pruning (in-place vs mask form) and Debias, on tiny random models and SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import PAD, make_batch, make_model, prompts_two

import vlmfix
from vlmfix.methods import build, methods
from vlmfix.methods.debias import Trend, content_size, fit_trend, padding_fractions
from vlmfix.methods.prune import kept_tokens, prune_record

GEN = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)


def run(model, batch, method=None):
    if method is None:
        out = model.generate(**batch, **GEN)
        return out.sequences, torch.stack(out.logits), None
    with vlmfix.attach(model, None, method) as fixed:
        out = fixed.generate(**batch, **GEN)
        state = fixed.last_state
    return out.sequences, torch.stack(out.logits), state


def kept_lists(state):
    return [[k.tolist() for k in stage.kept] for stage in prune_record(state).stages]


def assert_forms_agree(model, batch, make):
    a, b = run(model, batch, make("inplace")), run(model, batch, make("mask"))
    assert kept_lists(a[2]) == kept_lists(b[2]), "the two forms chose different tokens"
    assert torch.equal(a[0], b[0]), "greedy tokens differ"
    assert torch.allclose(a[1], b[1], atol=1e-4, rtol=0), f"logits differ by {(a[1] - b[1]).abs().max()}"
    return a, b


@pytest.mark.parametrize("debias", [None, "both"])
def test_fastv_inplace_matches_mask(family, model, debias):
    batch = make_batch(family, model, prompts_two())
    deb = vlmfix.Debias() if debias else None
    a, _ = assert_forms_agree(model, batch, lambda form: vlmfix.FastVPrune(layer=2, keep=1, debias=deb, form=form))
    plain = run(model, batch)
    assert not torch.allclose(a[1], plain[1], atol=1e-4), "pruning changed nothing"
    for row, kept in enumerate(prune_record(a[2]).stages[0].kept):
        assert len(kept) == 1 and set(kept.tolist()) <= set(a[2].rows[row].image_positions.tolist())


def test_staged_inplace_matches_mask(family, model):
    batch = make_batch(family, model, prompts_two())
    a, _ = assert_forms_agree(
        model, batch, lambda form: vlmfix.StagedPrune(layers=(1, 3), keep_ratios=(0.6, 0.3), form=form)
    )
    stages = kept_lists(a[2])
    assert len(stages) == 2
    for first, second in zip(*stages):
        assert set(second) <= set(first) and len(second) <= len(first)


def test_text_only_row_keeps_everything(family, model):
    batch = make_batch(family, model, prompts_two() + [([1, 3, 4], None, [5, 6])])
    a, _ = assert_forms_agree(model, batch, lambda form: vlmfix.FastVPrune(layer=2, keep=1, form=form))
    assert prune_record(a[2]).stages[0].kept[2].numel() == 0


def test_inplace_shortens_the_cache(model, family):
    batch = make_batch(family, model, prompts_two())
    with vlmfix.attach(model, None, vlmfix.FastVPrune(layer=2, keep=1)):
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=PAD)
    cache = out.past_key_values
    lengths = [cache.layers[i].keys.shape[2] for i in range(len(cache.layers))]
    dropped = min(len(r) for r in (batch["input_ids"] == 100).sum(1, keepdim=True).tolist()) - 1
    assert lengths[0] == lengths[1] and lengths[2] == lengths[3]
    if dropped > 0:
        assert lengths[2] < lengths[0]


def test_keep_all_is_exact(family, model):
    batch = make_batch(family, model, prompts_two())
    ref = run(model, batch)
    for method in (vlmfix.FastVPrune(keep=10_000), vlmfix.FastVPrune(keep_ratio=1.0),
                   vlmfix.StagedPrune(layers=(1, 2), keep_ratios=(1.0, 0.999999))):
        got = run(model, batch, method)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert torch.equal(kept_tokens(got[2], 1), got[2].rows[1].image_positions)


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep=0), "positive"),
    (dict(keep=-3), "positive"),
    (dict(keep=None, keep_ratio=0.0), r"\(0, 1\]"),
    (dict(keep=None, keep_ratio=1.5), r"\(0, 1\]"),
    (dict(layer=0), "out of range"),
    (dict(layer=4), "out of range"),
    (dict(form="drop"), "form"),
    (dict(keep=128, keep_ratio=0.5), "not both"),  # 128 is the default keep: still refused when given
    (dict(keep=64, keep_ratio=0.5), "not both"),
    (dict(keep=2.5), "positive number of tokens"),
])
def test_bad_fastv_configs(kwargs, message):
    model = make_model("llava")
    with pytest.raises(ValueError, match=message):
        vlmfix.attach(model, None, vlmfix.FastVPrune(**kwargs))


def test_fastv_budget_defaults_without_touching_a_ratio_config():
    model = make_model("llava")
    ratio = vlmfix.FastVPrune(keep_ratio=0.5)
    with vlmfix.attach(model, None, ratio) as fixed:
        assert ratio.keep is None and fixed.runtimes[0].budget(0, 40) == 20
    plain = vlmfix.FastVPrune()
    with vlmfix.attach(model, None, plain) as fixed:
        budget = fixed.runtimes[0].budget
        assert plain.keep is None and budget(0, 576) == 128 and budget(0, 40) == 40


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=(1, 2), keep_ratios=(0.3, 0.5)), "decreasing"),
    (dict(layers=(2, 1), keep_ratios=(0.5, 0.3)), "increasing"),
    (dict(layers=(1, 2), keep_ratios=(0.5,)), "one keep ratio per layer"),
    (dict(layers=(1, 9), keep_ratios=(0.5, 0.3)), "out of range"),
])
def test_bad_staged_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vlmfix.attach(make_model("llava"), None, vlmfix.StagedPrune(**kwargs))


def test_one_pruner_at_a_time():
    model = make_model("llava")
    with pytest.raises(ValueError, match="at most one pruner"):
        vlmfix.attach(model, None, [vlmfix.FastVPrune(), vlmfix.StagedPrune(layers=(1,), keep_ratios=(0.5,))])
    assert not model.config.text_config._attn_implementation == "vlmfix"


def test_registry_and_presets():
    assert methods()["fastv"].config is vlmfix.FastVPrune and methods()["staged"].config is vlmfix.StagedPrune
    assert build("fastv").keep == 128
    assert tuple(build("staged").keep_ratios) == (0.32, 0.16, 0.08)


# -- Debias ----------------------------------------------------------------------------------------
def test_fit_trend_recovers_exp():
    x = torch.arange(576, dtype=torch.float64) / 575
    for mu, sigma in ((0.002, 0.6), (0.01, 1.7), (0.5, 2.7)):
        trend = fit_trend(mu * torch.exp(sigma * x), "exp")
        assert trend.family == "exp"
        assert math.isclose(trend.params[0], mu, rel_tol=1e-6) and math.isclose(trend.params[1], sigma, rel_tol=1e-6)
    g = torch.Generator().manual_seed(0)
    noisy = 0.01 * torch.exp(1.5 * x) * (1 + 0.05 * torch.randn(576, generator=g, dtype=torch.float64))
    mu, sigma = fit_trend(noisy, "exp").params
    assert abs(sigma - 1.5) < 0.05 and abs(mu / 0.01 - 1) < 0.05


def test_fit_trend_cubic():
    x = torch.arange(100, dtype=torch.float64) / 99
    y = 1 + 2 * x - 0.5 * x**2 + 0.25 * x**3
    trend = fit_trend(y, "cubic")
    assert torch.allclose(torch.tensor(trend.params, dtype=torch.float64), torch.tensor([1, 2, -0.5, 0.25], dtype=torch.float64), atol=1e-8)
    with pytest.raises(ValueError, match="unknown trend family"):
        fit_trend(y, "quartic")


def test_debias_flattens_a_planted_trend():
    n = 576
    x = torch.arange(n, dtype=torch.float64) / (n - 1)
    g = torch.Generator().manual_seed(1)
    content = torch.rand(n, generator=g, dtype=torch.float64) * 0.2 + 1.0
    scores = (content * 0.003 * torch.exp(2.0 * x)).float()
    flat, mask = vlmfix.Debias(padding=False).transform(scores, x)
    assert mask.all()
    # the raw top quarter sits at the bottom of the image; debiased it follows the content
    top_raw = torch.topk(scores, n // 4).indices.float().mean()
    top_flat = torch.topk(flat, n // 4).indices.float().mean()
    assert top_raw > 0.7 * n and abs(top_flat - n / 2) < 0.1 * n
    half = n // 2
    assert abs(flat[:half].mean() / flat[half:].mean() - 1) < 0.05
    fixed, _ = vlmfix.Debias(padding=False, trend={"family": "exp", "mu": 0.003, "sigma": 2.0}).transform(scores, x)
    assert torch.allclose(fixed.double(), content, rtol=1e-4)


def test_raster_positions_restart_in_each_video_frame():
    from vlmfix.methods.debias import raster_positions
    from vlmfix.core.state import ImageSegment, RowLayout

    def row(*segments):
        n = sum(s.rows * s.cols for s in segments)
        start = segments[0].start
        return RowLayout(0, 0, start + n + 3, torch.arange(start, start + n), torch.tensor([], dtype=torch.long),
                         segments, None)

    image = row(ImageSegment(2, 2, 3, name="frame0"))  # one frame: x over the whole image
    assert torch.allclose(raster_positions(image), torch.linspace(0, 1, 6, dtype=torch.float64))
    video = row(ImageSegment(2, 2, 2, name="frame0"), ImageSegment(6, 2, 2, name="frame1"))
    per_frame = torch.tensor([0, 1 / 3, 2 / 3, 1] * 2, dtype=torch.float64)
    assert torch.allclose(raster_positions(video), per_frame)
    tiles = row(ImageSegment(2, 2, 2, name="base"), ImageSegment(6, 2, 2, name="crops"))  # not a video
    assert torch.allclose(raster_positions(tiles), torch.linspace(0, 1, 8, dtype=torch.float64))


def test_debias_padding_zeroes_and_caps():
    frac = torch.tensor([0.0, 0.9, 0.5, 0.6])
    out, content = vlmfix.Debias(position=None).transform(torch.ones(4), torch.linspace(0, 1, 4), frac)
    assert content.tolist() == [True, False, True, False] and out.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_padding_fractions_geometry():
    # wide image 200 x 100 in a 200 square: 50 rows of padding above and below; a 4 x 4 grid of 50-px cells
    wide = padding_fractions((200, 100), (4, 4))
    assert torch.allclose(wide, torch.tensor([[1.0] * 4, [0.0] * 4, [0.0] * 4, [1.0] * 4]))
    # tall image 100 x 300 in a 300 square: 100 px left and right; 3 x 3 cells of 100 px
    tall = padding_fractions((100, 300), (3, 3))
    assert torch.allclose(tall, torch.tensor([[1.0, 0.0, 1.0]] * 3))
    # tall 90 x 120: left pad 15 px of 120; 4 columns of 30 px -> first/last column half padding
    part = padding_fractions((90, 120), (2, 4))
    assert torch.allclose(part, torch.tensor([[0.5, 0.0, 0.0, 0.5]] * 2))
    assert torch.equal(padding_fractions((64, 64), (3, 3)), torch.zeros(3, 3))
    for geometry in ("crop", "none"):
        assert torch.equal(padding_fractions((200, 100), (4, 4), geometry), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="geometry"):
        padding_fractions((1, 1), (1, 1), "stretch")


def test_content_size_from_pixels():
    bg = torch.tensor([0.1, -0.2, 0.3])
    px = bg.view(3, 1, 1).expand(3, 60, 60).clone()
    px[:, 15:45, :] = 2.0  # a wide image, pad top and bottom
    assert content_size(px, bg) == (60, 30)


def test_bad_debias():
    with pytest.raises(ValueError, match="position"):
        vlmfix.Debias(position="linear")
    with pytest.raises(ValueError, match="padding_threshold"):
        vlmfix.Debias(padding_threshold=2)
    assert vlmfix.Debias(trend={"family": "exp", "mu": 1, "sigma": 2}).trend == Trend("exp", (1.0, 2.0))


def test_keep_beyond_the_image_is_noted():
    """A keep count sized for 576 tokens on a 25-token image prunes nothing, and the record says so."""
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    _, _, state = run(model, batch, vlmfix.FastVPrune(keep=30))
    assert prune_record(state).budget_notes == [
        f"row {b}: keep 30 >= its 25 image tokens, so nothing is pruned (keep counts are sized for LLaVA-1.5's "
        "576 tokens; keep_ratio scales with the image)" for b in (0, 1)]
    _, _, state = run(model, batch, vlmfix.FastVPrune(keep=5))
    assert prune_record(state).budget_notes == []


def test_kept_heatmap(tmp_path):
    from vlmfix.viz import record_heat_maps

    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    _, _, state = run(model, batch, vlmfix.FastVPrune(keep=5))
    record_heat_maps(state, tmp_path, row=1)
    path = tmp_path / "kept_tokens.png"
    assert path.is_file() and path.stat().st_size > 0


# -- SmolLM2 LLaVA (144 image tokens) ----------------------------------------------------------------
@pytest.mark.smollm2
@pytest.mark.parametrize("method", ["fastv", "fastv-debias", "staged"])
def test_smol_llava_forms_agree(small_smol_llava, method):
    from PIL import Image

    from vlmfix.demo.assemble import prompt_for

    model, processor = small_smol_llava
    images = [Image.new("RGB", (300, 200), (200, 60, 40)), Image.new("RGB", (160, 240), (20, 160, 90))]
    texts = [prompt_for("What is in the image?"), prompt_for("Describe the colours of this picture in detail.")]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)

    def make(form):
        if method == "staged":
            return vlmfix.StagedPrune(layers=(2, 10, 20), keep_ratios=(0.5, 0.25, 0.1), form=form)
        return vlmfix.FastVPrune(layer=2, keep=32, debias=vlmfix.Debias() if method == "fastv-debias" else None,
                                 form=form)

    a, _ = assert_forms_agree(model, dict(batch), make)
    assert all(len(k) == (32 if method != "staged" else 15) for k in prune_record(a[2]).stages[-1].kept)
    ref = run(model, dict(batch))
    got = run(model, dict(batch), vlmfix.FastVPrune(keep=144))
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.smollm2
def test_smol_llava_padding_debias(small_smol_llava):
    """LLaVA-1.5 pad mode: a 300 x 100 image fills the middle 4 of 12 grid rows; the padded patches get
    score 0 and the budget drops to the 48 content patches."""
    import copy

    from PIL import Image
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from vlmfix.demo.assemble import prompt_for

    model, processor = small_smol_llava
    processor = copy.copy(processor)
    base = processor.image_processor
    processor.image_processor = LlavaImageProcessorPil(
        do_pad=True, do_center_crop=False, size={"height": 168, "width": 168}, image_mean=base.image_mean,
        image_std=base.image_std)
    batch = processor(images=Image.new("RGB", (300, 100), (200, 60, 40)), text=prompt_for("What?"),
                      return_tensors="pt")
    with vlmfix.attach(model, processor, vlmfix.FastVPrune(keep=100, debias=vlmfix.Debias())) as fixed:
        fixed.generate(**batch, max_new_tokens=2, do_sample=False)
        rec = prune_record(fixed.last_state)
        kept = kept_tokens(fixed.last_state)
        grid = fixed.last_state.rows[0].segments[0].grid_positions()
    assert rec.stages[0].budget == [48]
    assert rec.budget_notes == ["row 0, layer 2: budget 100 lowered to 48 by the padding cap (only 48 candidate patches "
                         "are not padding)"]
    assert set(kept.tolist()) == set(grid[4:8].flatten().tolist())
    assert torch.equal(rec.pad_frac[0].view(12, 12)[4:8], torch.zeros(4, 12))
