"""The flags every `vlmfix` subcommand shares, so one thing has one name everywhere.

- `--model NAME|PATH`: a named test-bed (`demo`, `smollm2`, ...), a local folder or a hub id;
- `--methods SET [SET ...]`: method sets, each `NAME[:PRESET]` joined by commas (`var`, `var,gift`,
  `fastv:keep64`; `none` is the model alone);
- `--n-images N`: how many images to use or make. A count larger than the data holds is an error that
  says how many there are; nothing is capped silently;
- `--data DIR`: an EmojiCOCO folder (`vlmfix world`); `--image-dir DIR`: a real dataset's images;
- `--out DIR`: where results go (always under `out/` by default, never a committed file); a rerun
  of a resumable command resumes, `--restart` starts afresh, `vlmfix world --overwrite` replaces a world;
- `--prompt TEXT`, `--max-new-tokens N`, `--batch-size N`, `--seed S`;
- `--verbose`: show the model loaders' progress bars and warnings (quiet by default).

The old spellings (`--method`, `--images N`, `--n`, `--question`, `eval --images DIR`) still work in
this version and print a deprecation note.

Only the standard library is imported here, so `vlmfix --help` answers without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """Help lines that end with the flag's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
            and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text += f" (default: {shown})"
        return text


def common_parser() -> argparse.ArgumentParser:
    """The parent of every subcommand's parser: `--verbose`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--verbose", action="store_true",
                        help="show model-loading progress bars and library warnings (quiet by default)")
    return parent


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser with the common flags and the defaults-showing help."""
    return sub.add_parser(name, help=help, description=kwargs.pop("description", help[:1].upper() + help[1:] + "."),
                          parents=[common_parser()], formatter_class=HelpFormatter, **kwargs)


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new flag's destination and prints a deprecation note."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"vlmfix: note: {option_string} is deprecated and will be removed in the next version; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept `old` as a deprecated spelling of `new` (same destination)."""
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new, default=argparse.SUPPRESS,
                        help=f"deprecated spelling of {new}", **kwargs)


def add_model(parser: argparse.ArgumentParser, default: str | None = "demo", required: bool = False,
              what: str = "a VLM") -> None:
    from vlmfix.loading import NAMED

    parser.add_argument("--model", default=None if required else default, required=required, metavar="NAME|PATH",
                        help=f"{what}: a local folder with config.json, a hub id (downloaded unless "
                        f"HF_HUB_OFFLINE=1), or one of: {', '.join(NAMED)}")


def add_methods(parser: argparse.ArgumentParser, default: list[str] | None, several: str) -> None:
    parser.add_argument("--methods", nargs="+", default=default, metavar="SET",
                        help=f"{several}; a set is NAME[:PRESET] joined by commas, e.g. none, var, var:general, gift, "
                        "var,gift, fastv:keep64, fastv:quarter-debiased, staged; `vlmfix methods` lists every "
                        "registered method and its presets (configs/methods/NAME.yaml)")


def add_settings(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """`--set NAME.PARAM=VALUE ...` (and `--tau`): method parameters without a YAML file."""
    parser.add_argument("--set", dest="settings", nargs="+", metavar="NAME.PARAM=VALUE",
                        help="method parameters, applied to every method set holding the method: e.g. var.p=0.4 "
                        "gift.alpha=3 (an unknown method or parameter is an error listing what exists)")
    parser.add_argument("--tau", help="sink threshold on phi: a number, 'scaled' (20*sqrt(d/4096)) or 'bos:F' "
                        "(F x the first token's phi); default: the model preset, else 'scaled'")


def add_n_images(parser: argparse.ArgumentParser, default: int | None, what: str) -> None:
    parser.add_argument("--n-images", type=int, default=default, metavar="N",
                        help=f"{what}; more than the data holds is an error")


def add_out(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    parser.add_argument("--out", default=default, metavar="DIR", help=what)


#: what a resumable command says when it is interrupted (Ctrl-C)
RESUME = "rerun the same command to resume: finished items are kept"


def add_restart(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--restart", action="store_true",
                        help="discard the results already in --out for these method sets and start afresh (without "
                        "it a rerun resumes, and results made with other data or settings are refused)")


def quiet_loaders(verbose: bool) -> None:
    """Unless `verbose`, silence the hub's and transformers' progress bars and info/warning logs
    (set before transformers is imported; a later import reads them)."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
