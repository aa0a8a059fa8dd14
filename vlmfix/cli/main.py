"""The `vlmfix` command line (the flags every subcommand shares: `vlmfix.cli.flags`).

    vlmfix sinks --model smollm2                      # sink dims + text sink tokens of a text LM
    vlmfix sinks --model PATH --image IMG --prompt T  # + visual sinks, their attention share, a heat map
    vlmfix generate --methods var gift --image IMG    # plain vs each method set, side by side, + heat maps
    vlmfix world --out DIR --n-images N --seed S      # an EmojiCOCO split with its POPE files
    vlmfix demo                                       # the demo VLM: plain vs VAR, GIFT, pruning; heat maps
    vlmfix eval pope|chair|amber --model M --data DIR # POPE / CHAIR / AMBER (resumable)
    vlmfix compare --methods none var gift --tasks pope chair --data DIR   # a grid and its report
    vlmfix calibrate-trend --model M --data DIR       # fit a pruner's position trend, write its preset

Nothing heavy is imported before the arguments are parsed: torch and transformers load inside the
commands, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from vlmfix.cli.flags import HelpFormatter, add_methods, add_model, add_out, add_parser, deprecated, quiet_loaders
from vlmfix.data.prompts import CAPTION_PROMPTS



def _default_image():
    """The demo's showcase picture: an EmojiCOCO scene held out from the demo model's training."""
    from vlmfix.data.world import draw_image
    from vlmfix.cli.demo import SHOWCASE_IMAGE

    return draw_image(0, SHOWCASE_IMAGE)[0]


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def _shown(piece: str) -> str:
    """A token as text, quoted, with whitespace visible: ' the' -> " the", a newline -> "\n"."""
    return json.dumps(piece, ensure_ascii=False)


def _text_report(model, tokenizer, prompt: str, tau: float | str | None, sink_dims: list[int] | None) -> dict:
    import torch

    from vlmfix.core.presets import model_preset
    from vlmfix.core.sinks import check_tau, find_sink_dims, sink_scores
    from vlmfix.core.state import FIRST_SINK_LAYER, above_threshold

    hidden_size = model.config.hidden_size
    preset = model_preset(str(getattr(model.config, "_name_or_path", "")), hidden_size)
    tau = check_tau(tau if tau is not None else (preset["tau"] if preset else "scaled"), hidden_size)
    if sink_dims and not all(0 <= d < hidden_size for d in sink_dims):
        raise ValueError(f"--sink-dims must be indices below the hidden size {hidden_size}, got {sink_dims}")
    dims = tuple(sink_dims) if sink_dims else find_sink_dims(model, tokenizer)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    layers = []
    for layer in range(FIRST_SINK_LAYER, len(model.get_decoder().layers)):
        phi = sink_scores(hidden[layer][0], dims)
        sinks = above_threshold(phi[None], tau, torch.zeros(1, dtype=torch.long))[0].nonzero().flatten().tolist()
        layers.append({"layer": layer, "sinks": sinks, "tokens": [tokens[i] for i in sinks],
                       "first_token_phi": round(float(phi[0]), 2)})
    return {"sink_dims": list(dims), "tau": tau, "prompt_tokens": len(tokens), "layers": layers}


def _vlm_report(model, processor, image, prompt: str, tau: float | str | None, sink_dims: list[int] | None, out: Path,
                layer: int | None) -> dict:
    import torch

    from vlmfix.core.attach import attach
    from vlmfix.adapters.chat import chat_prompt
    from vlmfix.core.state import FIRST_SINK_LAYER
    from vlmfix.methods import build
    from vlmfix.viz import image_view, sink_heatmap

    inputs = processor(images=image, text=chat_prompt(processor, prompt, True), return_tensors="pt")
    with attach(model, processor, build("sink_share"), tau=tau, sink_dims=sink_dims) as fixed, torch.no_grad():
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
        share = state.records[0].row(0)["share"].get(lay, float("nan"))
        phi_img = state.phi[lay][0, row.image_positions]
        report["layers"].append({
            "layer": lay, "visual_sinks": len(state.visual_sinks(lay, 0)),
            "share_of_image_attention": None if share != share else round(share, 4),
            "max_image_phi": round(float(phi_img.max()), 2), "first_token_phi": round(float(state.phi[lay][0, 0]), 2),
        })
    if layer is None:  # the layer with the most visual sinks
        layer = max(report["layers"], key=lambda r: (r["visual_sinks"], -r["layer"]))["layer"]
    elif layer not in state.phi:
        raise ValueError(f"--layer must be one of the decoder layers {FIRST_SINK_LAYER}..{max(state.phi)}")
    view, pad = image_view(inputs, processor, image, row)
    report["heatmap"] = str(sink_heatmap(state, layer, out / f"sinks_layer{layer}.png", view, padding=pad))
    return report


def _open_image(path: str | None):
    from PIL import Image

    if not path:
        return _default_image()
    if not Path(path).is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    return Image.open(path).convert("RGB")


def cmd_sinks(args: argparse.Namespace) -> int:
    from vlmfix.loading import load_for
    from vlmfix.core.sinks import check_tau

    if args.tau is not None:
        check_tau(args.tau, hidden_size=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before the model loads
    model, processor = load_for(args.model)
    is_vlm = hasattr(processor, "image_processor")
    if is_vlm:
        report = _vlm_report(model, processor, _open_image(args.image), args.prompt, args.tau, args.sink_dims, out,
                             args.layer)
    else:
        from vlmfix.adapters.chat import chat_prompt

        if args.image:
            print(f"note: {args.model} is a text-only LM; --image is ignored", file=sys.stderr)
        report = _text_report(model, processor, chat_prompt(processor, args.prompt, False), args.tau, args.sink_dims)
    report["model"] = args.model
    (out / "sinks.json").write_text(json.dumps(report, indent=2))
    print(f"model: {args.model}")
    print(f"sink dims: {report['sink_dims']}" + (f" ({report['sink_dims_source']})" if "sink_dims_source" in report else ""))
    tau = report["tau"]
    print(f"tau: {tau:.2f}" if isinstance(tau, float) else f"tau: {tau}")
    if is_vlm:
        print(f"image tokens: {report['image_tokens']} (grids {report['grids']})")
        rows = [(r["layer"], r["visual_sinks"], "-" if r["share_of_image_attention"] is None
                 else f"{100 * r['share_of_image_attention']:.1f}%", f"{r['max_image_phi']:.1f}",
                 f"{r['first_token_phi']:.1f}") for r in report["layers"]]
        print(_table(["layer", "visual sinks", "image attention on sinks", "max image phi", "first-token phi"], rows))
        if not report["sink_dims"]:
            print(f"no sink dims ({report['sink_dims_source']}): phi is 0 for every token, so no token is a sink at "
                  "any tau; --sink-dims sets them")
        elif not any(r["visual_sinks"] for r in report["layers"]):
            top = max(r["max_image_phi"] for r in report["layers"])
            print(f"no visual sinks at tau={tau if isinstance(tau, str) else f'{tau:.2f}'} in any layer "
                  f"(largest image phi {top:.1f}); --tau sets another threshold")
        print(f"heat map: {report['heatmap']}")
    else:
        rows = [(r["layer"], len(r["sinks"]), " ".join(_shown(t) for t in r["tokens"][:6])
                 + (" ..." if len(r["tokens"]) > 6 else ""), f"{r['first_token_phi']:.1f}") for r in report["layers"]]
        print(_table(["layer", "text sinks", "sink tokens", "first-token phi"], rows))
    print(f"report: {out / 'sinks.json'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from vlmfix.core.attach import attach
    from vlmfix.adapters.chat import chat_prompt
    from vlmfix.loading import load_for
    from vlmfix.methods import parse_methods, parse_settings, with_settings
    from vlmfix.core.sinks import check_tau
    from vlmfix.viz import map_folders, method_heat_maps

    settings = parse_settings(args.settings)  # bad specs and settings fail before the model loads
    tau = args.tau if args.tau is not None else settings.get("", {}).get("tau")
    sets = [(spec, with_settings(parse_methods(spec), settings)) for spec in args.methods]
    if tau is not None:
        check_tau(tau, hidden_size=1)
    image = _open_image(args.image)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before the model loads
    model, processor = load_for(args.model, needs_vlm="generate")
    inputs = processor(images=image, text=chat_prompt(processor, args.prompt, True), return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    def run(m):
        start = time.perf_counter()
        with torch.no_grad():
            ids = m.generate(**inputs, **settings)
        return processor.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)[0].strip(), time.perf_counter() - start

    with torch.no_grad():  # warm-up, so the first timing is not the slowest for no reason of its own
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    plain, t_plain = run(model)
    print(f"model: {args.model}   prompt: {args.prompt!r}")
    print(f"{'plain':<16} {t_plain:5.2f} s  {plain}")
    runs, notes = [], []
    folders = map_folders(args.methods, out)
    written: dict[Path, str] = {}  # heat maps of earlier sets: a later set's map of the same name goes to its folder
    for spec, methods in sets:
        with attach(model, processor, methods, sink_dims=args.sink_dims, tau=tau) as fixed:
            text, seconds = run(fixed)
            state = fixed.last_state
        print(f"{spec:<16} {seconds:5.2f} s  {text}")
        runs.append({"methods": spec, "configs": [repr(m) for m in methods], "text": text, "seconds": seconds,
                     "sink_dims": list(fixed.sink_dims), "sink_dims_source": fixed.sink_source,
                     "records": [r.to_json() for r in state.records if r is not None]})
        lines = method_heat_maps(state, processor, inputs, image, folders[spec],
                                 hints={"tau_hint": "--tau", "dims_hint": "--sink-dims"}, written=written, label=spec)
        if fixed.sink_source == "discovered" and not fixed.sink_dims:
            lines.insert(0, "sink-dim discovery found none in this model, so phi is 0 for every token and no token "
                         "is a sink at any tau; --sink-dims sets them")
        notes += [f"{spec}: {line}" if len(sets) > 1 else line for line in lines]
    print()
    for line in notes:
        print(line)
    (out / "generate.json").write_text(json.dumps(
        {"model": args.model, "prompt": args.prompt, "plain": {"text": plain, "seconds": t_plain}, "runs": runs},
        indent=2))
    print(f"report: {out / 'generate.json'}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from vlmfix.data.world import WorldExists
    from vlmfix.data.world import main as world

    if args.n_images < 1:
        raise ValueError(f"--n-images must be >= 1, got {args.n_images}")
    try:
        world(args.out, args.n_images, args.seed, overwrite=args.overwrite)
    except WorldExists as err:
        raise ValueError(f"{err.filename} is not empty; pass --overwrite to replace the EmojiCOCO world in it, or "
                         "choose another --out") from None
    return 0


def _add_sink_flags(parser: argparse.ArgumentParser) -> None:
    """The sink-detection flags of `sinks` and `generate`: --tau and --sink-dims."""
    parser.add_argument("--tau", help="sink threshold on phi: a number, 'scaled' (20*sqrt(d/4096)) or 'bos:F' "
                        "(F x the first token's phi); default: the model preset, else 'scaled'")
    parser.add_argument("--sink-dims", type=int, nargs="+", metavar="D",
                        help="the LM's sink dimensions (indices into its hidden state); default: the model preset, "
                        "else found by vlmfix.find_sink_dims (a small or random model may have none, and then phi "
                        "is 0 for every token)")


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods (vlmfix's and the plug-ins' through the `vlmfix.methods` entry points)."""
    from vlmfix.core.presets import method_presets
    from vlmfix.methods import methods

    for entry in methods().values():
        if not entry.listed:
            continue
        default, names = method_presets(entry.name)
        shown = ", ".join(f"{n} (default)" if n == default else n for n in names) or "none"
        print(f"{entry.name:<10} vlmfix.{entry.config.__name__} ({entry.config.__module__})")
        if entry.summary:
            print(f"{'':<10} {entry.summary}")
        print(f"{'':<10} presets: {shown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vlmfix import __version__
    from vlmfix.cli.calibrate import add_calibrate_parser
    from vlmfix.cli.compare import add_compare_parser
    from vlmfix.cli.eval import add_eval_parser
    from vlmfix.cli.demo import add_demo_parser

    parser = argparse.ArgumentParser(prog="vlmfix", description="Attention-sink tools for transformers VLMs: find "
                                     "sinks, mitigate hallucination (VAR, GIFT), prune image tokens, evaluate "
                                     "(POPE, CHAIR).", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"vlmfix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = add_parser(sub, "sinks", "report sink dimensions, visual sink tokens and their attention share")
    add_model(p, what="an LM or a VLM")
    p.add_argument("--image", metavar="FILE", help="image file (VLMs; default: the demo's EmojiCOCO showcase scene)")
    p.add_argument("--prompt", default=CAPTION_PROMPTS[0], help="the user's text")
    _add_sink_flags(p)
    p.add_argument("--layer", type=int, help="layer of the heat map (default: the one with most visual sinks)")
    add_out(p, "out/sinks", "folder for sinks.json and the heat map")
    p.set_defaults(func=cmd_sinks)

    g = add_parser(sub, "generate", "generate without and with each method set, side by side, with heat maps")
    add_model(g)
    g.add_argument("--image", metavar="FILE", help="image file (default: the demo's EmojiCOCO showcase scene)")
    g.add_argument("--prompt", default=CAPTION_PROMPTS[0], help="the user's text")
    add_methods(g, ["var"], "method sets to compare with the plain model, each run on its own")
    deprecated(g, "--method", "--methods (several sets: --methods var gift var,gift)", "methods", type=lambda s: [s])
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate")
    g.add_argument("--set", dest="settings", nargs="+", metavar="NAME.PARAM=VALUE",
                   help="method parameters, applied to every method set holding the method: e.g. var.p=0.4 "
                   "gift.alpha=3 (an unknown method or parameter is an error listing what exists)")
    _add_sink_flags(g)
    add_out(g, "out/generate", "folder for generate.json and the heat maps (one sub-folder per set when a method is in two sets)")
    g.set_defaults(func=cmd_generate)

    w = add_parser(sub, "world", "write an EmojiCOCO split: images, COCO instances/captions, POPE files")
    add_out(w, "out/world", "output folder")
    w.add_argument("--n-images", type=int, default=500, metavar="N", help="number of images to draw")
    deprecated(w, "--images", "--n-images", "n_images", type=int)
    w.add_argument("--seed", type=int, default=0, help="world seed (the demo trained on seed 1; seed 0 is held out)")
    w.add_argument("--overwrite", action="store_true",
                   help="replace the EmojiCOCO world already in --out (its images and files; nothing else is touched)")
    w.set_defaults(func=cmd_world)

    m = add_parser(sub, "methods", "list the registered methods (built in and plug-ins) and their presets")
    m.set_defaults(func=cmd_methods)

    add_calibrate_parser(sub)
    add_demo_parser(sub)
    add_eval_parser(sub)
    add_compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. A user error (bad input, a file that cannot be read or written) is one
    `vlmfix: error:` line and exit code 2; Ctrl-C is one line saying how to resume, exit code 130."""
    args = build_parser().parse_args(argv)
    quiet_loaders(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = getattr(args, "resume", "")
        if hint and getattr(args, "restart", False):
            hint += " (without --restart, which starts afresh)"
        print(f"vlmfix: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        said = str(err)
        if isinstance(err, OSError) and err.filename and err.strerror:  # "[Errno 20] ..." -> "PATH: what is wrong"
            a_file = isinstance(err, FileExistsError) and Path(err.filename).is_file()
            said = f"{err.filename}: {'a file, not a folder' if a_file else err.strerror}"
        print(f"vlmfix: error: {' '.join(said.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
