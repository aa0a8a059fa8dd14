"""The training log's loss curves as a PNG (Pillow only: no plotting library is needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

PANELS = (("vision", "stage 1: vision tower, BCE loss"), ("tune", "stage 2: projector + vision + LoRA, CE loss"))


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_plot(records: Sequence[dict[str, Any]], path: str | Path, width: int = 900, height: int = 360) -> Path:
    """One panel per stage: the loss per step (grey) and its moving average over 20 steps (blue)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel_w = width // len(PANELS)
    for k, (stage, title) in enumerate(PANELS):
        losses = [r["loss"] for r in records if r["stage"] == stage]
        x0, y0, x1, y1 = k * panel_w + 50, 30, (k + 1) * panel_w - 15, height - 40
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, 8), title, fill="black")
        if len(losses) < 2:
            continue
        top, bottom = max(losses), min(0.0, min(losses))
        def point(i: int, v: float) -> tuple[float, float]:
            return x0 + (x1 - x0) * i / (len(losses) - 1), y1 - (y1 - y0) * (v - bottom) / (top - bottom or 1.0)
        draw.line([point(i, v) for i, v in enumerate(losses)], fill=(190, 190, 190))
        draw.line([point(i, v) for i, v in enumerate(_smooth(losses, 20))], fill=(30, 90, 200), width=2)
        for frac in (0.0, 0.5, 1.0):
            value = bottom + frac * (top - bottom)
            draw.text((x0 - 45, point(0, value)[1] - 6), f"{value:.2f}", fill="black")
        draw.text((x0, y1 + 6), "step 0", fill="black")
        draw.text((x1 - 60, y1 + 6), f"step {len(losses) - 1}", fill="black")
    path = Path(path)
    image.save(path)
    return path
