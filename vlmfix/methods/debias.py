"""Attention debiasing for visual token pruning (arXiv 2508.17807).

A pruner-agnostic transform of image-token scores before ranking:

1. **Position (recency) trend.** Language-to-vision attention grows with the raster index of the
   image token. With x = i / (N - 1) over the N image tokens of an image (of each frame, for a
   video: `raster_positions`), a trend f(x) is fitted to
   mean score vectors (`fit_trend`) and divided out: score_hat_i = score_i / f(x_i). Families:
   "exp" f = mu * exp(sigma * x) (the paper's; fitted by least squares in log space, then refined
   by Gauss-Newton on the plain squared error) and "cubic" f = a + b x + c x^2 + d x^3 (linear
   least squares). Fitted trends are data: <model>__<pruner>.yaml files (written by `vlmfix
   calibrate-trend`), matched on the model's name, searched in the folders of $VLMFIX_TRENDS and
   then in configs/trends; `Debias(trend=PATH)` names one file. Without a fitted trend, the trend
   is fitted to the score vector being ranked (a one-sample calibration; skipped below 4 scores
   or when the fit is no valid `Trend`). A trend must be finite and >= MIN_TREND on [0, 1]
   (`Trend` refuses anything else), so the division never meets a zero or a clamp.
2. **Padding.** LLaVA-1.5's "pad" mode centres the image in a max(W, H) square (filled with the
   mean colour) and resizes it; patches that are mostly padding get inflated attention. Their
   padding fraction is computed from the original size and that geometry (`padding_fractions`);
   a patch over `padding_threshold` gets score 0 and the keep budget drops to the number of
   content patches when that is smaller. LLaVA-NeXT ("crop": its crops are cut from the
   resized image and the model removes the unpadded area itself) and Qwen2-VL ("none": dynamic
   resolution, no padding) have no padded patches.

At run time the original aspect of a padded LLaVA-1.5 image is recovered from its pixel values:
the padding is the processor's mean colour, so the content box is what differs from it.

Described, with its choices and defaults, in docs/methods.md ("Token pruning and its debiasing").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import yaml

from vlmfix.methods.base import check_choice, check_number, is_number, raise_problems

if TYPE_CHECKING:
    from vlmfix.core.state import RowLayout

FAMILIES = ("exp", "cubic")
PARAM_NAMES = {"exp": ("mu", "sigma"), "cubic": ("a", "b", "c", "d")}  # a trend's parameters, in order
GEOMETRIES = ("pad", "crop", "none")
MIN_TREND = 1e-300  # the least value a trend may take on [0, 1] (`Trend`)
TRENDS_ENV = "VLMFIX_TRENDS"  # folders (os.pathsep-separated) searched for trend presets before configs/trends


@dataclass(frozen=True)
class Trend:
    """A fitted position trend: family "exp" with params (mu, sigma), or "cubic" with (a, b, c, d).

    Scores (attention, at most 1) are divided by it, so on [0, 1] it must be finite and at least
    MIN_TREND = 1e-300 (the quotient then stays finite in float64): the parameters are finite, and
    the least and largest values are checked at the ends (exp: monotone) or, for a cubic, also where
    its derivative is 0. Anything else is refused here rather than clamped when dividing.
    """

    family: str
    params: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.family not in PARAM_NAMES:
            raise ValueError(f"unknown trend family {self.family!r}; use one of {FAMILIES}")
        names = PARAM_NAMES[self.family]
        if len(self.params) != len(names) or not all(is_number(v) for v in self.params):
            raise ValueError(f"a {self.family} trend takes {len(names)} finite numbers ({', '.join(names)}), "
                             f"got {self.params!r}")
        # an exp trend is monotone: its extremes on [0, 1] are at the ends
        at = self(torch.tensor([0.0, 1.0] if self.family == "exp" else _cubic_extremes(self.params)))
        if not bool(torch.isfinite(at).all()) or not float(at.min()) >= MIN_TREND:
            raise ValueError(f"the {self.family} trend {self.named()} cannot divide scores: on [0, 1] it must be "
                             f"finite and >= {MIN_TREND:g}, and it ranges over [{float(at.min()):g}, "
                             f"{float(at.max()):g}] there")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if self.family == "exp":
            mu, sigma = self.params
            return mu * torch.exp(sigma * x)
        return sum(p * x**k for k, p in enumerate(self.params))

    def named(self) -> dict[str, float]:
        """The parameters by name ({"mu", "sigma"} or {"a", "b", "c", "d"}), as presets store them."""
        return dict(zip(PARAM_NAMES[self.family], self.params))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trend":
        family = data.get("family", "exp")
        if family not in PARAM_NAMES:
            raise ValueError(f"unknown trend family {family!r}; use one of {FAMILIES}")
        missing = [k for k in PARAM_NAMES[family] if k not in data]
        if missing:
            raise ValueError(f"the {family} trend lacks the key(s) {', '.join(missing)}")
        try:  # YAML reads an exponent without a dot ("3e-3") as a string
            params = tuple(float(data[k]) for k in PARAM_NAMES[family])
        except (TypeError, ValueError):
            raise ValueError(f"the {family} trend's parameters must be numbers, got "
                             f"{ {k: data[k] for k in PARAM_NAMES[family]} }") from None
        return cls(family, params)

    @classmethod
    def from_file(cls, path: str | Path) -> "Trend":
        """The trend of one preset YAML file (as `vlmfix calibrate-trend` writes it)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trend file {path} does not exist; write one with `vlmfix calibrate-trend`")
        data = yaml.safe_load(path.read_text()) or {}
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _cubic_extremes(params: Sequence[float]) -> list[float]:
    """The points of [0, 1] where a + b x + c x^2 + d x^3 can take its least value: the ends and the
    roots of b + 2 c x + 3 d x^2 inside."""
    _, b, c, d = params
    if d:
        disc = c * c - 3 * b * d
        roots = [(-c + sign * math.sqrt(disc)) / (3 * d) for sign in (1, -1)] if disc >= 0 else []
    else:
        roots = [-b / (2 * c)] if c else []
    return [0.0, 1.0, *(x for x in roots if 0 < x < 1)]


