"""The 80 COCO object categories (MS COCO 2014/2017 detection): official ids, names, supercategories.

Ids are COCO's own (1..90 with gaps: 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused), names are
exactly COCO's ("dining table", "tv", "cell phone", "hair drier", ...), so files written with them
are read by the same POPE and CHAIR code as real COCO annotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str


def _group(supercategory: str, *pairs: tuple[int, str]) -> tuple[Category, ...]:
    return tuple(Category(cid, name, supercategory) for cid, name in pairs)


COCO_CATEGORIES: tuple[Category, ...] = (
    _group("person", (1, "person"))
    + _group("vehicle", (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
             (7, "train"), (8, "truck"), (9, "boat"))
    + _group("outdoor", (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
             (14, "parking meter"), (15, "bench"))
    + _group("animal", (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
             (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"))
    + _group("accessory", (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
             (33, "suitcase"))
    + _group("sports", (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
             (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
             (42, "surfboard"), (43, "tennis racket"))
    + _group("kitchen", (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
             (49, "knife"), (50, "spoon"), (51, "bowl"))
    + _group("food", (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"),
             (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"),
             (61, "cake"))
    + _group("furniture", (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
             (67, "dining table"), (70, "toilet"))
    + _group("electronic", (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
             (76, "keyboard"), (77, "cell phone"))
    + _group("appliance", (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
             (82, "refrigerator"))
    + _group("indoor", (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
             (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"))
)

CATEGORY_BY_NAME: dict[str, Category] = {c.name: c for c in COCO_CATEGORIES}


def coco_category_dicts(names: Iterable[str] | None = None) -> list[dict]:
    """COCO-format `categories` entries ({"id", "name", "supercategory"}), in COCO id order.

    `names` restricts the list to those categories; an unknown name raises KeyError.
    """
    if names is None:
        chosen = COCO_CATEGORIES
    else:
        wanted = set(names)
        unknown = sorted(wanted - CATEGORY_BY_NAME.keys())
        if unknown:
            raise KeyError(f"not COCO category names: {unknown}")
        chosen = tuple(c for c in COCO_CATEGORIES if c.name in wanted)
    return [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in chosen]
