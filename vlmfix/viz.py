"""Heat maps over the image grid, as PNG files (Pillow only).

`grid_heatmap` colours a rows x cols grid of values and blends it over the image as the model saw
it; `sink_heatmap` does so for the sink scores phi of one layer of a call's state, `moved_heatmap`
for the attention VAR moved onto each patch, `saliency_heatmap` for GIFT's saliency map,
`kept_heatmap` for the image tokens a pruner kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from .state import CallState

# a perceptually ordered dark-to-bright ramp (inferno-like anchors)
_RAMP = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


def _colour(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(t), len(_RAMP) - 2)
    f = t - i
    a, b = _RAMP[i], _RAMP[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def model_view(pixel_values: torch.Tensor, processor: Any) -> Image.Image | None:
    """The image as the vision tower saw it (pixel_values of one image, (C, H, W)), de-normalised."""
    ip = getattr(processor, "image_processor", None)
    if ip is None or pixel_values.ndim != 3:
        return None
    mean = torch.tensor(ip.image_mean).view(-1, 1, 1)
    std = torch.tensor(ip.image_std).view(-1, 1, 1)
    arr = ((pixel_values.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def grid_heatmap(
    values: torch.Tensor,
    path: str | Path,
    image: Image.Image | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.55,
    cell: int = 24,
    title: str | None = None,
    marked: torch.Tensor | None = None,
) -> Path:
    """Write a PNG of a (rows, cols) grid of values, blended over `image` (resized to the grid);
    cells where the bool grid `marked` is True get a white outline."""
    values = values.detach().float().cpu()
    rows, cols = values.shape
    lo = float(values.min()) if vmin is None else vmin
    hi = float(values.max()) if vmax is None else vmax
    span = hi - lo if hi > lo else 1.0
    width, height = cols * cell, rows * cell
    heat = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(heat)
    for r in range(rows):
        for c in range(cols):
            draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                           fill=_colour((float(values[r, c]) - lo) / span))
    out = heat if image is None else Image.blend(image.convert("RGB").resize((width, height)), heat, alpha)
    if marked is not None:
        outline = ImageDraw.Draw(out)
        for r, c in marked.nonzero().tolist():
            outline.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline="white", width=2)
    bar = 18 if title else 0
    canvas = Image.new("RGB", (width, height + bar), "white")
    canvas.paste(out, (0, bar))
    if title:
        ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def on_grid(state: CallState, values: torch.Tensor, row: int = 0, segment: int = 0) -> torch.Tensor:
    """Per-position values (B, prompt_len) of batch row `row`, laid out on one of its image grids."""
    layout = state.rows[row]
    if not layout.segments:
        raise ValueError(f"batch row {row} has no image")
    return values[row][layout.segments[segment].grid_positions()]


def sink_heatmap(
    state: CallState, layer: int, path: str | Path, image: Image.Image | None = None, *, row: int = 0,
    segment: int = 0,
) -> Path:
    """PNG of the sink score phi at `layer` over one image grid of batch row `row`; visual sinks outlined."""
    if layer not in state.phi:
        raise ValueError(f"no sink scores for layer {layer}: tracked layers are {sorted(state.phi)}")
    values = on_grid(state, state.phi[layer], row, segment)
    sinks = on_grid(state, state.sink_mask(layer), row, segment)
    tau = f"{state.tau:.2f}" if isinstance(state.tau, float) else str(state.tau)
    title = f"sink score phi, layer {layer}: {int(sinks.sum())} visual sinks (phi > tau {tau}, outlined)"
    return grid_heatmap(values, path, image, vmin=0.0, title=title, marked=sinks)


def moved_heatmap(
    state: CallState, path: str | Path, image: Image.Image | None = None, *, layer: int | None = None,
    row: int = 0, segment: int = 0,
) -> Path:
    """PNG of the attention VAR gave to each image patch (summed over heads, rows, steps and, without
    `layer`, over layers); the visual sinks it took attention from are outlined."""
    from .methods import VAR

    if not state.has_record(VAR):
        raise ValueError("VAR was not attached in this call")
    rec = state.record(VAR)
    gain, visual = rec.moved_map(layer)
    if not float(gain.sum()) > 0:
        raise ValueError("VAR moved no attention in this call (no image-centric heads)")
    values = on_grid(state, gain, row, segment)
    where = f"layer {layer}" if layer is not None else f"layers {rec.layers[0]}-{rec.layers[-1]}"
    title = f"attention moved by VAR, {where} (total {float(values.sum()):.2f}; sinks outlined)"
    return grid_heatmap(values, path, image, vmin=0.0, title=title, marked=on_grid(state, visual, row, segment))


def saliency_heatmap(
    state: CallState, path: str | Path, image: Image.Image | None = None, *, row: int = 0, segment: int = 0,
) -> Path:
    """PNG of GIFT's saliency map S_hat (gaze shifts of the question over the image) for batch row `row`."""
    from .methods import GIFT

    if not state.has_record(GIFT):
        raise ValueError("GIFT was not attached in this call")
    rec = state.record(GIFT)
    s_hat = rec.saliency(row)
    if s_hat is None:
        raise ValueError(f"no saliency map for batch row {row}: {rec.note(row) or 'GIFT computed none'}")
    layout = state.rows[row]
    values = torch.zeros(state.batch_size, state.prompt_len)
    values[row, layout.image_positions] = s_hat.float()
    alpha = f"{rec.alpha}"
    title = "GIFT saliency S_hat (gaze shifts of the question over the image)" + (f", alpha {alpha}" if alpha else "")
    return grid_heatmap(on_grid(state, values, row, segment), path, image, vmin=0.0, vmax=1.0, title=title)


def kept_heatmap(
    state: CallState, path: str | Path, image: Image.Image | None = None, *, row: int = 0, stage: int = -1,
    segment: int = 0,
) -> Path:
    """PNG of the image tokens a pruner kept (bright, outlined) and dropped (dark) after `stage` for
    batch row `row`, over one image grid."""
    from .methods.prune import kept_tokens, prune_record

    kept = torch.zeros(state.batch_size, state.prompt_len)
    kept[row, kept_tokens(state, row, stage)] = 1.0
    values = on_grid(state, kept, row, segment)
    rec = prune_record(state)
    layer = rec.stages[stage].layer if rec.stages else None
    where = f"from layer {layer}" if layer is not None else "(nothing pruned)"
    title = f"kept image tokens {where}: {int(values.sum())} of {values.numel()}"
    return grid_heatmap(values, path, image, vmin=0.0, vmax=1.0, title=title, marked=values > 0)
