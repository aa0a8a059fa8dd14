"""`vlmfix demo results`: the demo VLM's POPE and CHAIR table for every method, in one run.

Held-out data: the EmojiCOCO world with seed 0 (`images` images; training used seed 1). POPE
(random / popular / adversarial questions built from it) and CHAIR (one caption per image, greedy,
`max_new_tokens` 128) run through the same evaluation code as `vlmfix eval`, resumable, for the
method sets of `METHOD_SETS`. Then the share of the image attention that visual sinks take is
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
from typing import Any, Mapping, Sequence

import torch

METHOD_SETS = (
    "none", "var", "gift", "fastv:quarter", "fastv:quarter-debiased", "var,fastv:quarter-debiased",
)
LABELS = {
    "none": "plain", "var": "VAR", "gift": "GIFT", "fastv:quarter": "FastV keep 25 %",
    "fastv:quarter-debiased": "FastV keep 25 % + debias", "var,fastv:quarter-debiased": "VAR + FastV 25 % + debias",
}


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


def _changes(base_p: Mapping[str, Any], p: Mapping[str, Any], base_c: Mapping[str, Any],
             c: Mapping[str, Any]) -> dict[str, tuple[float, str]]:
    """{measure: (change in points as a fraction, `intervals.verdict`)} of one method against the plain
    model, from the raw counts: CHAIR_s over captions, CHAIR_i over object mentions, POPE accuracy per
    split over its questions (each side with its own counts)."""
    from vlmfix.metrics.intervals import verdict

    def counts(k: str, n: str) -> tuple[tuple[int, int], tuple[int, int]]:
        return (base_c["counts"][k], base_c["counts"][n]), (c["counts"][k], c["counts"][n])

    pairs = {"CHAIR_s": counts("hallucinated_captions", "captions"),
             "CHAIR_i": counts("hallucinated_mentions", "mentions")}
    for split, m in p["splits"].items():
        b = base_p["splits"][split]
        pairs[f"POPE {split}"] = ((b["tp"] + b["tn"], b["n"]), (m["tp"] + m["tn"], m["n"]))
    return {k: (k2 / max(n2, 1) - k1 / max(n1, 1), verdict(k1, n1, k2, n2))
            for k, ((k1, n1), (k2, n2)) in pairs.items()}


def _verdicts(pope: Mapping[str, Any], chair: Mapping[str, Any]) -> list[str]:
    """One plain sentence per method: what it changed against the plain model, and whether each
    change is beyond noise (`_changes`, `vlmfix.metrics.intervals`), or the items are too few to tell."""
    from vlmfix.metrics.intervals import BEYOND, TOO_FEW

    base_c, base_p = chair["none"], pope["none"]
    lines = []
    for spec in METHOD_SETS[1:]:
        c, p = chair[spec], pope[spec]
        if c == base_c and p == base_p:
            lines.append(f"- **{LABELS[spec]}**: identical to the plain model on every number.")
            continue
        changes = _changes(base_p, p, base_c, c)
        real = {k: d for k, (d, said) in changes.items() if said == BEYOND}
        too_few = [k for k, (_, said) in changes.items() if said == TOO_FEW]
        listed = ", ".join(f"{k} {100 * d:+.1f}" for k, (d, _) in changes.items())
        fewer = [k for k in ("CHAIR_s", "CHAIR_i") if real.get(k, 0) < 0]
        more = [k for k in ("CHAIR_s", "CHAIR_i") if real.get(k, 0) > 0]
        worse = [k for k, d in real.items() if k.startswith("POPE") and d < 0]
        better = [k for k, d in real.items() if k.startswith("POPE") and d > 0]
        said = []
        if fewer and not more:
            said.append(f"fewer hallucinated objects in captions ({', '.join(fewer)})")
        if more:
            said.append(f"more hallucinated objects in captions ({', '.join(more)})")
        if better:
            said.append(f"higher POPE accuracy ({', '.join(k[5:] for k in better)})")
        if worse:
            said.append(f"lower POPE accuracy ({', '.join(k[5:] for k in worse)})")
        if len(too_few) == len(changes):
            verdict = "Too few items to tell any change from noise."
        elif said:
            verdict = "Beyond noise: " + "; ".join(said) + "."
        else:
            verdict = "Every change is within noise: no measurable effect on hallucination or accuracy."
        if too_few and len(too_few) < len(changes):
            verdict += f" Too few items to tell for {', '.join(too_few)}."
        lines.append(f"- **{LABELS[spec]}** (points against plain): {listed}. {verdict}")
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _share_sentence(sinks: Mapping[int, Mapping[str, float]], tau: float) -> str:
    top = sorted(sinks.items(), key=lambda kv: -kv[1]["share"])[:3]
    if not top or top[0][1]["share"] == 0:
        high = max((v["image_phi"] for v in sinks.values()), default=0.0)
        return (f"No image token reached tau in any layer (largest image-token phi {high:.1f}), so the visual-sink "
                "share is 0 in every layer and VAR has nothing to redistribute.")
    return "Highest shares: " + ", ".join(f"layer {layer} {100 * v['share']:.0f} %" for layer, v in top) + "."


def report(pope: Mapping[str, Any], chair: Mapping[str, Any], sinks: Mapping[int, Mapping[str, float]],
           meta: Mapping[str, Any]) -> str:
    """The markdown of docs/results.md."""
    splits = ("random", "popular", "adversarial")
    pope_rows = [[LABELS[s]] + [f"{100 * m['accuracy']:.1f} / {100 * m['f1']:.1f} / {100 * m['yes_ratio']:.1f}"
                                for m in (pope[s]["splits"][k] for k in splits)] for s in METHOD_SETS]
    chair_rows = [[LABELS[s], f"{100 * chair[s]['CHAIRs']:.1f}", f"{100 * chair[s]['CHAIRi']:.1f}",
                   f"{100 * chair[s]['Recall']:.1f}", f"{chair[s]['Len']:.1f}"] for s in METHOD_SETS]
    return "\n\n".join([
        "# Results on the demo VLM",
        f"Produced by one command in one run: `{meta['command']}` ({meta['minutes']:.1f} minutes on {meta['device']}, "
        f"{meta['date']}). Model: `vlmfix.load_demo()` (SmolLM2-135M-Instruct + the committed vision tower, "
        f"projector and LoRA). Data: {meta['images']} held-out EmojiCOCO images (world seed 0; training used seed 1). "
        "Greedy decoding. Method presets: configs/methods/*.yaml.",
        "## POPE (accuracy / F1 / yes-ratio, %)",
        _table(["method", "random", "popular", "adversarial"], pope_rows),
        f"## CHAIR ({meta['images']} images, max {meta['chair_max_new_tokens']} new tokens, %)",
        _table(["method", "CHAIR_s", "CHAIR_i", "Recall", "Len (words)"], chair_rows),
        "## What each method did here",
        "A change is beyond noise when the 95 % Newcombe interval of the difference of the two proportions "
        "(Wilson score intervals with continuity correction) excludes 0: POPE accuracy over the questions of the "
        "split, CHAIR_s over the captions, CHAIR_i over each side's object mentions. \"Too few items\" means that "
        "no outcome at that size could be told from noise.",
        "\n".join(_verdicts(pope, chair) + [f"- **Warning**: {w}" for w in meta.get("warnings", [])]),
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
    """Run the whole table (resumable: rerun the same command after a crash; `restart` discards the
    evaluations' results first) and write `doc` (default `<out>/results.md`, its sink plot beside it: a
    committed report is rewritten only when named). `batch_size` None: 128 with a GPU, 16 on the CPU."""
    from datetime import date

    from vlmfix.eval.tasks import load_config, run
    from vlmfix.data.world import generate_world
    from vlmfix.core.presets import model_preset
    from vlmfix.demo.load import load_demo

    start = time.perf_counter()
    out = Path(out)
    doc = out / "results.md" if doc is None else Path(doc)
    world = out / "emojicoco-heldout"
    if _world_size(world) != images:  # the folder is this command's: a world of another size is replaced
        _stage(f"1/4 writing the held-out EmojiCOCO world ({images} images, seed 0) in {world}")
        generate_world(world, images, seed=0, overwrite=True)
    model, processor = load_demo(weights)  # the evaluation runner moves it to the accelerator's device
    batch_size = batch_size or (128 if torch.cuda.is_available() else 16)
    common = {"model": _model_name(weights), "methods": list(METHOD_SETS), "batch_size": batch_size,
              "world": str(world)}
    _stage(f"2/4 POPE, {len(METHOD_SETS)} method sets (resumable: rerun the command after a stop)")
    pope = run("pope", load_config("pope", None, {**common, "out": str(out / "pope")}), model, processor, restart)
    _stage(f"3/4 CHAIR, {len(METHOD_SETS)} method sets")
    chair = run("chair", load_config("chair", None, {**common, "out": str(out / "chair"), "n_images": images,
                                                      "max_new_tokens": max_new_tokens}), model, processor, restart)
    _stage(f"4/4 the visual-sink profile per layer over {share_images} POPE prompts")
    sinks = sink_profile(model, processor, world, share_images)
    tau = float((model_preset(model.config._name_or_path, model.config.text_config.hidden_size) or {"tau": 20.0})["tau"])
    doc.parent.mkdir(parents=True, exist_ok=True)
    sink_plot(sinks, tau, doc.parent / "results_sink_phi.png")
    meta = {"command": command, "minutes": (time.perf_counter() - start) / 60, "images": images,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "date": date.today().isoformat(), "chair_max_new_tokens": max_new_tokens, "share_images": share_images,
            "tau": tau, "warnings": [f"{task}: {w}" for task, got in (("POPE", pope), ("CHAIR", chair))
                                     for w in got.get("warnings", [])]}
    pope_metrics = {s: pope["results"][s] for s in METHOD_SETS}
    chair_metrics = {s: {k: v for k, v in chair["results"][s].items() if k != "sentences"} for s in METHOD_SETS}
    doc.write_text(report(pope_metrics, chair_metrics, sinks, meta), encoding="utf-8")
    summary = {"pope": pope_metrics, "chair": chair_metrics, "sinks": sinks, "meta": meta}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"report: {doc}")
    return summary
