"""`vlmfix demo ...`: the showcase on the demo VLM, its training recipe and its results table.

    vlmfix demo                      # describe a bundled EmojiCOCO image: plain, VAR, GIFT, pruning; heat maps
    vlmfix demo train --out DIR      # the training recipe (demo.safetensors, log, loss curve, check)
    vlmfix demo results              # POPE + CHAIR for every method on 500 held-out images -> out/demo-results/results.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from vlmfix.cli.flags import RESUME, add_methods, add_n_images, add_out, add_parser, add_restart, deprecated
from vlmfix.data.prompts import CAPTION_PROMPTS

#: the showcase image: EmojiCOCO world seed 0 (held out from training), this image id
SHOWCASE_IMAGE = 7
#: the method sets the showcase compares by default, and how its table labels them
SHOWCASE_METHODS = ("none", "var", "gift", "fastv:quarter-debiased")
LABELS = {"none": "plain", "var": "VAR", "gift": "GIFT", "fastv:quarter-debiased": "FastV 25 % + debias"}


def cmd_showcase(args: argparse.Namespace) -> int:
    """Generate a description of one image without and with each method set; print them with timings
    (each set warmed up first); write the heat maps of what each method did."""
    import torch

    from vlmfix.core.attach import attach
    from vlmfix.data.world import draw_image
    from vlmfix.adapters.chat import chat_prompt
    from vlmfix.loading import load_for
    from vlmfix.methods import parse_methods
    from vlmfix.viz import map_folders, method_heat_maps

    sets = [(spec, parse_methods(spec)) for spec in args.methods]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, _, objects, _ = draw_image(0, SHOWCASE_IMAGE)
    image_path = out / "image.png"
    image.save(image_path)
    model, processor = load_for("demo")
    inputs = processor(images=image, text=chat_prompt(processor, args.prompt), return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    print(f"image: {image_path} (objects: {', '.join(sorted({o[0] for o in objects}))})")
    print(f"prompt: {args.prompt!r}   (times: one run after a 2-token warm-up of the same method)\n")
    maps: list[str] = []
    folders = map_folders(args.methods, out)
    for spec, methods in sets:
        with attach(model, processor, methods) as fixed, torch.no_grad():
            fixed.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
            start = time.perf_counter()
            ids = fixed.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - start
            state = fixed.last_state
        text = processor.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)[0].strip()
        label = LABELS.get(spec, spec)
        print(f"{label:<22} {seconds:5.2f} s  {text}")
        if methods:
            maps += method_heat_maps(state, processor, inputs, image, folders[spec], hints={
                "tau_hint": "`vlmfix generate --tau`", "dims_hint": "`vlmfix generate --sink-dims`"})
    print()
    for line in maps:
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vlmfix.demo.train import Recipe, train

    overrides = {k: v for k, v in {"steps": args.steps, "pretrain_steps": args.pretrain_steps,
                                   "n_images": args.n_images, "seed": args.seed}.items() if v is not None}
    train(args.out, replace(Recipe(), **overrides), device=args.device)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from vlmfix.demo.results import run_results

    run_results(args.out, args.doc, images=args.n_images, batch_size=args.batch_size, weights=args.weights,
                max_new_tokens=args.max_new_tokens, command=shlex.join(["vlmfix", *sys.argv[1:]]),
                restart=args.restart)
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    d = add_parser(sub, "demo", "the demo VLM: the showcase (default), `demo train`, `demo results`",
                   description="Describe a held-out EmojiCOCO scene with the bundled demo VLM, plain and with each "
                   "method set, with timings and heat maps. `vlmfix demo train` and `vlmfix demo results` are its "
                   "training recipe and its results table.")
    add_out(d, "out/demo", "folder for the image and the heat maps")
    d.add_argument("--prompt", default=CAPTION_PROMPTS[0], help="the user's text")
    add_methods(d, list(SHOWCASE_METHODS), "method sets to run, side by side")
    d.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="tokens to generate")
    d.set_defaults(func=cmd_showcase)
    actions = d.add_subparsers(dest="action", metavar="ACTION")
    t = add_parser(actions, "train", "run the demo VLM's training recipe (seeded; resumes a stopped run)")
    add_out(t, "out/demo-train", "folder for demo.safetensors, the log, the loss curve and the check")
    t.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    t.add_argument("--steps", type=int, help="stage-2 steps (default: the recipe's)")
    t.add_argument("--pretrain-steps", type=int, help="stage-1 steps (default: the recipe's)")
    add_n_images(t, None, "training scenes (default: the recipe's)")
    t.add_argument("--seed", type=int, help="training seed (default: the recipe's)")
    t.set_defaults(func=cmd_train, resume="rerun the same command to resume from the last checkpoint")
    r = add_parser(actions, "results", "POPE + CHAIR for every method on held-out images -> <out>/results.md")
    add_out(r, "out/demo-results", "results folder (resumable)")
    r.add_argument("--doc", default=None, help="where the markdown report goes (default <out>/results.md; "
                                              "docs/results.md regenerates the committed report)")
    add_n_images(r, 500, "held-out images (world seed 0)")
    deprecated(r, "--images", "--n-images", "n_images", type=int)
    r.add_argument("--batch-size", type=int, help="default: 128 with a GPU, 16 on the CPU")
    r.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="caption length for CHAIR")
    r.add_argument("--weights", metavar="FILE", help="a demo.safetensors (default: the committed one)")
    add_restart(r)
    r.set_defaults(func=cmd_results, resume=RESUME)
