"""COCO-format annotation files (instances, captions), loaded through `pycocotools`.

Accepts a path or an already loaded dict, checks what the rest of vlmfix relies on and says which
file is wrong:
- top level: a JSON object with "images" and "annotations" (and "categories" for instances);
- images: "id" (unique) and "file_name";
- instance annotations: "id", "image_id", "category_id"; caption annotations: "id", "image_id",
  "caption"; every image_id must be an image of the file, every category_id one of its categories.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from pycocotools.coco import COCO

from vlmfix.data.errors import DataFormatError

_ANNOTATION_FIELDS = {
    "instances": ("id", "image_id", "category_id"),
    "captions": ("id", "image_id", "caption"),
}


def load_instances(source: str | Path | Mapping[str, Any]) -> COCO:
    """COCO object-detection annotations (e.g. `instances_val2014.json`) as a pycocotools `COCO`."""
    return _load(source, "instances")


def load_captions(source: str | Path | Mapping[str, Any]) -> COCO:
    """COCO caption annotations (e.g. `captions_val2014.json`) as a pycocotools `COCO`."""
    return _load(source, "captions")


def image_categories(coco: COCO) -> dict[int, set[str]]:
    """Category names annotated on each image, for every image of `coco` (empty set if none)."""
    names = {cid: cat["name"] for cid, cat in coco.cats.items()}
    found: dict[int, set[str]] = {image_id: set() for image_id in coco.imgs}
    for ann in coco.dataset["annotations"]:
        found[ann["image_id"]].add(names[ann["category_id"]])
    return found


def _load(source: str | Path | Mapping[str, Any], kind: str) -> COCO:
    if isinstance(source, Mapping):
        name, data = f"<{kind} dict>", source
    else:
        name = str(source)
        try:
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{name}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    _validate(data, kind, name)
    coco = COCO()
    coco.dataset = dict(data)
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _validate(data: Any, kind: str, name: str) -> None:
    if not isinstance(data, Mapping):
        raise DataFormatError(f"{name}: COCO {kind} file must hold a JSON object, got {type(data).__name__}")
    required = ("images", "annotations", "categories") if kind == "instances" else ("images", "annotations")
    missing = [key for key in required if key not in data]
    if missing:
        raise DataFormatError(f"{name}: COCO {kind} file lacks the key(s) {missing}")

    image_ids: set[Any] = set()
    for i, image in enumerate(data["images"]):
        _require(image, ("id", "file_name"), f"{name}: images[{i}]")
        if image["id"] in image_ids:
            raise DataFormatError(f"{name}: images[{i}]: duplicate image id {image['id']!r}")
        image_ids.add(image["id"])
    category_ids = set()
    for i, category in enumerate(data.get("categories", ())):
        _require(category, ("id", "name"), f"{name}: categories[{i}]")
        category_ids.add(category["id"])

    bad: dict[str, list[int]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        _require(ann, _ANNOTATION_FIELDS[kind], f"{name}: annotations[{i}]")
        if ann["image_id"] not in image_ids:
            bad["image_id"].append(i)
        if kind == "instances" and ann["category_id"] not in category_ids:
            bad["category_id"].append(i)
    for field, where in bad.items():
        first = data["annotations"][where[0]]
        raise DataFormatError(
            f"{name}: {len(where)} annotation(s) with an unknown {field}, first annotations[{where[0]}] "
            f"(id {first['id']!r}, {field} {first[field]!r})"
        )


def _require(entry: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [f for f in fields if f not in entry]
    if missing:
        raise DataFormatError(f"{where}: missing field(s) {missing}")
