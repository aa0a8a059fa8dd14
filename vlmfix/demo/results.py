"""`vlmfix demo results`: the demo VLM's POPE and CHAIR report for every method, in one run: a preset of
`vlmfix compare` (`vlmfix.eval.compare`).

Held-out data: the EmojiCOCO world with seed 0 (`images` images; training used seed 1). POPE
(random / popular / adversarial questions built from it) and CHAIR (one caption per image, greedy,
`max_new_tokens` 128) run as a compare grid (each cell resumable, intervals and paired tests against the
plain model) for the method sets of `METHOD_SETS`. Then the share of the image attention that visual sinks take is
measured per layer (the `SinkShare` probe, on POPE prompts of the first `share_images` images) and
plotted with the largest sink scores of image and text tokens (`sink_profile`, `sink_plot`). Everything
lands in `out`; `doc` gets the markdown report.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

METHOD_SETS = (
    "none", "var", "gift", "var,gift",
    # decoding baselines (their papers' presets)
    "pai", "vcd", "icd", "m3id", "vaf", "only", "opera",
    # pruners, each keeping a quarter of the image tokens
    "fastv:quarter", "fastv:quarter-debiased", "sparsevlm:quarter", "visionzip:quarter", "divprune:quarter",
    "dart:quarter", "random:quarter", "pool:quarter", "var,fastv:quarter-debiased",
)


def sink_profile(model: Any, processor: Any, world: Path, n_images: int) -> dict[int, dict[str, float]]:
    """Per layer, over POPE prompts of `n_images` images: the mean share of image attention on visual
    sinks ("share"), and the largest sink score phi of an image token ("image_phi") and of a text
    token ("text_phi")."""
    from PIL import Image

    from vlmfix.core.attach import attach
    from vlmfix.data import load_pope_jsonl
    from vlmfix.adapters.chat import chat_prompt
    from vlmfix.methods import build

    questions = load_pope_jsonl(world / "coco_pope_random.json")
    by_image: dict[Any, Any] = {}
    for q in questions:
        by_image.setdefault(q.image, q)
    chosen = list(by_image.values())[:n_images]
    shares: dict[int, list[float]] = {}
    image_phi: dict[int, float] = {}
    text_phi: dict[int, float] = {}
    with attach(model, processor, build("sink_share")) as fixed, torch.no_grad():
        for q in chosen:
            image = Image.open(world / "images" / q.image).convert("RGB")
            inputs = processor(images=image, text=chat_prompt(processor, q.text), return_tensors="pt").to(model.device)
            fixed(**inputs)
            state = fixed.last_state
            for layer, share in state.records[0].row(0)["share"].items():
                if not math.isnan(share):
                    shares.setdefault(layer, []).append(share)
            is_image = state.image_mask()[0]
            for layer, phi in state.phi.items():
                row = phi[0].float().cpu()
                image_phi[layer] = max(image_phi.get(layer, 0.0), float(row[is_image].max()))
                text_phi[layer] = max(text_phi.get(layer, 0.0), float(row[~is_image].max()))
    return {layer: {"share": sum(shares.get(layer, [0.0])) / max(1, len(shares.get(layer, []))),
                    "image_phi": image_phi[layer], "text_phi": text_phi[layer]} for layer in sorted(image_phi)}


def sink_plot(sinks: Mapping[int, Mapping[str, float]], tau: float, path: Path, width: int = 720,
              height: int = 380) -> Path:
    """Per layer: the largest phi of a text token (orange) and of an image token (blue) against tau
    (dashed), with the y axis in phi, a legend, and the share of image attention on visual sinks
    (in %) along the top. Pillow only."""
    from PIL import Image, ImageDraw

    from vlmfix.viz import text_font

    font, bold = text_font(12), text_font(14)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = 48, 72, width - 12, height - 58
    draw.text((10, 8), "Largest sink score phi per decoder layer (demo VLM, POPE prompts)", fill="black", font=bold)
    draw.text((10, 28), "row above the plot: share of the image attention that lands on visual sinks, in %",
              fill=(60, 60, 60), font=font)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    layers = sorted(sinks)
    top = max([tau] + [v[k] for v in sinks.values() for k in ("image_phi", "text_phi")]) * 1.1

    def y(v: float) -> float:
        return y1 - (y1 - y0) * v / top

    for tick in range(0, int(top) + 1, 5):  # the y axis, in phi
        draw.line((x0 - 4, y(tick), x0, y(tick)), fill="black")
        draw.text((x0 - 8 - draw.textlength(str(tick), font=font), y(tick) - 7), str(tick), fill="black", font=font)
    step = (x1 - x0) / (max(layers, default=0) + 1)
    for layer in layers:
        left = x0 + layer * step
        draw.rectangle((left + 2, y(sinks[layer]["text_phi"]), left + step / 2, y1), fill=(200, 120, 40))
        draw.rectangle((left + step / 2, y(sinks[layer]["image_phi"]), left + step - 2, y1), fill=(30, 90, 200))
        share = f"{100 * sinks[layer]['share']:.0f}"
        draw.text((left + step / 2 - draw.textlength(share, font=font) / 2, y0 - 16), share, fill="black", font=font)
        if layer % 5 == 0:
            draw.text((left + step / 2 - 4, y1 + 4), str(layer), fill="black", font=font)
    for x in range(x0, x1, 12):
        draw.line((x, y(tau), x + 6, y(tau)), fill="black", width=2)
    draw.text(((x0 + x1) // 2 - 15, y1 + 20), "layer", fill="black", font=font)
    legend_y = height - 18
    cursor = x0
    for colour, text in (((200, 120, 40), "largest phi of a text token"), ((30, 90, 200), "largest phi of an image token")):
        draw.rectangle((cursor, legend_y + 2, cursor + 12, legend_y + 12), fill=colour)
        draw.text((cursor + 18, legend_y), text, fill="black", font=font)
        cursor += 36 + draw.textlength(text, font=font)
    for x in range(int(cursor), int(cursor) + 18, 6):
        draw.line((x, legend_y + 7, x + 3, legend_y + 7), fill="black", width=2)
    draw.text((cursor + 24, legend_y), f"tau = {tau:g} (the sink threshold)", fill="black", font=font)
    draw.text((10, y0 + (y1 - y0) // 2 - 7), "phi", fill="black", font=font)
    image.save(path)
    return path


def _share_sentence(sinks: Mapping[int, Mapping[str, float]], tau: float) -> str:
    top = sorted(sinks.items(), key=lambda kv: -kv[1]["share"])[:3]
    if not top or top[0][1]["share"] == 0:
        high = max((v["image_phi"] for v in sinks.values()), default=0.0)
        return (f"No image token reached tau in any layer (largest image-token phi {high:.1f}), so the visual-sink "
                "share is 0 in every layer and VAR has nothing to redistribute.")
    return "Highest shares: " + ", ".join(f"layer {layer} {100 * v['share']:.0f} %" for layer, v in top) + "."


def report(compared: str, sinks: Mapping[int, Mapping[str, float]], meta: Mapping[str, Any]) -> str:
    """The markdown of docs/results.md: what ran, `vlmfix compare`'s report (`compared`, its title left out)
    and the visual-sink profile."""
    body = compared.split("\n", 1)[1].strip() if compared.startswith("# ") else compared.strip()
    return "\n\n".join([
        "# Results on the demo VLM",
        f"Produced by one command: `{meta['command']}` ({meta['minutes']:.1f} minutes of runs on {meta['device']}, "
        f"{meta['date']}), a preset of `vlmfix compare` (docs/evaluation.md, \"Compare\"). Model: `vlmfix.load_demo()` "
        "(SmolLM2-135M-Instruct + the committed vision tower, projector and LoRA). Data: "
        f"{meta['images']} held-out EmojiCOCO images (world seed 0; training used seed 1), POPE's three splits and "
        f"CHAIR captions of at most {meta['chair_max_new_tokens']} new tokens. Greedy decoding. Method presets: "
        "configs/methods/*.yaml.",
        body,
        "## Visual sinks in the demo VLM",
        "![sink scores and visual-sink attention share per layer](results_sink_phi.png)\n\n"
        f"Largest sink score of a text and of an image token per layer, and the share of the image attention of "
        f"the text rows after the image that lands on visual sinks (tau = {meta['tau']:g}), over "
        f"{meta['share_images']} POPE prompts. " + _share_sentence(sinks, meta["tau"]),
    ]) + "\n"


def _world_size(world: Path) -> int | None:
    """The number of images of the EmojiCOCO world in `world` (None: no world there)."""
    try:
        return len(json.loads((world / "instances.json").read_text(encoding="utf-8"))["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _model_name(weights: str | Path | None) -> str:
    """The model as the evaluations record it: "demo", or with other weights their path and digest (so a
    resumed run never mixes answers of two sets of weights)."""
    from vlmfix.eval.runner import file_sha256

    return "demo" if weights is None else f"demo with {weights} (sha256 {file_sha256(weights)[:16]})"


def _stage(text: str) -> None:
    print(f"demo results: {text}", file=sys.stderr, flush=True)


def run_results(out: str | Path = "out/demo-results", doc: str | Path | None = None, images: int = 500,
                batch_size: int | None = None, max_new_tokens: int = 128, share_images: int = 50,
                weights: str | Path | None = None, command: str = "vlmfix demo results",
                restart: bool = False) -> dict[str, Any]:
    """Run the grid (`vlmfix compare` with the method sets of `METHOD_SETS` x POPE and CHAIR on the demo VLM;
    resumable: rerun the same command after a crash; `restart` discards the grid's results first) and write
    `doc` (default `<out>/results.md`, its plots beside it: a committed report is rewritten only when named).
    `batch_size` None: 128 with a GPU, 16 on the CPU."""
    import shutil
    from datetime import date

    from vlmfix.core.presets import model_preset
    from vlmfix.data.world import generate_world
    from vlmfix.demo.load import load_demo
    from vlmfix.eval.compare import load_grid, run_grid

    start = time.perf_counter()
    out = Path(out)
    doc = out / "results.md" if doc is None else Path(doc)
    world = out / "emojicoco-heldout"
    if _world_size(world) != images:  # the folder is this command's: a world of another size is replaced
        _stage(f"1/3 writing the held-out EmojiCOCO world ({images} images, seed 0) in {world}")
        generate_world(world, images, seed=0, overwrite=True)
    model, processor = load_demo(weights)  # the evaluation runner moves it to the accelerator's device
    grid_dir = out / "grid"
    if restart:
        shutil.rmtree(grid_dir, ignore_errors=True)
    grid = load_grid(None, {"models": [_model_name(weights)], "tasks": ["pope", "chair"], "methods": list(METHOD_SETS),
                            "data": {"world": str(world)}, "n_images": images, "max_new_tokens": max_new_tokens,
                            "batch_size": batch_size or (128 if torch.cuda.is_available() else 16),
                            "out": str(grid_dir)})
    _stage(f"2/3 vlmfix compare: {len(METHOD_SETS)} method sets x POPE, CHAIR (resumable: rerun the command after a "
           "stop)")
    compared = run_grid(grid, command, loader=lambda name, dtype: (model, processor))
    _stage(f"3/3 the visual-sink profile per layer over {share_images} POPE prompts")
    sinks = sink_profile(model, processor, world, share_images)
    tau = float((model_preset(model.config._name_or_path, model.config.text_config.hidden_size) or {"tau": 20.0})["tau"])
    doc.parent.mkdir(parents=True, exist_ok=True)
    sink_plot(sinks, tau, doc.parent / "results_sink_phi.png")
    text = (grid_dir / "report.md").read_text(encoding="utf-8")
    for name in compared.get("plots", {}).values():  # the grid's plots beside the doc, named as its
        shutil.copyfile(grid_dir / name, doc.parent / f"results_{name}")
        text = text.replace(f"]({name})", f"](results_{name})")
    earlier = compared.get("timing", {}).get("earlier_cells_seconds", 0.0)  # cells a stopped earlier run finished
    meta = {"command": command, "minutes": (time.perf_counter() - start + earlier) / 60, "images": images,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "date": date.today().isoformat(), "chair_max_new_tokens": max_new_tokens, "share_images": share_images,
            "tau": tau}
    doc.write_text(report(text, sinks, meta), encoding="utf-8")
    summary = {"compare": compared, "sinks": sinks, "meta": meta}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"report: {doc}")
    return summary