def _x(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64) / max(n - 1, 1)


def fit_trend(mean_scores: torch.Tensor | Sequence[float], family: str = "exp",
              x: torch.Tensor | None = None) -> Trend:
    """Least-squares fit of f(x) to scores at x (default x = i / (N - 1)).

    exp: log-linear fit of log(score) (positive scores only) as the start, then Gauss-Newton
    steps minimising sum (score - mu exp(sigma x))^2; cubic: ordinary least squares. A fit that
    is no valid `Trend` (not finite, or below MIN_TREND somewhere on [0, 1]: a cubic dipping to 0)
    raises ValueError.
    """
    y = torch.as_tensor(mean_scores, dtype=torch.float64).flatten()
    x = _x(len(y)) if x is None else torch.as_tensor(x, dtype=torch.float64).flatten()
    if len(y) < 2:
        raise ValueError("fitting a trend needs at least 2 scores")
    if family == "cubic":
        design = torch.stack([x**k for k in range(4)], 1)
        coef = torch.linalg.lstsq(design, y[:, None]).solution.flatten()
        return Trend("cubic", tuple(float(c) for c in coef))
    if family != "exp":
        raise ValueError(f"unknown trend family {family!r}; use one of {FAMILIES}")
    pos = y > 0
    if int(pos.sum()) < 2:
        return Trend("exp", (max(float(y.mean()), 1e-12), 0.0))
    design = torch.stack([torch.ones_like(x[pos]), x[pos]], 1)
    log_mu, sigma = torch.linalg.lstsq(design, torch.log(y[pos])[:, None]).solution.flatten().tolist()
    start = mu, sig = math.exp(log_mu), sigma
    for _ in range(50):  # Gauss-Newton on the plain residual
        e = torch.exp(sig * x)
        jac = torch.stack([e, mu * x * e], 1)
        step = torch.linalg.lstsq(jac, (y - mu * e)[:, None]).solution.flatten()
        mu, sig = mu + float(step[0]), sig + float(step[1])
        if not (math.isfinite(mu) and math.isfinite(sig)) or mu <= 0:
            return Trend("exp", start)  # diverged: keep the log-linear fit
        if float(step.abs().max()) < 1e-12:
            break
    return Trend("exp", (mu, sig))


def raster_positions(row: RowLayout) -> torch.Tensor:
    """x in [0, 1] for each visual token of batch row `row`, in the order of `row.image_positions`:
    i / (N - 1) over the row's N visual tokens, except that when the row holds a video (two or more
    grid segments named "frame..."), each frame's patches get their own i / (n - 1) over that frame's
    n patches, so the recency trend is taken per frame."""
    n = len(row.image_positions)
    x = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    frames = [seg for seg in row.segments if seg.name.startswith("frame")]
    if len(frames) < 2:
        return x
    for seg in frames:
        grid = seg.grid_positions().flatten()
        x[torch.searchsorted(row.image_positions, grid)] = torch.arange(len(grid), dtype=torch.float64) / max(
            len(grid) - 1, 1)
    return x


