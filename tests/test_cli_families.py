"""`vlmfix sinks` and `vlmfix generate` from the command line on each family's tiny random model, saved
with its tiny processor (tests/families/processors.py) in a local folder passed as `--model DIR`.

A random tiny LM has no sink dimensions to discover, so the runs pass `--sink-dims` and a `--tau` its
phi reaches. Eight families' processors need torchvision in transformers, which this environment
lacks (see tests/families/processors.py): on their folders the CLI must refuse with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from families.processors import SPECS, save
from PIL import Image
from tiny import IMAGE, QUESTION
from transformers import AutoProcessor
from transformers.utils import is_torchvision_available

from vlmfix.adapters import get_adapter
from vlmfix.cli.main import _default_image, main
from vlmfix.adapters.chat import chat_prompt
from vlmfix.loading import load

BUILT = tuple(f for f, spec in SPECS.items() if not spec.needs_torchvision)
NEEDS_TORCHVISION = tuple(f for f, spec in SPECS.items() if spec.needs_torchvision)
DIMS, TAU = [3, 17, 40, 58], 1.5
SINK_FLAGS = ["--sink-dims", *map(str, DIMS), "--tau", str(TAU), "--prompt", QUESTION]
#: (image tokens, grids) each processor writes for the default 336 x 252 scene, worked out by hand
EXPECTED = {
    "llava": (25, [[5, 5]]),  # one 30-px view of 6-px patches, the CLS feature dropped
    # the 5 x 5 base view + the 60 x 60 pinpoint's 10 x 10 patches unpadded to 4:3 (8 rows, each + a newline)
    "llava_next": (25 + 8 * 10 + 8, [[5, 5], [8, 10]]),
    "idefics3": (5 * 4, [[2, 2]] * 5),  # longest edge 48 -> 2 x 2 tiles of 24 px + the global view, 2 x 2 each
    "gemma3": (16, [[4, 4]]),  # one 32-px view pooled to 4 x 4
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """family -> its folder (model + processor saved with save_pretrained), each written once."""
    root, made = tmp_path_factory.mktemp("checkpoints"), {}

    def folder(family: str) -> Path:
        if family not in made:
            made[family] = save(family, root / family)
        return made[family]

    return folder


def written(folder: Path) -> int:
    """The image tokens the folder's processor writes for the CLI's default image and the test question."""
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    inputs = processor(images=_default_image(), text=chat_prompt(processor, QUESTION), return_tensors="pt")
    return int((inputs["input_ids"] == IMAGE).sum())


@pytest.mark.parametrize("family", BUILT)
def test_sinks_from_a_local_folder(family, checkpoint, tmp_path, capsys):
    folder = checkpoint(family)
    assert main(["sinks", "--model", str(folder), *SINK_FLAGS, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sinks.json").read_text())
    n, grids = EXPECTED[family]
    assert report["image_tokens"] == written(folder) == n and report["grids"] == grids
    assert (report["sink_dims"], report["sink_dims_source"], report["tau"]) == (DIMS, "argument", TAU)
    assert [r["layer"] for r in report["layers"]] == [2, 3]
    assert Image.open(report["heatmap"]).format == "PNG"
    assert f"image tokens: {n} " in capsys.readouterr().out


#: each method's heat map and, when it is missing, the start of the line that must say why
MAPS = (("sinks.png", None), ("var_moved.png", "VAR moved no attention: "), ("gift_saliency.png", "GIFT: "),
        ("kept_tokens.png", "pruner: nothing pruned in this call"))


@pytest.mark.parametrize("family", BUILT)
def test_generate_from_a_local_folder(family, checkpoint, tmp_path, capsys):
    specs = ["var", "gift", "fastv:keep64"]
    argv = ["generate", "--model", str(checkpoint(family)), "--methods", *specs, "--max-new-tokens", "2",
            *SINK_FLAGS, "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    runs = json.loads((tmp_path / "generate.json").read_text())["runs"]
    assert [r["methods"] for r in runs] == specs
    assert runs[0]["sink_dims"] == DIMS and runs[0]["sink_dims_source"] == "argument"
    for png, why in MAPS:
        if (tmp_path / png).is_file():
            assert Image.open(tmp_path / png).format == "PNG" and str(tmp_path / png) in printed
        else:
            assert why is not None and why in printed and f"so no {png}" in printed, png
    n = EXPECTED[family][0]
    assert (tmp_path / "kept_tokens.png").is_file() == (n > 64)
    if n <= 64:
        assert f"keep 64 >= its {n} image tokens" in printed


@pytest.mark.parametrize("family", BUILT)
def test_chat_template_query_span_is_the_question(family, checkpoint):
    """The adapter's question on what the saved processor and its chat template write is exactly
    the question (GIFT reads its words)."""
    model, processor = load(str(checkpoint(family)))
    inputs = processor(images=_default_image(), text=chat_prompt(processor, QUESTION), return_tensors="pt")
    row = get_adapter(model, processor).row_layouts(inputs)[0]
    assert "".join(row.query_pieces) == processor.tokenizer.decode(inputs["input_ids"][0, row.query_positions])
    assert "".join(row.query_pieces) == QUESTION


def test_no_sink_dims_found_is_said(checkpoint, tmp_path, capsys):
    """Without --sink-dims a random model's discovery finds none: the report says phi is 0 and names the flag."""
    folder = str(checkpoint("llava"))
    assert main(["sinks", "--model", folder, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sinks.json").read_text())
    assert (report["sink_dims"], report["sink_dims_source"]) == ([], "discovered")
    assert "no sink dims (discovered): phi is 0 for every token" in capsys.readouterr().out
    assert main(["generate", "--model", folder, "--max-new-tokens", "1", "--out", str(tmp_path)]) == 0
    assert "sink-dim discovery found none in this model" in capsys.readouterr().out


def test_sink_dims_outside_the_model_are_refused(checkpoint, tmp_path, capsys):
    assert main(["sinks", "--model", str(checkpoint("llava")), "--sink-dims", "64", "--out", str(tmp_path)]) == 2
    assert "sink dims [64] are outside the hidden size 64" in capsys.readouterr().err


@pytest.mark.skipif(is_torchvision_available(), reason="these processors build where torchvision is installed")
@pytest.mark.parametrize("family", NEEDS_TORCHVISION)
def test_processor_that_needs_torchvision_is_refused(family, checkpoint, tmp_path, capsys):
    spec = SPECS[family]
    needs = spec.video_processor[0] if spec.video_processor else spec.processor
    folder = checkpoint(family)
    for command in (["sinks"], ["generate", "--max-new-tokens", "1"]):
        assert main([*command, "--model", str(folder), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"cannot load the processor of {folder}: {needs} requires the Torchvision library" in err
        assert "install it (torchvision: the build that matches your torch)" in err
