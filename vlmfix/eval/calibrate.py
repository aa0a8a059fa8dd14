"""Fit a pruner's position trend on a calibration set (`vlmfix calibrate-trend`, in `vlmfix.cli.calibrate`; arXiv 2508.17807).

For every calibration prompt the pruner's own first-stage scores are read: the raw (un-debiased)
attention each image token receives at layer L - 1, averaged over heads (FastV: from the last
prompt token; multi-stage: the mean over the text after the image), i.e. the vector the pruner
ranks. Each image's vector s over its N image tokens is normalised to mean 1 (s / mean(s)), so
every image weighs the same, and the vectors are averaged position by position:

    m_i = (1 / K) sum_k s_k,i / mean(s_k),    x_i = i / (N - 1),

(images with fewer tokens than the longest are first resampled linearly onto its x grid).
`fit_trend(m, family)` fits f(x); the fit residual is reported as RMS(m - f(x)) (relative to the
mean score, which is 1) and R^2. `write_preset` stores the trend as a YAML preset that
`Debias` picks up by model name (see `debias.load_trend`).

A pruner is any registered method whose config has a `scorer()`, the config as calibration runs it
(`pruners()`; vlmfix's own: fastv and staged); its record gives the first stage's raw scores
(`raw_scores`). The forward of each prompt stops right after the scoring layer: per image, calibration costs the
vision tower and L of the decoder's layers.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch
import yaml

from vlmfix.data.prompts import CAPTION_PROMPTS

if TYPE_CHECKING:  # imported where used, so that building the CLI parser stays light
    from vlmfix.core.protocol import MethodConfig
    from vlmfix.methods.debias import Trend
    from vlmfix.methods.registry import MethodEntry

DEFAULT_QUESTION = CAPTION_PROMPTS[0]


@dataclass
class Calibration:
    """What `calibrate` found: the averaged normalised scores (N,), the fitted trend, its residual."""

    mean_scores: torch.Tensor
    trend: Trend
    images: int
    rms: float
    r2: float


class _Stop(Exception):
    """Raised by a pre-hook to end a forward once the scores are in."""


def _stop(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    raise _Stop


def pruners() -> "dict[str, MethodEntry]":
    """The registered methods calibration can fit a trend for: those whose config has a `scorer()` (the
    config as calibration runs it), by name."""
    from vlmfix.methods.registry import methods

    return {name: entry for name, entry in methods().items() if callable(getattr(entry.config, "scorer", None))}


def scoring_pruner(pruner: "str | MethodConfig") -> "MethodConfig":
    """The pruner that computes the scores: `pruner` (a name of configs/methods, e.g. "fastv" or
    "fastv:keep64", or an instance) as its `scorer()` gives it: without debiasing, in mask form, and sure
    to score every image (FastV keeps 1 token; the kept count does not change the first stage's scores).
    Any pruner of `pruners()` is accepted; the scorer gives `stage_layers()` and `preset_key`."""
    found = pruners()
    if isinstance(pruner, str):
        from vlmfix.methods import build

        name, _, preset = pruner.partition(":")
        if name not in found:
            raise ValueError(f"unknown pruner {name!r}; use one of {', '.join(found)}")
        pruner = build(name, preset or None)
    if not callable(getattr(pruner, "scorer", None)):
        names = " or ".join(entry.config.__name__ for entry in found.values())
        raise TypeError(f"calibration needs a pruner ({names}), got {type(pruner).__name__}")
    return pruner.scorer()


@torch.no_grad()
def pruner_scores(model: torch.nn.Module, processor: Any, inputs: Iterable[Mapping[str, Any]],
                  pruner: "str | MethodConfig" = "fastv") -> Iterator[torch.Tensor]:
    """For each model input (a processor output; batches allowed), the raw first-stage scores of
    every batch row with an image: a (N,) tensor over that row's image tokens, in raster order."""
    from vlmfix.core.attach import attach

    scorer = scoring_pruner(pruner)
    with attach(model, processor, scorer) as fixed:
        stop_at = min(scorer.stage_layers())
        hook = fixed.adapter.decoder_layers[stop_at].register_forward_pre_hook(_stop, with_kwargs=True)
        try:
            for batch in inputs:
                try:
                    fixed(**batch, use_cache=False)
                except _Stop:
                    pass
                state = fixed.state
                scores = state.record(scorer).raw_scores(0)
                if scores is None:
                    raise ValueError("a calibration prompt holds no image tokens (or only one per image); give "
                                     "prompts with an image, built with the model's processor")
                for row in state.rows:
                    if row.has_image:
                        yield scores[row.index].double()
        finally:
            hook.remove()


def _resample(s: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation of s (at x = j / (len - 1)) onto x = i / (n - 1)."""
    if len(s) == n:
        return s
    if len(s) < 2:
        raise ValueError("cannot resample a score vector of fewer than 2 tokens")
    src = torch.linspace(0, 1, len(s), dtype=torch.float64)
    dst = torch.linspace(0, 1, n, dtype=torch.float64)
    hi = torch.searchsorted(src, dst).clamp(1, len(s) - 1)
    lo = hi - 1
    w = (dst - src[lo]) / (src[hi] - src[lo])
    return s[lo] * (1 - w) + s[hi] * w


def mean_profile(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """m_i = mean_k s_k,i / mean(s_k): each vector normalised to mean 1, then averaged position by
    position (shorter vectors resampled linearly onto the longest one's grid)."""
    if not len(vectors):
        raise ValueError("no score vectors to average: the calibration set gave no image")
    n = max(len(s) for s in vectors)
    total = torch.zeros(n, dtype=torch.float64)
    for s in vectors:
        s = torch.as_tensor(s, dtype=torch.float64).flatten()
        mean = s.mean()
        if not mean > 0:
            raise ValueError("a score vector has no positive mass; the scores must be attention weights")
        total += _resample(s / mean, n)
    return total / len(vectors)


def fit_report(mean_scores: torch.Tensor, trend: Trend) -> tuple[float, float]:
    """(RMS(m - f(x)), R^2 = 1 - SS_res / SS_tot) of a trend fitted to m at x = i / (N - 1)."""
    m = mean_scores.double()
    x = torch.arange(len(m), dtype=torch.float64) / max(len(m) - 1, 1)
    res = m - trend(x)
    ss_tot = float(((m - m.mean()) ** 2).sum())
    r2 = 1.0 - float((res**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return float(res.pow(2).mean().sqrt()), r2


def calibrate(model: torch.nn.Module, processor: Any, inputs: Iterable[Mapping[str, Any]],
              pruner: "str | MethodConfig" = "fastv", family: str = "exp", *, progress: bool = False,
              total: int | None = None) -> Calibration:
    """Average the normalised first-stage scores of `inputs` and fit the trend (module docstring)."""
    from vlmfix.methods.debias import fit_trend

    if progress:
        from tqdm.auto import tqdm

        inputs = tqdm(inputs, total=total, desc="calibrating", unit="image")
    vectors = list(pruner_scores(model, processor, inputs, pruner))
    mean = mean_profile(vectors)
    trend = fit_trend(mean, family)
    rms, r2 = fit_report(mean, trend)
    return Calibration(mean, trend, len(vectors), rms, r2)


# -- data, prompts and the preset file ------------------------------------------------------------------
def world_images(folder: str | Path, n: int | None = None) -> list[Path]:
    """The first `n` image files (by image id) of an EmojiCOCO folder (`vlmfix world`: images/ and
    instances.json), or of any COCO-style folder laid out the same way."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; write an EmojiCOCO split with `vlmfix world --out DIR`")
    instances = folder / "instances.json"
    if not instances.is_file():
        raise FileNotFoundError(f"{folder}: not an EmojiCOCO folder (no instances.json); write one with "
                                "`vlmfix world --out DIR`")
    try:
        images = json.loads(instances.read_text()).get("images") or []
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{instances}: not a COCO instances file (a JSON object with an 'images' list)") from None
    if not images:
        raise ValueError(f"{instances} lists no images; nothing to calibrate on")
    if n is not None and n < 1:
        raise ValueError(f"the number of calibration images must be >= 1, got {n}")
    if n is not None and n > len(images):  # as everywhere in vlmfix: a count beyond the data is an error
        raise ValueError(f"--n-images {n} asks for more images than {instances} lists ({len(images)}); pass "
                         f"--n-images {len(images)} or fewer")
    paths = [folder / "images" / im["file_name"] for im in sorted(images, key=lambda im: im["id"])][:n]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) listed in {instances} are missing, e.g. {missing[0]}")
    return paths


def image_inputs(processor: Any, paths: Iterable[str | Path], question: str = DEFAULT_QUESTION
                 ) -> Iterator[dict[str, Any]]:
    """One processor output per image: the model's chat prompt with the image and `question`."""
    from PIL import Image

    from vlmfix.adapters.chat import chat_prompt

    if not hasattr(processor, "image_processor"):
        raise ValueError("calibration needs a vision-language model and its processor; this model is text-only")
    text = chat_prompt(processor, question, True)
    for path in paths:
        with Image.open(path) as img:
            yield dict(processor(images=img.convert("RGB"), text=text, return_tensors="pt"))


def model_name(model: torch.nn.Module, fallback: str = "") -> str:
    """A short lower-case name for `model`: the last part of its config's name or path (the VLM's,
    else its text decoder's), else `fallback`'s."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (getattr(config, "_name_or_path", ""), getattr(text, "_name_or_path", ""), fallback):
        name = Path(str(source or "").rstrip("/")).name.lower()
        if name:
            return name
    return "model"


def preset_path(name: str, pruner: str, out: str | Path | None = None) -> Path:
    """`out`, else out/trends/<name>__<pruner>.yaml (relative to the current folder)."""
    if out is not None:
        return Path(out)
    safe = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"
    return Path("out") / "trends" / f"{safe}__{pruner.partition(':')[0]}.yaml"


def write_preset(path: str | Path, cal: Calibration, *, match: Sequence[str], pruner: str, about: str) -> Path:
    """Write `cal` as a trend preset (configs/trends format): comments saying how it was fitted, then
    match, family and parameters. `about` says on what (model, data, question, layer)."""
    path = Path(path)
    formula = "mu * exp(sigma * x)" if cal.trend.family == "exp" else "a + b x + c x^2 + d x^3"
    params = cal.trend.named()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Position trend f(x) = {formula} of {pruner}'s language-to-vision scores (x = raster index / (N - 1)),",
        f"used by vlmfix.Debias(position={cal.trend.family!r}) when the model name contains a `match` string.",
        f"Fitted by `vlmfix calibrate-trend` on {when}: {about}.",
        f"Raw first-stage scores of {cal.images} image(s), each normalised to mean 1, averaged over "
        f"N = {len(cal.mean_scores)} tokens.",
        f"Fit residual: RMS {cal.rms:.4g} (relative to the mean score), R^2 {cal.r2:.4f}. Only the shape "
        "matters for ranking.",
    ]
    data = {"match": list(match), "family": cal.trend.family, **{k: float(v) for k, v in params.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    path.write_text("".join(f"# {line}\n" for line in lines) + body)
    return path


__all__ = ["Calibration", "calibrate", "fit_report", "image_inputs", "mean_profile", "model_name", "preset_path",
           "pruner_scores", "pruners", "scoring_pruner", "world_images", "write_preset"]
