"""The `vlmfix sinks` command and the heat maps."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmfix.cli.main import main
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
    assert heat.size[0] >= 24 * 16 and "image attention on sinks" in out


def test_sinks_bad_arguments(tmp_path, capsys):
    assert main(["sinks", "--tau", "-3", "--out", str(tmp_path)]) == 2
    assert "tau must be a finite number > 0" in capsys.readouterr().err
    assert main(["sinks", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "cannot find model" in capsys.readouterr().err


@pytest.mark.smollm2
def test_generate_with_var_writes_heatmap(tmp_path, capsys):
    assert main(["generate", "--model", "smollm2-llava", "--methods", "var", "--max-new-tokens", "4",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "generate.json").read_text())
    run, = result["runs"]
    assert isinstance(run["text"], str) and run["seconds"] > 0 and result["plain"]["seconds"] > 0
    assert "VAR(" in run["configs"][0] and run["methods"] == "var"
    assert "attention moved by VAR" in out and (tmp_path / "var_moved.png").is_file()
    assert (tmp_path / "sinks.png").is_file()


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
    captured = capsys.readouterr()
    assert "GIFT saliency" in captured.out and "--method is deprecated" in captured.err  # the old spelling works
    assert Image.open(tmp_path / "gift_saliency.png").size[0] >= 24 * 16


def test_figure_has_a_colour_bar_and_fits_its_title(tmp_path):
    from vlmfix.viz import ColourBar

    values = torch.arange(16.0).view(4, 4)
    title = "a title long enough that it has to wrap onto a second line at the figure's width, " * 2
    path = grid_heatmap(values, tmp_path / "f.png", title=title, bar=ColourBar("units", ((8.0, "tau 8"),)),
                        legend=[("outline", "white outline: marked")], caption=["a caption"], marked=values > 12)
    img = Image.open(path).convert("RGB")
    assert img.size[0] >= 384 and img.size[1] > img.size[0]  # map, bar, legend and caption below a wrapped title
    # the colour bar: one row of the figure runs from dark (left) to bright (right)
    rows = [[sum(img.getpixel((x, y))) for x in range(12, img.size[0] - 12)] for y in range(img.size[1])]
    def ramp(r):  # dark to bright, falling only once (the tau mark's black line)
        return r[0] < 60 and r[-1] > 600 and sum(b < a - 30 for a, b in zip(r, r[1:])) <= 1

    assert any(ramp(r) for r in rows)


@pytest.mark.smollm2
def test_generate_on_the_demo_says_why_var_moved_nothing(tmp_path, capsys):
    assert main(["generate", "--methods", "var", "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "VAR moved no attention: no visual sinks at tau=20.00" in out and "so no var_moved.png" in out
    assert "a lower tau (--tau) finds some" in out and "attach(" not in out  # the flag of this command
    assert (tmp_path / "sinks.png").is_file() and not (tmp_path / "var_moved.png").exists()


def test_sinks_table_shows_tokens_readably():
    from vlmfix.cli.main import _shown

    assert [_shown(p) for p in (" the", "\n", "<|im_start|>")] == ['" the"', '"\\n"', '"<|im_start|>"']


def test_version(capsys):
    from vlmfix import __version__
    from vlmfix.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"vlmfix {__version__}"


def test_hub_ids_load_by_transformers_rules(tmp_path, monkeypatch, capsys):
    """A hub id is downloaded unless HF_HUB_OFFLINE=1 (the tests set it): vlmfix does not force
    local_files_only, and says what to do when offline and the model is not in the local cache."""
    import huggingface_hub
    import transformers

    from vlmfix.loading import load

    assert main(["sinks", "--model", "vlmfix-tests/no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("vlmfix: error") == 1
    assert "cannot find model 'vlmfix-tests/no-such-model' locally, and HF_HUB_OFFLINE=1 forbids downloading it: " \
        "unset HF_HUB_OFFLINE to download it" in err

    seen = []

    def from_pretrained(name, **kwargs):
        seen.append(kwargs)
        raise OSError("vlmfix-tests/gated is not a local folder and is not a valid model identifier. More text")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)  # as for a user with a network
    with pytest.raises(FileNotFoundError, match=r"cannot find model 'vlmfix-tests/gated' on the hub or locally "
                       r"\(vlmfix-tests/gated is not a local folder and is not a valid model identifier\)"):
        load("vlmfix-tests/gated")
    assert seen == [{}]  # no local_files_only: transformers' own rule decides


@pytest.mark.smollm2
def test_generate_keeps_each_sets_heat_map_of_the_same_name(tmp_path, capsys):
    """Two pruners both draw kept_tokens.png: the first set's stays at --out, the second's goes to its own folder
    (nothing is overwritten), and each printed line names the file it wrote."""
    assert main(["generate", "--methods", "pool:quarter", "random:quarter", "--max-new-tokens", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    first, second = tmp_path / "kept_tokens.png", tmp_path / "random_quarter" / "kept_tokens.png"
    assert first.is_file() and second.is_file() and first.read_bytes() != second.read_bytes()
    assert f"pool:quarter: heat map, kept image tokens: {first}" in out
    assert f"random:quarter: heat map, kept image tokens: {second}" in out
