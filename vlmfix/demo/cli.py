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
from typing import Any

import torch

#: the showcase image: EmojiCOCO world seed 0 (held out from training), this image id
SHOWCASE_IMAGE = 7
SHOWCASE_METHODS = (("plain", "none"), ("VAR", "var"), ("GIFT", "gift"), ("FastV 25 % + debias", "fastv:quarter-debiased"))


@torch.no_grad()
def cmd_showcase(args: argparse.Namespace) -> int:
    """Generate a description of one image without and with each method; print them with timings;
    write the heat maps (visual sinks, GIFT saliency, kept tokens)."""
    from ..attach import attach
    from ..methods import parse_methods
    from ..data.world import draw_image
    from ..loading import chat_prompt
    from ..viz import model_view
    from .load import load_demo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, _, objects, _ = draw_image(0, SHOWCASE_IMAGE)
    image_path = out / "image.png"
    image.save(image_path)
    model, processor = load_demo()
    inputs = processor(images=image, text=chat_prompt(processor, args.prompt), return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    view = model_view(inputs["pixel_values"][0], processor) or image
    print(f"image: {image_path} (objects: {', '.join(sorted({o[0] for o in objects}))})")
    print(f"prompt: {args.prompt!r}\n")
    maps: list[str] = []
    for label, spec in SHOWCASE_METHODS:
        methods = parse_methods(spec)
        with attach(model, processor, methods) as fixed:
            start = time.perf_counter()
            ids = fixed.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - start
            state = fixed.last_state
            text = processor.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)[0].strip()
            print(f"{label:<22} {seconds:5.2f} s  {text}")
            maps += _heat_maps(state, spec, out, view)
    print()
    for line in maps:
        print(line)
    return 0


def _heat_maps(state: Any, spec: str, out: Path, view: Any) -> list[str]:
    """The heat map of what method set `spec` did in the call of `state` (written under `out`), as lines to print."""
    from ..methods.prune import prune_record
    from ..viz import kept_heatmap, saliency_heatmap, sink_heatmap

    lines = []
    if spec == "var" and state.phi:
        layer = sorted(state.phi)[len(state.phi) // 2]
        lines.append(f"heat map, visual sinks (layer {layer}): {sink_heatmap(state, layer, out / 'sinks.png', view)}")
    if spec == "gift":
        from ..methods import GIFT

        if GIFT.saliency(state) is not None:
            lines.append(f"heat map, GIFT saliency: {saliency_heatmap(state, out / 'gift_saliency.png', view)}")
        else:
            lines.append(f"GIFT: {state.record(GIFT).note(0)}")
    if spec.startswith("fastv") and prune_record(state).stages:
        lines.append(f"heat map, kept image tokens: {kept_heatmap(state, out / 'kept_tokens.png', view)}")
    return lines


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .train import Recipe, train

    overrides = {k: v for k, v in {"steps": args.steps, "pretrain_steps": args.pretrain_steps,
                                   "n_images": args.n_images, "seed": args.seed}.items() if v is not None}
    train(args.out, replace(Recipe(), **overrides), device=args.device)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from .results import run_results

    run_results(args.out, args.doc, images=args.images, batch_size=args.batch_size, weights=args.weights,
                max_new_tokens=args.max_new_tokens, command=shlex.join(["vlmfix", *sys.argv[1:]]))
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the demo VLM: showcase (default), `demo train`, `demo results`")
    d.add_argument("--out", default="out/demo", help="folder for the image and heat maps")
    d.add_argument("--prompt", default="Please describe this image in detail.")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.set_defaults(func=cmd_showcase)
    actions = d.add_subparsers(dest="action")
    t = actions.add_parser("train", help="run the demo VLM's training recipe (seeded; resumes a stopped run)")
    t.add_argument("--out", default="out/demo-train")
    t.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    t.add_argument("--steps", type=int, help="stage-2 steps (default: the recipe's)")
    t.add_argument("--pretrain-steps", type=int, help="stage-1 steps (default: the recipe's)")
    t.add_argument("--n-images", type=int, help="training scenes (default: the recipe's)")
    t.add_argument("--seed", type=int)
    t.set_defaults(func=cmd_train)
    r = actions.add_parser("results", help="POPE + CHAIR for every method on held-out images -> <out>/results.md")
    r.add_argument("--out", default="out/demo-results", help="results folder (resumable; default out/demo-results)")
    r.add_argument("--doc", default=None, help="where the markdown report goes (default <out>/results.md; "
                                              "docs/results.md regenerates the committed report)")
    r.add_argument("--images", type=int, default=500)
    r.add_argument("--batch-size", type=int, help="default: 128 with a GPU, 16 on the CPU")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--weights", help="a demo.safetensors (default: the committed one)")
    r.set_defaults(func=cmd_results)
