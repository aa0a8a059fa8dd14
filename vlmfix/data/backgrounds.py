"""Backgrounds of EmojiCOCO images: flat colours, gradients and simple textures, or for outdoor
scenes a horizon (sky gradient over a band of the scene's ground colour).

Colours are drawn in HSV (saturation 0.1-0.6, value 0.55-0.97; one in eight dark, value 0.2-0.45)
so the glyphs' black outlines mostly stay visible. Textures, with t the position along a random
direction (cos a, sin a):
- linear gradient: c1 + (c2 - c1) * (t - min t) / (max t - min t);
- stripes: c1 where floor(t / period) is even, else c2;  checker: floor(x / s) + floor(y / s) even;
- dots: c2 inside circles of radius r on a grid of pitch p;  grain: c1 + N(0, sigma^2) per pixel.
"""

from __future__ import annotations

import colorsys
import math
import random

import numpy as np
from PIL import Image

KINDS = ("flat", "gradient", "stripes", "checker", "dots", "grain")


def _colour(rng: random.Random) -> np.ndarray:
    """An RGB colour (uint8 array)."""
    value = rng.uniform(0.2, 0.45) if rng.random() < 0.125 else rng.uniform(0.55, 0.97)
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.6), value)
    return np.array([round(255 * c) for c in rgb], dtype=np.uint8)


def background(rng: random.Random, width: int, height: int, ground: tuple[int, int, int] | None) -> Image.Image:
    """An RGB background; `ground` (outdoor scenes) makes it a horizon half of the time."""
    ys, xs = np.ogrid[0:height, 0:width]
    if ground is not None and rng.random() < 0.5:
        sky = np.array(colorsys.hsv_to_rgb(rng.uniform(0.53, 0.62), rng.uniform(0.15, 0.5), rng.uniform(0.8, 1.0)))
        column = sky * 255 * (1 - 0.3 * ys / height)  # (height, 3): darker towards the horizon
        land = np.clip(np.array(ground) + rng.uniform(-20, 20), 0, 255)
        column = np.where(ys >= rng.uniform(0.35, 0.7) * height, land, column)
        pixels = np.broadcast_to(_to_uint8(column)[:, None, :], (height, width, 3))
    else:
        pixels = _texture(rng, rng.choice(KINDS), xs, ys, _colour(rng), _colour(rng))
    return Image.fromarray(np.ascontiguousarray(pixels))  # uint8 (H, W, 3): RGB


def _texture(rng: random.Random, kind: str, xs: np.ndarray, ys: np.ndarray,
             c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """A (height, width, 3) uint8 texture of `kind` on the open grid xs (1, width), ys (height, 1)."""
    shape = (ys.shape[0], xs.shape[1], 3)
    if kind == "flat":
        return np.broadcast_to(c1, shape)
    if kind == "grain":
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(6, 18), shape[:2] + (1,))
        return _to_uint8(c1 + noise.astype(np.float32))
    angle = rng.uniform(0, math.pi)
    t = (xs * math.cos(angle) + ys * math.sin(angle)).astype(np.float32)
    if kind == "gradient":
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return _to_uint8(c1 + (c2.astype(np.float32) - c1) * t[..., None])
    if kind == "stripes":
        mask = (np.floor(t / rng.uniform(6, 40)) % 2) == 0
    elif kind == "checker":
        size = rng.uniform(8, 48)
        mask = (np.floor(xs / size) + np.floor(ys / size)) % 2 == 0
    else:  # dots
        pitch = rng.uniform(12, 40)
        radius = pitch * rng.uniform(0.15, 0.35)
        dx, dy = xs % pitch - pitch / 2, ys % pitch - pitch / 2
        mask = dx * dx + dy * dy >= radius * radius
    return np.where(mask[..., None], c1, c2)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)
