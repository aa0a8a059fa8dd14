"""One CLI grammar: every subcommand names the same thing with the same flag, every flag has help
text, old spellings still work with a deprecation note, and `--help` loads neither torch nor
transformers."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from vlmfix.cli.main import build_parser, main

#: destination -> the one flag that sets it, wherever a subcommand has it
CANONICAL = {"model": "--model", "methods": "--methods", "n_images": "--n-images", "out": "--out",
             "prompt": "--prompt", "max_new_tokens": "--max-new-tokens", "batch_size": "--batch-size",
             "seed": "--seed", "verbose": "--verbose", "world": "--data", "images": "--image-dir"}
#: old spellings kept for one version
DEPRECATED = {"--method", "--images", "--n", "--question"}


def subcommands(parser: argparse.ArgumentParser, path=()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(((*path, name), sub))
                found += subcommands(sub, (*path, name))
    return found


COMMANDS = subcommands(build_parser())


def test_every_command_is_covered():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"sinks", "generate", "world", "calibrate-trend", "demo", "demo train", "demo results", "eval pope",
            "eval chair", "eval amber", "compare"} <= names


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_common_flags_have_one_name_and_help(path, parser):
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert any(a.dest == "verbose" for a in options), "every subcommand takes --verbose"
    for action in options:
        assert action.help and action.help.strip(), f"{path}: {action.option_strings} has no help text"
        old = set(action.option_strings) & DEPRECATED
        if old:
            assert "deprecated" in action.help
            continue
        if action.dest in CANONICAL:
            assert action.option_strings == [CANONICAL[action.dest]], f"{path}: {action.option_strings}"
    # help shows the defaults
    text = parser.format_help()
    for action in options:
        if action.default not in (None, False, argparse.SUPPRESS) and not set(action.option_strings) & DEPRECATED:
            assert "(default: " in text


def test_deprecated_spellings_still_work(capsys):
    args = build_parser().parse_args(["world", "--images", "7"])
    assert args.n_images == 7 and "--images is deprecated" in capsys.readouterr().err
    args = build_parser().parse_args(["calibrate-trend", "--model", "m", "--data", "d", "--n", "3", "--question", "q"])
    assert (args.n_images, args.prompt) == (3, "q")
    args = build_parser().parse_args(["generate", "--method", "var,gift"])
    assert args.methods == ["var,gift"]
    args = build_parser().parse_args(["eval", "pope", "--images", "/coco"])
    assert args.images == "/coco"


def test_world_count_must_be_positive(capsys, tmp_path):
    assert main(["world", "--out", str(tmp_path), "--n-images", "0"]) == 2
    assert "--n-images must be >= 1, got 0" in capsys.readouterr().err


def test_help_is_fast_and_light():
    code = ("import sys; from vlmfix.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"building the parser imported {out.strip()}"
    done = subprocess.run([sys.executable, "-m", "vlmfix", "eval", "pope", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--n-images" not in done.stdout and "--limit N" in done.stdout
