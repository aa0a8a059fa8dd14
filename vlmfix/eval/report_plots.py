"""The plots of `vlmfix compare`'s report (Pillow only, as the rest of vlmfix's figures):

- metrics.png: per model and task, the main metrics of every cell as horizontal bars with their 95 %
  bootstrap interval (whiskers), the baseline in grey, frontier cells starred;
- frontier.png: per model and task with captions (CHAIR, AMBER), coverage (Recall / Cover) against the
  hallucination rate (CHAIR_i / CHAIR) of each cell with both intervals, the frontier joined by a line;
- speed.png: per model and task, the change of the main metric against the baseline (paired interval) over
  the time per item relative to the baseline's (the speed ratio: < 1 is faster).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from vlmfix.viz import text_font

#: per task, the metrics metrics.png shows
BAR_METRICS = {"pope": ("accuracy",), "chair": ("CHAIR_i", "CHAIR_i per 100 words", "Recall", "CHAIR_s"),
               "amber": ("CHAIR", "Cover", "Hal", "yes/no accuracy")}
#: per task: the metric the speed plot shows, and the frontier's (rate, coverage) pair
MAIN = {"pope": "accuracy", "chair": "CHAIR_i", "amber": "CHAIR"}
FRONTIER = {"chair": ("CHAIR_i", "Recall"), "amber": ("CHAIR", "Cover")}
BLUE, GREY, RED, INK, FAINT = (40, 100, 200), (150, 150, 150), (200, 50, 40), (20, 20, 20), (225, 225, 225)


def _percent(metric: str) -> bool:
    return metric not in ("CHAIR_i per 100 words", "Len")


def _better(metric: str) -> int:
    """-1: lower is better, 1: higher, 0: neither."""
    if "accuracy" in metric or metric in ("Recall", "Cover"):
        return 1
    return 0 if metric == "Len" else -1


def _label(row: dict, many_models: bool) -> str:
    star = "* " if row.get("frontier") else ""
    return star + row["name"] + (f" ({row['model']})" if many_models else "")


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 13, fill=INK,
          anchor: str = "la") -> None:
    draw.text(xy, text, fill=fill, font=text_font(size), anchor=anchor)


def plot_bars(rows: Sequence[dict], path: Path) -> Path | None:
    """metrics.png (see the module docstring); None when no cell finished."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return None
    many = len({r["model"] for r in done}) > 1
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault((r["model"], r["task"]), []).append(r)
    font = text_font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(probe.textlength(_label(r, many), font=font) for r in done)) + 16
    panel_w, row_h, top = 260, 24, 58
    blocks = []
    for (model, task), group in groups.items():
        metrics = [m for m in BAR_METRICS[task.partition(":")[0]] if m in group[0]["metrics"]]
        blocks.append((model, task, group, metrics))
    width = label_w + panel_w * max(len(b[3]) for b in blocks) + 20
    height = sum(top + row_h * len(b[2]) + 36 for b in blocks) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (10, 8), "Metrics per cell with 95 % bootstrap intervals (grey: baseline, *: on the frontier)", 15)
    y = 40
    for model, task, group, metrics in blocks:
        _text(draw, (10, y), f"{task} on {model}", 14)
        for j, metric in enumerate(metrics):
            x0 = label_w + j * panel_w
            scale = 100 if _percent(metric) else 1
            highest = max(r["metrics"][metric]["high"] for r in group) * scale or 1.0
            bar_w = panel_w - 70
            notes = (["%"] if _percent(metric) else []) + {-1: ["lower is better"], 1: ["higher is better"]}.get(
                _better(metric), [])
            unit = f" ({', '.join(notes)})" if notes else ""
            _text(draw, (x0 + bar_w / 2, y + 22), metric + unit, 13, anchor="ma")
            for i, r in enumerate(group):
                m = r["metrics"][metric]
                yy = y + top + i * row_h
                value, low, high = (scale * m[k] for k in ("value", "low", "high"))

                def x(v: float) -> float:
                    return x0 + bar_w * v / highest

                draw.rectangle((x0, yy + 4, x(value), yy + row_h - 4), fill=GREY if r["baseline"] else BLUE)
                draw.line((x(low), yy + row_h / 2, x(high), yy + row_h / 2), fill=INK, width=2)
                for v in (low, high):
                    draw.line((x(v), yy + 6, x(v), yy + row_h - 6), fill=INK, width=2)
                _text(draw, (x(high) + 4, yy + row_h / 2), f"{value:.1f}", 12, anchor="lm")
            draw.line((x0, y + top - 2, x0, y + top + row_h * len(group)), fill=INK)
        for i, r in enumerate(group):
            _text(draw, (label_w - 8, y + top + i * row_h + row_h / 2), _label(r, many), 13, anchor="rm")
        y += top + row_h * len(group) + 36
    image.save(path)
    return path


