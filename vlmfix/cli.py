"""The `vlmfix` command line.

    vlmfix sinks --model smollm2                      # sink dims + text sink tokens of a text LM
    vlmfix sinks --model PATH --image IMG --prompt T  # + visual sinks, their attention share, a heat map
    vlmfix generate --method var --image IMG          # plain vs with methods, side by side, + heat maps
    vlmfix world --out DIR --images N --seed S        # an EmojiCOCO split with its POPE files
    vlmfix demo                                       # the demo VLM: plain vs VAR, GIFT, pruning; heat maps
    vlmfix calibrate-trend --model M --data DIR       # fit a pruner's position trend, write its preset
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .loading import NAMED, chat_prompt, load

DEFAULT_PROMPT = "Describe the image in detail."


def _default_image():
    """A synthetic picture (until EmojiCOCO images ship with the package): gradient and shapes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (480, 360))
    draw = ImageDraw.Draw(img)
    for y in range(360):
        draw.line([(0, y), (479, y)], fill=(40 + y // 3, 90 + y // 4, 160))
    draw.ellipse([60, 80, 200, 220], fill=(230, 60, 50))
    draw.rectangle([260, 150, 420, 300], fill=(250, 210, 40))
    return img


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


@torch.no_grad()
def _text_report(model, tokenizer, prompt: str, tau: float | str | None) -> dict:
    from .presets import model_preset
    from .sinks import check_tau, find_sink_dims, sink_scores
    from .state import above_threshold

    hidden_size = model.config.hidden_size
    preset = model_preset(str(getattr(model.config, "_name_or_path", "")), hidden_size)
    tau = check_tau(tau if tau is not None else (preset["tau"] if preset else "scaled"), hidden_size)
    dims = find_sink_dims(model, tokenizer)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    hidden = model.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    layers = []
    for layer in range(2, len(model.get_decoder().layers)):
        phi = sink_scores(hidden[layer][0], dims)
        sinks = above_threshold(phi[None], tau, torch.zeros(1, dtype=torch.long))[0].nonzero().flatten().tolist()
        layers.append({"layer": layer, "sinks": sinks, "tokens": [tokens[i] for i in sinks],
                       "first_token_phi": round(float(phi[0]), 2)})
    return {"sink_dims": list(dims), "tau": tau, "prompt_tokens": len(tokens), "layers": layers}


@torch.no_grad()
def _vlm_report(model, processor, image, prompt: str, tau: float | str | None, out: Path, layer: int | None) -> dict:
    from .attach import attach
    from .methods import SinkShare
    from .viz import model_view, sink_heatmap

    inputs = processor(images=image, text=chat_prompt(processor, prompt, True), return_tensors="pt")
    with attach(model, processor, SinkShare(), tau=tau) as fixed:
        fixed(**inputs)
        state = fixed.last_state
        report: dict[str, Any] = {"sink_dims": list(fixed.sink_dims), "sink_dims_source": fixed.sink_source,
                                  "tau": fixed.tau}
    row = state.rows[0]
    n_image = len(row.image_positions)
    report["image_tokens"] = n_image
    report["grids"] = [(s.rows, s.cols) for s in row.segments]
    report["layers"] = []
    for lay in sorted(state.phi):
        share = float(state.record(SinkShare).shares.get(lay, torch.tensor([float("nan")]))[0])
        phi_img = state.phi[lay][0, row.image_positions]
        report["layers"].append({
            "layer": lay, "visual_sinks": len(state.visual_sinks(lay, 0)),
            "share_of_image_attention": None if share != share else round(share, 4),
            "max_image_phi": round(float(phi_img.max()), 2), "first_token_phi": round(float(state.phi[lay][0, 0]), 2),
        })
    if layer is None:  # the layer with the most visual sinks
        layer = max(report["layers"], key=lambda r: (r["visual_sinks"], -r["layer"]))["layer"]
    elif layer not in state.phi:
        raise ValueError(f"--layer must be one of the decoder layers 2..{max(state.phi)}")
    pixel = inputs["pixel_values"][0]
    view = model_view(pixel, processor) if pixel.ndim == 3 else None
    report["heatmap"] = str(sink_heatmap(state, layer, out / f"sinks_layer{layer}.png", view or image))
    return report


def cmd_sinks(args: argparse.Namespace) -> int:
    from .sinks import check_tau

    if args.tau is not None:
        check_tau(args.tau, hidden_size=1)
    out = Path(args.out)
    model, processor = load(args.model)
    is_vlm = hasattr(processor, "image_processor")
    if is_vlm:
        from PIL import Image

        image = Image.open(args.image).convert("RGB") if args.image else _default_image()
        report = _vlm_report(model, processor, image, args.prompt, args.tau, out, args.layer)
    else:
        if args.image:
            print(f"note: {args.model} is a text-only LM; --image is ignored", file=sys.stderr)
        report = _text_report(model, processor, chat_prompt(processor, args.prompt, False), args.tau)
    report["model"] = args.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "sinks.json").write_text(json.dumps(report, indent=2))
    print(f"model: {args.model}")
    print(f"sink dims: {report['sink_dims']}" + (f" ({report['sink_dims_source']})" if "sink_dims_source" in report else ""))
    tau = report["tau"]
    print(f"tau: {tau:.2f}" if isinstance(tau, float) else f"tau: {tau}")
    if is_vlm:
        print(f"image tokens: {report['image_tokens']} (grids {report['grids']})")
        rows = [(r["layer"], r["visual_sinks"], "-" if r["share_of_image_attention"] is None
                 else f"{100 * r['share_of_image_attention']:.1f}%", r["max_image_phi"], r["first_token_phi"])
                for r in report["layers"]]
        print(_table(["layer", "visual sinks", "image attention on sinks", "max image phi", "first-token phi"], rows))
        print(f"heat map: {report['heatmap']}")
    else:
        rows = [(r["layer"], len(r["sinks"]), " ".join(r["tokens"][:6]) + (" ..." if len(r["tokens"]) > 6 else ""),
                 r["first_token_phi"]) for r in report["layers"]]
        print(_table(["layer", "text sinks", "sink tokens", "first-token phi"], rows))
    print(f"report: {out / 'sinks.json'}")
    return 0


@torch.no_grad()
def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from PIL import Image

    from .attach import attach
    from .viz import kept_heatmap, model_view, moved_heatmap, saliency_heatmap

    from .methods import parse_methods

    methods = parse_methods(args.method)
    model, processor = load(args.model)
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"{args.model} is a text-only LM; generate needs a VLM (try --model smollm2-llava)")
    image = Image.open(args.image).convert("RGB") if args.image else _default_image()
    inputs = processor(images=image, text=chat_prompt(processor, args.prompt, True), return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    def run(m):
        start = time.perf_counter()
        out = m.generate(**inputs, **settings)
        return processor.batch_decode(out[:, n_prompt:], skip_special_tokens=True)[0].strip(), time.perf_counter() - start

    plain, t_plain = run(model)
    with attach(model, processor, methods) as fixed:
        text, t_fixed = run(fixed)
        state = fixed.last_state
    label = args.method or "none"
    print(f"model: {args.model}   prompt: {args.prompt!r}")
    print(f"plain ({t_plain:.2f}s): {plain}")
    print(f"{label} ({t_fixed:.2f}s): {text}")
    out = Path(args.out)
    pixel = inputs["pixel_values"][0]
    view = (model_view(pixel, processor) if pixel.ndim == 3 else None) or image
    from .methods import GIFT, VAR, FastVPrune, StagedPrune
    from .methods.prune import prune_record

    if state.has_record(VAR):
        if sum(sum(v["moved"]) for v in VAR.summary(state).values()) > 0:
            print(f"heat map (attention moved by VAR): {moved_heatmap(state, out / 'var_moved.png', view)}")
        else:
            print("VAR: no image-centric head in this call, attention unchanged")
    if state.has_record(GIFT):
        if GIFT.saliency(state) is not None:
            print(f"heat map (GIFT saliency): {saliency_heatmap(state, out / 'gift_saliency.png', view)}")
        else:
            print(f"GIFT: {state.record(GIFT).note(0)}")
    if any(state.has_record(c) for c in (FastVPrune, StagedPrune)) and prune_record(state).stages:
        print(f"heat map (kept image tokens): {kept_heatmap(state, out / 'kept_tokens.png', view)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(
        {"model": args.model, "prompt": args.prompt, "methods": [repr(m) for m in methods],
         "plain": {"text": plain, "seconds": t_plain}, "fixed": {"text": text, "seconds": t_fixed}}, indent=2))
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from .data.world import main as world

    if args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    world(args.out, args.images, args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="vlmfix", description="Attention-sink tools for transformers VLMs.")
    parser.add_argument("--version", action="version", version=f"vlmfix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sinks", help="report sink dimensions, visual sink tokens and their attention share")
    p.add_argument("--model", default="demo",
                   help="local path / cached hub id, or one of: " + "; ".join(f"{k} ({v})" for k, v in NAMED.items()))
    p.add_argument("--image", help="image file (VLMs; default: a synthetic picture)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user's text")
    p.add_argument("--tau", help="sink threshold on phi: a number, 'scaled' (20*sqrt(d/4096)) or 'bos:F' "
                   "(F x the first token's phi); default: the model preset, else 'scaled'")
    p.add_argument("--layer", type=int, help="layer of the heat map (default: the one with most visual sinks)")
    p.add_argument("--out", default="out/sinks", help="folder for sinks.json and the heat map")
    p.set_defaults(func=cmd_sinks)

    g = sub.add_parser("generate", help="generate with and without methods, side by side")
    g.add_argument("--model", default="demo", help="as for `sinks` (a VLM)")
    g.add_argument("--image", help="image file (default: a synthetic picture)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--method", default="var",
                   help="comma-separated methods, each NAME or NAME:PRESET (configs/methods/NAME.yaml), e.g. "
                   "var, var:general, var:vision-centric, gift, gift:mild, var,gift, fastv, fastv:keep64, staged")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--out", default="out/generate", help="folder for generate.json and heat maps")
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("world", help="write an EmojiCOCO split: images, COCO instances/captions, POPE files")
    w.add_argument("--out", required=True, help="output folder")
    w.add_argument("--images", type=int, default=500, help="number of images (default 500)")
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(func=cmd_world)

    from .calibrate import add_calibrate_parser
    from .cli_eval import add_eval_parser
    from .demo.cli import add_demo_parser

    add_calibrate_parser(sub)
    add_demo_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"vlmfix: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
