"""The `vlmfix sinks` command and the heat maps."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmfix.cli import main
from vlmfix.viz import grid_heatmap


def test_grid_heatmap_colours_follow_values(tmp_path):
    values = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    path = grid_heatmap(values, tmp_path / "h.png", cell=10, marked=torch.tensor([[False, True], [False, False]]))
    img = Image.open(path).convert("RGB")
    assert img.size == (20, 20)
    brightness = [sum(img.getpixel((x, y))) for x, y in ((5, 5), (5, 15), (15, 15))]
    assert brightness == sorted(brightness) and brightness[0] < brightness[-1]  # dark low, bright high
    assert img.getpixel((10, 0)) == (255, 255, 255)  # the marked cell's outline


@pytest.mark.smollm2
def test_sinks_report_text_lm(tmp_path, capsys):
    assert main(["sinks", "--model", "smollm2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "sinks.json").read_text())
    assert report["sink_dims"] == [507] and "sink dims: [507]" in out
    middle = next(r for r in report["layers"] if r["layer"] == 15)
    assert 0 in middle["sinks"] and middle["tokens"][0] == "<|im_start|>"  # the first token is a text sink


@pytest.mark.smollm2
def test_sinks_report_vlm_writes_heatmap(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (120, 80), (30, 140, 200)).save(image)
    assert main(["sinks", "--model", "smollm2-llava", "--image", str(image), "--out", str(tmp_path),
                 "--layer", "5"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "sinks.json").read_text())
    assert report["image_tokens"] == 576 and report["grids"] == [[24, 24]]
    assert [r["layer"] for r in report["layers"]] == list(range(2, 30))
    assert all(r["share_of_image_attention"] is None or 0 <= r["share_of_image_attention"] <= 1
               for r in report["layers"])
    heat = Image.open(report["heatmap"])
    assert heat.size[0] == 24 * 24 and "image attention on sinks" in out


def test_sinks_bad_arguments(tmp_path, capsys):
    assert main(["sinks", "--tau", "-3", "--out", str(tmp_path)]) == 2
    assert "tau must be > 0" in capsys.readouterr().err
    assert main(["sinks", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "cannot find model" in capsys.readouterr().err


@pytest.mark.smollm2
def test_generate_with_var_writes_heatmap(tmp_path, capsys):
    assert main(["generate", "--model", "smollm2-llava", "--method", "var", "--max-new-tokens", "4",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "generate.json").read_text())
    assert result["plain"]["text"] and result["fixed"]["text"] and "VAR(" in result["methods"][0]
    assert "var (" in out and (tmp_path / "var_moved.png").is_file()


def test_method_specs():
    from vlmfix.methods import parse_methods

    var, = parse_methods("var:vision-centric")
    assert var.rho == 0.9 and var.tau is None
    assert parse_methods("none") == []
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("foo")
    with pytest.raises(ValueError, match="unknown var preset"):
        parse_methods("var:bar")


@pytest.mark.smollm2
def test_generate_with_gift_writes_saliency_map(tmp_path, capsys):
    assert main(["generate", "--model", "smollm2-llava", "--method", "gift", "--max-new-tokens", "2",
                 "--prompt", "Is there a red ball next to the yellow box?", "--out", str(tmp_path)]) == 0
    assert "GIFT saliency" in capsys.readouterr().out
    assert Image.open(tmp_path / "gift_saliency.png").size[0] == 24 * 24


def test_version(capsys):
    from vlmfix import __version__
    from vlmfix.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"vlmfix {__version__}"