@dataclass
class Point:
    label: str
    x: float
    y: float
    x_range: tuple[float, float] | None = None
    y_range: tuple[float, float] | None = None
    highlight: bool = False
    muted: bool = False


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    points: list[Point] = field(default_factory=list)
    join_highlighted: bool = False
    zero_line: bool = False
    one_line: bool = False


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    import math

    span = high - low or 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 2.5, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    start = math.ceil(low / step) * step
    return [round(start + k * step, 10) for k in range(int((high - start) / step + 1e-9) + 1)]


#: a scatter panel with more points than this names them in a key under it (numbers beside the points)
NAMED_POINTS = 8


def scatter(panels: Sequence[Panel], path: Path, title: str, legend: str) -> Path | None:
    """Panels of labelled points with interval crosses, side by side (two per row)."""
    panels = [p for p in panels if p.points]
    if not panels:
        return None
    pw, plot_h, cols = 520, 400, min(2, len(panels))
    # more points than fit as names: numbers beside the points, and a key of the names under each panel
    key_rows = max((len(p.points) + 1) // 2 for p in panels) if max(len(p.points) for p in panels) > NAMED_POINTS else 0
    ph = plot_h + (key_rows * 15 + 10 if key_rows else 0)
    rows_n = (len(panels) + cols - 1) // cols
    width = max(pw * cols + 20, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(legend, font=text_font(12))) + 30)
    image = Image.new("RGB", (width, ph * rows_n + 70), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (10, 8), title, 15)
    _text(draw, (10, 30), legend, 12, fill=(70, 70, 70))
    for n, panel in enumerate(panels):
        ox, oy = 10 + (n % cols) * pw, 60 + (n // cols) * ph
        left, right, top, bottom = ox + 62, ox + pw - 24, oy + 46, oy + plot_h - 52
        xs = [v for p in panel.points for v in (p.x, *(p.x_range or ()))] + ([1.0] if panel.one_line else [])
        ys = [v for p in panel.points for v in (p.y, *(p.y_range or ()))] + ([0.0] if panel.zero_line else [])
        x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
        pad_x, pad_y = (x_hi - x_lo or abs(x_hi) or 1) * 0.12, (y_hi - y_lo or abs(y_hi) or 1) * 0.12
        x_lo, x_hi, y_lo, y_hi = x_lo - pad_x, x_hi + pad_x, y_lo - pad_y, y_hi + pad_y

        def px(v: float) -> float:
            return left + (right - left) * (v - x_lo) / (x_hi - x_lo)

        def py(v: float) -> float:
            return bottom - (bottom - top) * (v - y_lo) / (y_hi - y_lo)

        _text(draw, (ox + 4, oy + 4), panel.title, 14)
        draw.rectangle((left, top, right, bottom), outline=INK)
        for t in _nice_ticks(x_lo, x_hi):
            draw.line((px(t), top, px(t), bottom), fill=FAINT)
            _text(draw, (px(t), bottom + 4), f"{t:g}", 12, anchor="ma")
        for t in _nice_ticks(y_lo, y_hi):
            draw.line((left, py(t), right, py(t)), fill=FAINT)
            _text(draw, (left - 6, py(t)), f"{t:g}", 12, anchor="rm")
        draw.rectangle((left, top, right, bottom), outline=INK)
        _text(draw, ((left + right) / 2, bottom + 24), panel.x_label, 13, anchor="ma")
        _text(draw, (ox + 4, oy + 24), "y: " + panel.y_label, 12, fill=(70, 70, 70))
        if panel.zero_line:
            for x in range(int(left), int(right), 10):
                draw.line((x, py(0), x + 5, py(0)), fill=INK)
        if panel.one_line:
            for y in range(int(top), int(bottom), 10):
                draw.line((px(1), y, px(1), y + 5), fill=INK)
        if panel.join_highlighted:
            line = sorted((p.x, p.y) for p in panel.points if p.highlight)
            if len(line) > 1:
                draw.line([(px(a), py(b)) for a, b in line], fill=RED, width=2)
        for p in panel.points:
            colour = GREY if p.muted else (RED if p.highlight else BLUE)
            if p.x_range:
                draw.line((px(p.x_range[0]), py(p.y), px(p.x_range[1]), py(p.y)), fill=colour, width=1)
            if p.y_range:
                draw.line((px(p.x), py(p.y_range[0]), px(p.x), py(p.y_range[1])), fill=colour, width=1)
            draw.ellipse((px(p.x) - 5, py(p.y) - 5, px(p.x) + 5, py(p.y) + 5), fill=colour, outline=INK)
        numbered = len(panel.points) > NAMED_POINTS
        labels = {id(p): str(i + 1) if numbered else p.label for i, p in enumerate(panel.points)}
        placed: list[tuple[float, float, float]] = []
        for p in sorted(panel.points, key=lambda p: (py(p.y), px(p.x))):
            label = labels[id(p)]
            width = draw.textlength(label, font=text_font(12))
            lx, ly = px(p.x) + 8, py(p.y) - 14
            while ly < bottom - 14 and any(abs(ly - qy) < 14 and lx < qx + qw + 4 and qx < lx + width + 4
                                           for qx, qy, qw in placed):
                ly += 14
            if lx + width > right:
                lx = px(p.x) - 8 - width
            placed.append((lx, ly, width))
            _text(draw, (lx, ly), label, 12)
        if numbered:  # the key: number, name, in two columns under the panel
            half = (len(panel.points) + 1) // 2
            for i, p in enumerate(panel.points):
                kx, ky = ox + 10 + (i // half) * (pw // 2), oy + plot_h + (i % half) * 15
                colour = GREY if p.muted else (RED if p.highlight else INK)
                _text(draw, (kx, ky), f"{i + 1:>2}  {p.label}", 12, fill=colour)
    image.save(path)
    return path


def plot_frontier(rows: Sequence[dict], path: Path) -> Path | None:
    """frontier.png (see the module docstring); None without a captioning task."""
    panels = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done" and r["task"].partition(":")[0] in FRONTIER:
            groups.setdefault((r["model"], r["task"]), []).append(r)
    for (model, task), group in groups.items():
        rate, cover = FRONTIER[task.partition(":")[0]]
        points = [Point(r["name"], 100 * r["metrics"][rate]["value"], 100 * r["metrics"][cover]["value"],
                        (100 * r["metrics"][rate]["low"], 100 * r["metrics"][rate]["high"]),
                        (100 * r["metrics"][cover]["low"], 100 * r["metrics"][cover]["high"]),
                        highlight=bool(r.get("frontier")), muted=r["baseline"] and not r.get("frontier"))
                  for r in group]
        panels.append(Panel(f"{task} on {model}", f"{rate} (%, lower is better)", f"{cover} (%, higher is better)",
                            points, join_highlighted=True))
    return scatter(panels, path, "Coverage vs hallucination rate per cell (95 % intervals)",
                   "red: the frontier (no other cell is better on both), grey: the baseline; max_new_tokens fixed "
                   "per task (report.md)")


def plot_speed(rows: Sequence[dict], path: Path) -> Path | None:
    """speed.png (see the module docstring); None when no cell has both a time and a paired test."""
    panels = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault((r["model"], r["task"]), []).append(r)
    for (model, task), group in groups.items():
        metric = MAIN[task.partition(":")[0]]
        base = next((r for r in group if r["baseline"]), None)
        if base is None or not base.get("seconds_per_item"):
            continue
        points = []
        for r in group:
            test = r.get("against", {}).get(metric)
            if r["baseline"]:
                points.append(Point(r["name"], 1.0, 0.0, muted=True))
            elif test is not None and r.get("seconds_per_item"):
                points.append(Point(r["name"], r["seconds_per_item"] / base["seconds_per_item"],
                                    100 * test["difference"], None, (100 * test["low"], 100 * test["high"]),
                                    highlight=test["verdict"] != "no detectable effect"))
        panels.append(Panel(f"{task} on {model}", "time per item / the baseline's (< 1: faster)",
                            f"change of {metric} (points)", points, zero_line=True, one_line=True))
    return scatter(panels, path, "Effect against the baseline vs speed ratio (95 % paired intervals)",
                   "red: the interval of the change excludes 0; blue: no detectable effect; grey: the baseline")
