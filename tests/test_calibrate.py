"""Trend calibration (`vlmfix calibrate-trend`): the scores against eager attention maps, the averaging,
the fit, and the preset file round-tripping through load_trend / Debias."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from tiny import IMAGE, make_batch, make_model

import vlmfix
from vlmfix.eval.calibrate import (
    Calibration,
    calibrate,
    fit_report,
    image_inputs,
    mean_profile,
    pruner_scores,
    world_images,
    write_preset,
)
from vlmfix.cli.main import main
from vlmfix.methods.debias import Trend, fit_trend, load_trend

SIZES = ((56, 56), (56, 84), (84, 56), (84, 112))  # different pixels (and, for LLaVA-NeXT / Qwen2-VL, token counts)


def reference_scores(model, batch, layer: int, scoring: str) -> list[torch.Tensor]:
    """Slow reference: eager attention maps (output_attentions) of layer - 1, mean over heads; per batch
    row the image columns of the last prompt row ("last") or the mean of the rows after the image ("text")."""
    text = model.config.get_text_config()
    before = text._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": before})
    att = attentions[layer - 1].double().mean(1)  # (B, Q, K)
    out = []
    for b, ids in enumerate(batch["input_ids"]):
        image = (ids == IMAGE).nonzero().flatten()
        rows = att[b, -1:] if scoring == "last" else att[b, int(image[-1]) + 1:]
        out.append(rows.mean(0)[image])
    return out


@pytest.mark.parametrize("pruner, scoring", [
    (vlmfix.FastVPrune(layer=2), "last"),
    (vlmfix.StagedPrune(layers=(3,), keep_ratios=(0.5,)), "text"),
])
def test_scores_equal_eager_attention(family, model, pruner, scoring):
    prompts = [([1, 5, 6], size, [7, 8, 9, 10 + k]) for k, size in enumerate(SIZES)]
    batches = [make_batch(family, model, prompts[:2]), make_batch(family, model, prompts[2:])]  # left-padded pairs
    layer = min(pruner.stage_layers())
    ref = [v for batch in batches for v in reference_scores(model, batch, layer, scoring)]
    got = list(pruner_scores(model, None, batches, pruner))
    assert len(got) == len(ref) == len(SIZES)
    for ours, theirs in zip(got, ref):
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)
    cal = calibrate(model, None, batches, pruner, "exp")
    refit = fit_trend(cal.mean_scores, "exp")
    assert cal.images == len(SIZES) and cal.trend.family == "exp"
    assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(cal.trend.params, refit.params))
    if family == "llava":  # one token count: the mean of the mean-1 vectors, position by position
        expected = torch.stack([v / v.mean() for v in ref]).mean(0)
        assert torch.allclose(cal.mean_scores, expected, atol=1e-6)
    assert not model.config.get_text_config()._attn_implementation == "vlmfix", "calibration left vlmfix attached"


def test_prompt_without_image_is_an_error():
    model = make_model("llava")
    with pytest.raises(ValueError, match="no image tokens"):
        list(pruner_scores(model, None, [make_batch("llava", model, [([1, 5, 6], None, [7, 8])])]))


def test_mean_profile_recovers_a_planted_trend():
    g = torch.Generator().manual_seed(0)
    vectors = []
    for k, n in enumerate((576, 576, 400, 729)):
        x = torch.arange(n, dtype=torch.float64) / (n - 1)
        content = 1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
        vectors.append((10.0**k) * 0.002 * torch.exp(1.7 * x) * content)  # scales differ: images weigh equally
    mean = mean_profile(vectors)
    assert len(mean) == 729 and math.isclose(float(mean.mean()), 1.0, rel_tol=1e-2)
    trend = fit_trend(mean, "exp")
    assert abs(trend.params[1] - 1.7) < 0.05
    rms, r2 = fit_report(mean, trend)
    assert rms < 0.05 and r2 > 0.95
    # linear profiles survive the resampling exactly
    line = mean_profile([torch.linspace(1, 3, 9, dtype=torch.float64), torch.linspace(1, 3, 5, dtype=torch.float64)])
    assert torch.allclose(line, torch.linspace(0.5, 1.5, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="no score vectors"):
        mean_profile([])


@pytest.mark.parametrize("family, params", [("exp", (0.004, 1.3)), ("cubic", (1.0, -0.5, 0.25, 0.125))])
def test_preset_round_trips(tmp_path, monkeypatch, family, params):
    trend = Trend(family, params)
    x = torch.arange(50, dtype=torch.float64) / 49
    cal = Calibration(trend(x), trend, images=7, rms=0.0, r2=1.0)
    path = write_preset(tmp_path / "tiny-calib__fastv.yaml", cal, match=["tiny-calib"], pruner="fastv",
                        about="a test")
    text = path.read_text()
    assert "Fitted by `vlmfix calibrate-trend`" in text and "RMS" in text and "7 image(s)" in text
    data = yaml.safe_load(text)
    assert data["match"] == ["tiny-calib"] and data["family"] == family
    assert Trend.from_file(path) == trend
    assert vlmfix.Debias(trend=str(path)).trend == trend

    assert load_trend("org/tiny-calib-v1", "fastv") is None  # not on the search path yet
    monkeypatch.setenv("VLMFIX_TRENDS", str(tmp_path))
    assert load_trend("org/tiny-calib-v1", "fastv") == trend
    assert load_trend("org/tiny-calib-v1", "staged") is None
    assert load_trend("llava-hf/llava-1.5-7b-hf", "fastv") is not None  # the bundled presets stay found

    model = make_model("llava")
    model.config._name_or_path = "org/tiny-calib-v1"
    pruner = vlmfix.FastVPrune(keep=3, debias=vlmfix.Debias(position=family))
    with vlmfix.attach(model, None, pruner) as fixed:
        assert fixed.runtimes[0].trend == trend


def test_world_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        world_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no instances.json"):
        world_images(tmp_path)
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="lists no images"):
        world_images(tmp_path)
    (tmp_path / "instances.json").write_text(json.dumps({"images": [{"id": 2, "file_name": "b.png"},
                                                                    {"id": 1, "file_name": "a.png"}]}))
    with pytest.raises(FileNotFoundError, match="missing"):
        world_images(tmp_path)
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(b"")
    assert [p.name for p in world_images(tmp_path)] == ["a.png", "b.png"]
    assert [p.name for p in world_images(tmp_path, 1)] == ["a.png"]
    with pytest.raises(ValueError, match=">= 1"):
        world_images(tmp_path, 0)
    with pytest.raises(ValueError, match=r"--n-images 3 asks for more images than .* \(2\); pass --n-images 2 or fewer"):
        world_images(tmp_path, 3)
    with pytest.raises(ValueError, match="text-only"):
        next(image_inputs(object(), ["a.png"]))


def test_cli_errors(tmp_path, capsys):
    assert main(["calibrate-trend", "--model", "smollm2-llava", "--data", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "instances.json").write_text(json.dumps({"images": []}))
    assert main(["calibrate-trend", "--model", "smollm2-llava", "--data", str(tmp_path)]) == 2
    assert "lists no images" in capsys.readouterr().err


@pytest.mark.smollm2
def test_cli_calibrates_on_a_world(tmp_path, capsys):
    from PIL import Image

    world = tmp_path / "world"
    (world / "images").mkdir(parents=True)
    images = []
    for i, (size, colour) in enumerate((((120, 90), "red"), ((90, 120), "blue"), ((100, 100), "white")), 1):
        Image.new("RGB", size, colour).save(world / "images" / f"{i:06d}.png")
        images.append({"id": i, "file_name": f"{i:06d}.png", "width": size[0], "height": size[1]})
    (world / "instances.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    out = tmp_path / "trends" / "smol__fastv.yaml"
    assert main(["calibrate-trend", "--model", "smollm2-llava-small", "--data", str(world), "--n-images", "2",
                 "--match", "smol-calib", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exp trend over 2 images" in printed and str(out) in printed
    data = yaml.safe_load(out.read_text())
    assert data["match"] == ["smol-calib"] and data["family"] == "exp"
    assert "N = 144 tokens" in out.read_text() and "stage layer 2 (scores at layer 1)" in out.read_text()
    assert vlmfix.Debias(trend=out).trend == Trend("exp", (data["mu"], data["sigma"]))