def padding_fractions(image_size: tuple[int, int], grid: tuple[int, int], geometry: str = "pad") -> torch.Tensor:
    """(rows, cols) fraction of each patch covered by padding.

    image_size: the original (W, H); geometry "pad": LLaVA-1.5's pad-to-square (the image pasted
    at ((M - W) // 2, (M - H) // 2) of an M = max(W, H) square, then resized to the grid);
    "crop" / "none": no padding (zeros).
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown padding geometry {geometry!r}; use one of {GEOMETRIES}")
    rows, cols = grid
    if geometry != "pad":
        return torch.zeros(rows, cols)
    w, h = image_size
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2

    def covered(lo: int, hi: int, n: int) -> torch.Tensor:  # overlap of each of n cells with [lo, hi)
        edges = torch.arange(n + 1, dtype=torch.float64) * side / n
        return (torch.minimum(edges[1:], torch.tensor(float(hi))) - torch.maximum(edges[:-1], torch.tensor(float(lo)))
                ).clamp(min=0) / (side / n)

    content = covered(top, top + h, rows)[:, None] * covered(left, left + w, cols)[None, :]
    return (1.0 - content).clamp(0.0, 1.0).float()


def content_size(pixel_values: torch.Tensor, background: torch.Tensor, tol: float = 0.02) -> tuple[int, int]:
    """(W, H) of the content box of a padded image (C, H, W): rows/columns differing from `background`
    (C,), the normalised padding colour, anywhere."""
    differs = ((pixel_values.float() - background.view(-1, 1, 1)).abs() > tol).any(0)  # (H, W)
    ys, xs = differs.any(1).nonzero().flatten(), differs.any(0).nonzero().flatten()
    if not len(ys):
        return pixel_values.shape[-1], pixel_values.shape[-2]
    return int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)


def trend_dirs() -> list[Path]:
    """Folders searched for trend presets: those of $VLMFIX_TRENDS (in order), then configs/trends."""
    from vlmfix.core.presets import configs_dir

    user = [Path(p).expanduser() for p in os.environ.get(TRENDS_ENV, "").split(os.pathsep) if p]
    return [*user, configs_dir() / "trends"]


def load_trend(model_name: str, pruner: str) -> Trend | None:
    """The fitted trend of the first <name>__<pruner>.yaml (in `trend_dirs()` order, files sorted)
    whose `match` strings occur in the model name (case-insensitive)."""
    name = (model_name or "").lower()
    for folder in trend_dirs():
        for path in sorted(folder.glob(f"*__{pruner}.yaml")):
            data = yaml.safe_load(path.read_text()) or {}
            if any(m.lower() in name for m in data.get("match", [])):
                return Trend.from_dict(data)
    return None


@dataclass
class Debias:
    """Score debiasing for pruners (paper: both fixes on, threshold 0.5).

    - position: "exp" | "cubic" | None (no position fix);
    - padding: zero the scores of padded patches and cap the budget at the content patches;
    - padding_threshold: a patch is padding when its padding fraction exceeds this;
    - trend: a `Trend`, a dict {family, mu, sigma} / {family, a, b, c, d}, or the path of a preset
      YAML file; None = the preset for (model, pruner) in $VLMFIX_TRENDS or configs/trends, else
      fitted to the scores being ranked.
    """

    position: str | None = "exp"
    padding: bool = True
    padding_threshold: float = 0.5
    trend: Trend | dict | str | Path | None = None

    def __post_init__(self) -> None:
        problems = [check_choice("position", self.position, (*FAMILIES, None)),
                    check_choice("padding", self.padding, (True, False)),
                    check_number("padding_threshold", self.padding_threshold, 0.0, 1.0)]
        try:
            if isinstance(self.trend, dict):
                self.trend = Trend.from_dict(self.trend)
            elif isinstance(self.trend, (str, Path)):
                self.trend = Trend.from_file(self.trend)
            elif self.trend is not None and not isinstance(self.trend, Trend):
                problems.append(f"trend must be a Trend, a mapping, a preset file's path or None, got {self.trend!r}")
        except ValueError as err:
            problems.append(f"trend: {err}")
        raise_problems("Debias", problems)

    def resolve(self, model_name: str, pruner: str) -> Trend | None:
        """The trend to divide by for this model and pruner (None: fit per call)."""
        if self.position is None:
            return None
        if self.trend is not None:
            return self.trend
        preset = load_trend(model_name, pruner)
        return preset if preset is not None and preset.family == self.position else None

    def transform(self, scores: torch.Tensor, x: torch.Tensor, pad_frac: torch.Tensor | None = None,
                  trend: Trend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(debiased scores (float64), content mask) for scores at raster positions x in [0, 1]; `trend`
        defaults to this config's own (else it is fitted to `scores`; a fit that is no valid `Trend`,
        e.g. a cubic dipping below 0, is skipped, like a fit to fewer than 4 scores).

        score_hat = score / f(x) in float64, finite for any `Trend` (>= MIN_TREND on [0, 1]). Padded
        patches (fraction > threshold) score 0 and are False in the content mask.
        """
        out = scores.double()
        trend = trend if trend is not None else self.trend
        if trend is None and self.position is not None and len(out) >= 4:
            try:
                trend = fit_trend(out, self.position, x)
            except ValueError:  # a one-sample fit with no positive trend: no position fix for this ranking
                trend = None
        if trend is not None and self.position is not None:
            out = out / trend(x)
        content = torch.ones(len(out), dtype=torch.bool)
        if self.padding and pad_frac is not None:
            content = pad_frac <= self.padding_threshold
            out = torch.where(content, out, torch.zeros_like(out))
        return out, content
