"""Heat maps over the image grid, as PNG files (Pillow only).

`grid_heatmap` colours a rows x cols grid of values and blends it over the image as the model saw
it; with a title it becomes a figure a person reads at a glance: the title wrapped to the width, the
map, a colour bar with its unit (and marks such as tau), a legend for outlines and padding, and
caption lines. `sink_heatmap` draws the sink scores phi of one layer of a call's state; a `Canvas`
is what each method's record draws its own maps on (`record_heat_maps` asks every record of a call),
so nothing here knows a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from vlmfix.core.state import CallState

# a perceptually ordered dark-to-bright ramp (inferno-like anchors)
_RAMP = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))
#: the width a figure's map is scaled to (cells of 16 px for LLaVA's 24 x 24, 32 px for the demo's 12 x 12)
MAP_WIDTH = 384
_MARGIN = 8


def _colour(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(t), len(_RAMP) - 2)
    f = t - i
    a, b = _RAMP[i], _RAMP[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


@lru_cache(maxsize=4)
def text_font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (keeps the spaces the old bitmap font dropped)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def model_view(pixel_values: torch.Tensor, processor: Any) -> Image.Image | None:
    """The image as the vision tower saw it (pixel_values of one image, (C, H, W)), de-normalised."""
    ip = getattr(processor, "image_processor", None)
    if ip is None or pixel_values.ndim != 3:
        return None
    mean = torch.tensor(ip.image_mean).view(-1, 1, 1)
    std = torch.tensor(ip.image_std).view(-1, 1, 1)
    arr = ((pixel_values.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


@dataclass(frozen=True)
class ColourBar:
    """The value range of a map's colours, its unit, and labelled marks on the bar (e.g. tau)."""

    unit: str
    marks: tuple[tuple[float, str], ...] = ()


def _cell_rect(r: int, c: int, cell: int) -> list[int]:
    return [c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1]


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _hatch(draw: ImageDraw.ImageDraw, box: list[int], step: int = 5) -> None:
    """Grey diagonal hatching over `box` (padding cells)."""
    x0, y0, x1, y1 = box
    for k in range(-(y1 - y0), x1 - x0, step):
        a = (x0 + max(k, 0), y0 + max(-k, 0))
        b = (x0 + min(k + (y1 - y0), x1 - x0), y0 + min(x1 - x0 - k, y1 - y0))
        draw.line([a, b], fill=(150, 150, 150), width=1)


def grid_heatmap(
    values: torch.Tensor,
    path: str | Path,
    image: Image.Image | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.55,
    cell: int | None = None,
    title: str | None = None,
    marked: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
    bar: ColourBar | None = None,
    legend: Sequence[tuple[str, str]] = (),
    caption: Sequence[str] = (),
) -> Path:
    """Write a PNG of a (rows, cols) grid of values, blended over `image` (resized to the grid).

    Cells where the bool grid `marked` is True get a white outline, cells where `padding` is True
    grey hatching. Without `title`, `bar`, `legend` or `caption` the PNG is the bare map (cells of
    `cell` px, default 24); with any of them it is a figure: the title wrapped to the width above a
    map scaled to about `MAP_WIDTH` px, then the colour bar (from vmin to vmax, in `bar.unit`, with
    its marks), the legend entries ((swatch, text): swatch "outline", "kept" or "hatch" is drawn
    beside the text) and the caption lines.
    """
    values = values.detach().float().cpu()
    rows, cols = values.shape
    lo = float(values.min()) if vmin is None else vmin
    hi = float(values.max()) if vmax is None else vmax
    span = hi - lo if hi > lo else 1.0
    figure = bool(title or bar or legend or caption)
    cell = cell or (max(6, round(MAP_WIDTH / max(rows, cols))) if figure else 24)
    width, height = cols * cell, rows * cell
    heat = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(heat)
    for r in range(rows):
        for c in range(cols):
            draw.rectangle(_cell_rect(r, c, cell), fill=_colour((float(values[r, c]) - lo) / span))
    out = heat if image is None else Image.blend(image.convert("RGB").resize((width, height)), heat, alpha)
    over = ImageDraw.Draw(out)
    if padding is not None:
        for r, c in padding.nonzero().tolist():
            _hatch(over, _cell_rect(r, c, cell))
    if marked is not None:
        for r, c in marked.nonzero().tolist():
            over.rectangle(_cell_rect(r, c, cell), outline="white", width=2)
    if not figure:
        return _save(out, path)
    return _save(_figure(out, title or "", lo, hi, bar, legend, caption), path)


