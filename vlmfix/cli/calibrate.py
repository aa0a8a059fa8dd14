"""`vlmfix calibrate-trend`: fit a pruner's position trend on an EmojiCOCO folder and write its preset
(the fit itself: `vlmfix.eval.calibrate`)."""

from __future__ import annotations

import argparse

from vlmfix.cli.flags import add_model, add_n_images, add_out, add_parser, deprecated
from vlmfix.data.prompts import CAPTION_PROMPTS


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    """Register `vlmfix calibrate-trend` on the CLI's subparsers."""
    c = add_parser(sub, "calibrate-trend", "fit a pruner's position trend on a calibration set, write its preset")
    add_model(c, required=True)
    c.add_argument("--data", required=True, metavar="DIR",
                   help="an EmojiCOCO folder (`vlmfix world`): images/ and instances.json")
    c.add_argument("--pruner", default="fastv",
                   help="the pruner whose scores are fitted: a registered pruner's name (an unknown one is refused "
                   "with the list), or NAME:PRESET of configs/methods (its first layer is the one scored)")
    c.add_argument("--family", default="exp", choices=("exp", "cubic"), help="trend family")
    add_n_images(c, 100, "calibration images, the first N by id")
    deprecated(c, "--n", "--n-images", "n_images", type=int)
    c.add_argument("--prompt", default=CAPTION_PROMPTS[0], help="the user's text with each image")
    deprecated(c, "--question", "--prompt", "prompt")
    c.add_argument("--match", help="comma-separated model-name substrings the preset applies to "
                   "(default: the model's name)")
    add_out(c, None, "the preset file (default: out/trends/<model>__<pruner>.yaml)")
    c.set_defaults(func=cmd_calibrate_trend)


def cmd_calibrate_trend(args: argparse.Namespace) -> int:
    from vlmfix.eval.calibrate import (calibrate, image_inputs, model_name, preset_path, scoring_pruner, world_images,
                                       write_preset)
    from vlmfix.loading import load_for

    paths = world_images(args.data, args.n_images)  # data and pruner are checked before the model loads
    pruner = scoring_pruner(args.pruner)
    model, processor = load_for(args.model, needs_vlm="calibrate-trend")
    cal = calibrate(model, processor, image_inputs(processor, paths, args.prompt), pruner, args.family,
                    progress=True, total=len(paths))
    name = model_name(model, args.model)
    match = [m.strip() for m in (args.match or "").split(",") if m.strip()] or [name]
    layer = min(pruner.stage_layers())
    path = preset_path(match[0], pruner.preset_key, args.out)
    about = (f"model {args.model}, {cal.images} images of {args.data}, question {args.prompt!r}, "
             f"{pruner.preset_key} stage layer {layer} (scores at layer {layer - 1})")
    write_preset(path, cal, match=match, pruner=pruner.preset_key, about=about)
    params = ", ".join(f"{k} {v:.4g}" for k, v in cal.trend.named().items())
    print(f"{cal.trend.family} trend over {cal.images} images: {params}; RMS residual {cal.rms:.4g}, R^2 {cal.r2:.4f}")
    print(f"preset: {path} (match: {', '.join(match)})")
    print(f"use it: export VLMFIX_TRENDS={path.parent.resolve()}  (Debias then finds it by model name), "
          f"or vlmfix.Debias(trend={str(path)!r})")
    return 0