def _swatch(draw: ImageDraw.ImageDraw, kind: str, y: int) -> None:
    """The legend's sample of a cell: outlined (a marked cell; "kept": a bright one) or hatched."""
    box = [_MARGIN, y + 2, _MARGIN + 14, y + 13]
    if kind == "hatch":
        draw.rectangle(box, fill=(235, 235, 235), outline=(90, 90, 90))
        _hatch(draw, box, 4)
        return
    draw.rectangle(box, fill=_RAMP[-1] if kind == "kept" else _RAMP[1], outline="white", width=2)
    draw.rectangle([_MARGIN - 1, y + 1, _MARGIN + 15, y + 14], outline=(90, 90, 90))


def _figure(
    heat: Image.Image, title: str, lo: float, hi: float, bar: ColourBar | None, legend: Sequence[tuple[str, str]],
    caption: Sequence[str],
) -> Image.Image:
    font, bold = text_font(12), text_font(14)
    width = max(heat.width, MAP_WIDTH) + 2 * _MARGIN
    inner = width - 2 * _MARGIN
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = _wrap(probe, title, inner, bold) if title else []
    legend_lines = [(kind if k == 0 else None, line) for kind, text in legend
                    for k, line in enumerate(_wrap(probe, text, inner - 24, font))]
    caption_lines = [line for text in caption for line in _wrap(probe, text, inner, font)]
    line_h, title_h = 16, 18
    bar_h = _bar_height(bar) if bar else 0
    height = (_MARGIN + title_h * len(title_lines) + 4 + heat.height + 6 + bar_h
              + line_h * (len(legend_lines) + len(caption_lines)) + _MARGIN)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = _MARGIN
    for line in title_lines:
        draw.text((_MARGIN, y), line, fill="black", font=bold)
        y += title_h
    y += 4
    canvas.paste(heat, (_MARGIN + (inner - heat.width) // 2, y))
    y += heat.height + 6
    if bar:
        y = _colour_bar(draw, _MARGIN, y, inner, lo, hi, bar, font)
    for kind, text in legend_lines:
        if kind:
            _swatch(draw, kind, y)
        draw.text((_MARGIN + 22, y), text, fill="black", font=font)
        y += line_h
    for text in caption_lines:
        draw.text((_MARGIN, y), text, fill=(40, 40, 40), font=font)
        y += line_h
    return canvas


def _number(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _bar_height(bar: ColourBar) -> int:
    """Pixels `_colour_bar` takes: the marks' labels, the bar, the end values and the unit line."""
    return (14 if bar.marks else 0) + 44


def _colour_bar(draw: ImageDraw.ImageDraw, x0: int, y: int, width: int, lo: float, hi: float, bar: ColourBar,
                font: ImageFont.ImageFont) -> int:
    """A horizontal colour bar from lo to hi: the marks' labels above it, the end values and the unit
    below; returns the next y."""
    span = hi - lo if hi > lo else 1.0
    if bar.marks:
        y += 14
    for k in range(width):
        draw.line([(x0 + k, y), (x0 + k, y + 11)], fill=_colour(k / max(width - 1, 1)))
    draw.rectangle([x0, y, x0 + width - 1, y + 11], outline=(90, 90, 90))
    for value, label in bar.marks:
        x = x0 + round((min(max(value, lo), hi) - lo) / span * (width - 1))
        draw.line([(x, y - 2), (x, y + 13)], fill="black", width=2)
        tw = draw.textlength(label, font=font)
        draw.text((min(max(x - tw / 2, x0), x0 + width - tw), y - 15), label, fill="black", font=font)
    hi_text = _number(hi)
    draw.text((x0, y + 14), _number(lo), fill="black", font=font)
    draw.text((x0 + width - draw.textlength(hi_text, font=font), y + 14), hi_text, fill="black", font=font)
    unit_w = draw.textlength(bar.unit, font=font)
    draw.text((x0 + (width - unit_w) / 2, y + 28), bar.unit, fill=(40, 40, 40), font=font)
    return y + 44  # = the start y + _bar_height(bar)


def _save(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def on_grid(state: CallState, values: torch.Tensor, row: int = 0, segment: int = 0) -> torch.Tensor:
    """Per-position values (B, prompt_len) of batch row `row`, laid out on one of its image grids."""
    layout = state.rows[row]
    if not layout.segments:
        raise ValueError(f"batch row {row} has no image")
    return values[row][layout.segments[segment].grid_positions()]


def _where(state: CallState, row: int, segment: int) -> str:
    """'' for a single-grid image, else which grid of the row the map shows."""
    segments = state.rows[row].segments
    if len(segments) == 1:
        return ""
    seg = segments[segment]
    return f" (image {seg.image_index}, {seg.name} grid {seg.rows} x {seg.cols}; {len(segments)} grids in the row)"


_PADDING = ("hatch", "hatched: padding the processor added around the image")


def sink_heatmap(
    state: CallState, layer: int, path: str | Path, image: Image.Image | None = None, *, row: int = 0,
    segment: int = 0, padding: torch.Tensor | None = None,
) -> Path:
    """PNG of the sink score phi at `layer` over one image grid of batch row `row`; visual sinks
    (phi > tau) outlined; the colour bar runs from 0 to max(phi, tau) with tau marked; `padding` a
    bool grid of padding cells."""
    if layer not in state.phi:
        raise ValueError(f"no sink scores for layer {layer}: tracked layers are {sorted(state.phi)}")
    values = on_grid(state, state.phi[layer], row, segment)
    sinks = on_grid(state, state.sink_mask(layer), row, segment)
    n = int(sinks.sum())
    if isinstance(state.tau, str):
        tau_text, marks, top = state.tau, (), float(values.max())
    else:
        tau_text, marks, top = f"{state.tau:.2f}", ((float(state.tau), f"tau {state.tau:.1f}"),), \
            max(float(values.max()), float(state.tau))
    title = f"Visual sinks at layer {layer}{_where(state, row, segment)}"
    found = (f"{n} visual sink{'s' if n != 1 else ''} (phi > tau {tau_text}) outlined" if n else
             f"no visual sinks at tau={tau_text}: the largest image phi is {float(values.max()):.1f}")
    legend = [("outline", "white outline: visual sink token (phi > tau)")] if n else []
    if padding is not None and bool(padding.any()):
        legend.append(_PADDING)
    bar = ColourBar("sink score phi (max |x_hat_d| over the sink dims d)", marks)
    return grid_heatmap(values, path, image, vmin=0.0, vmax=top, title=title, marked=sinks, padding=padding,
                        bar=bar, legend=legend, caption=[found])


def padding_grid(processor: Any, image_size: tuple[int, int], grid: tuple[int, int],
                 threshold: float = 0.5) -> torch.Tensor | None:
    """(rows, cols) bool grid of the patches that are mostly padding, for processors that pad the
    image to a square (LLaVA-1.5's `do_pad`); None for processors that do not pad."""
    from vlmfix.methods.debias import padding_fractions

    ip = getattr(processor, "image_processor", None)
    if ip is None or not getattr(ip, "do_pad", False) or type(processor).__name__ != "LlavaProcessor":
        return None
    return padding_fractions(image_size, grid, "pad") > threshold


def image_view(inputs: Any, processor: Any, image: Image.Image, row: Any) -> tuple[Image.Image, torch.Tensor | None]:
    """(the image as the model saw it, else the original; the padding cells of its first grid or None)."""
    pixel = inputs["pixel_values"][0]
    view = (model_view(pixel, processor) if pixel.ndim == 3 else None) or image
    seg = row.segments[0] if row.segments else None
    pad = padding_grid(processor, image.size, (seg.rows, seg.cols)) if seg else None
    return view, pad


class Canvas:
    """Where a record draws its heat maps (`vlmfix.core.protocol.HeatMaps`): one image grid (`segment`) of
    batch row `row` of a call, over `image` (the image as the model saw it), with the row's `padding`
    cells hatched, into the folder `out`; `hints` say how the calling command sets tau and the sink dims."""

    def __init__(self, state: CallState, out: str | Path, image: Image.Image | None = None, *, row: int = 0,
                 segment: int = 0, padding: torch.Tensor | None = None, hints: Mapping[str, str] | None = None,
                 written: dict[Path, str] | None = None, label: str = ""):
        self.state, self.out, self.image = state, Path(out), image
        self.row, self.segment, self.padding = row, segment, padding
        self.hints = dict(hints or {})
        self.written, self.label = written, label

    def _path(self, file: str) -> Path:
        """Where `file` goes: `out/file`, unless another method set of the same command (`written`: path -> the
        set that wrote it) wrote that path already: then `out/<this set>/file`, so no map overwrites another."""
        path = self.out / file
        if self.written is not None and self.written.setdefault(path, self.label) != self.label:
            path = self.out / _slug(self.label) / file
            path.parent.mkdir(parents=True, exist_ok=True)
            self.written[path] = self.label
        return path

    def grid(self, file: str, values: torch.Tensor, title: str, *, vmin: float | None = None,
             vmax: float | None = None, marked: torch.Tensor | None = None, bar: str | None = None,
             legend: Sequence[tuple[str, str]] = (), caption: Sequence[str] = (), alpha: float | None = None) -> Path:
        """Draw `values` (B, prompt_len; `marked` likewise, bool) over this canvas's grid into `out/file`. Caption
        lines may name `{total}` (the sum over the grid), `{count}` (its cells) and `{marked}` (its marked cells)."""
        state, row, segment = self.state, self.row, self.segment
        on = on_grid(state, values.float().cpu(), row, segment)
        outlined = on_grid(state, marked.cpu(), row, segment) if marked is not None else None
        legend = list(legend)
        if self.padding is not None and bool(self.padding.any()):
            legend.append(_PADDING)
        numbers = {"total": float(on.sum()), "count": on.numel(),
                   "marked": int(outlined.sum()) if outlined is not None else 0}
        extra = {} if alpha is None else {"alpha": alpha}
        return grid_heatmap(on, self._path(file), self.image, vmin=vmin, vmax=vmax,
                            title=title.format(**numbers) + _where(state, row, segment), marked=outlined,
                            padding=self.padding, bar=ColourBar(bar) if bar else None, legend=legend,
                            caption=[line.format(**numbers) for line in caption], **extra)

    def sinks(self, file: str, layer: int) -> Path:
        """The sink scores phi at `layer` over this canvas's grid, visual sinks outlined, into `out/file`."""
        return sink_heatmap(self.state, layer, self._path(file), self.image, row=self.row, segment=self.segment,
                            padding=self.padding)


def record_heat_maps(state: CallState, out: str | Path, image: Image.Image | None = None, *, row: int = 0,
                     segment: int = 0, padding: torch.Tensor | None = None,
                     hints: Mapping[str, str] | None = None, written: dict[Path, str] | None = None,
                     label: str = "") -> list[str]:
    """Every attached method's heat maps of one grid of batch row `row` of the call of `state` (each record
    draws its own, `Record.heat_maps`), one line each saying where a map is or why there is none; `written` and
    `label`: the maps of the command's other method sets, kept (`Canvas`)."""
    canvas = Canvas(state, out, image, row=row, segment=segment, padding=padding, hints=hints, written=written,
                    label=label)
    lines: list[str] = []
    for record in state.records:
        if record is not None:
            lines += record.heat_maps(canvas)
    return lines


def method_heat_maps(state: CallState, processor: Any, inputs: Any, image: Image.Image, out: Path,
                     hints: Mapping[str, str] | None = None, written: dict[Path, str] | None = None,
                     label: str = "") -> list[str]:
    """The heat maps of the methods attached in the call of `state` (batch row 0, its first grid, over the
    image as the model saw it) under `out` (`record_heat_maps`); `hints`: how the calling command sets tau
    and the sink dims (e.g. {"tau_hint": "--tau", "dims_hint": "--sink-dims"})."""
    if not state.rows or not state.rows[0].has_image:
        return ["no heat maps: the prompt holds no image"]
    view, pad = image_view(inputs, processor, image, state.rows[0])
    return record_heat_maps(state, out, view, padding=pad, hints=hints, written=written, label=label)


def map_folders(specs: Sequence[str], out: Path) -> dict[str, Path]:
    """Where each method set's heat maps go: `out` itself while no method appears in two sets (the file
    names are per method), else one sub-folder per set (`var,gift` -> out/var_gift)."""
    names = [{part.split(":")[0] for part in spec.split(",")} - {"none"} for spec in specs]
    clash = any(a & b for i, a in enumerate(names) for b in names[i + 1:])
    return {spec: out / _slug(spec) if clash else out for spec in specs}


def _slug(spec: str) -> str:
    """A method set as a folder name (`var,gift` -> var_gift)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in spec)
