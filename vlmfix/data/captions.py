"""Reference captions of EmojiCOCO images: templated, varied, fluent, naming every object.

Objects are counted per category ("two dogs", "a pair of skis", "broccoli") and listed either by
salience (largest first) or shuffled; a template is drawn without replacement per caption, from
plain ones ("A picture of {objs}.") and ones that name the scene ("{Objs} in a park."). The verb of
"There is/are ..." agrees with the first object phrase. Category names are COCO's, except that the
captions say "ball" for "sports ball" and "TV" for "tv" (both are CHAIR synonyms of the category).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from vlmfix.data.english import capitalize, count_phrase, is_plural_phrase, join_and

SURFACE = {"sports ball": "ball", "tv": "TV"}

PLAIN_TEMPLATES = (
    "{Objs}.",
    "A picture of {objs}.",
    "An image with {objs}.",
    "There {be} {objs} in the picture.",
    "This image shows {objs}.",
    "{Objs} can be seen in this image.",
    "A simple drawing of {objs}.",
    "Here we see {objs}.",
)
SCENE_TEMPLATES = (
    "{Objs} {scene}.",
    "A scene {scene} with {objs}.",
    "There {be} {objs} {scene}.",
    "A picture of {objs} {scene}.",
    "A view {scene} showing {objs}.",
)


def make_captions(objects: Sequence[str], scene: str, rng: random.Random, n: int = 5) -> list[str]:
    """`n` captions for an image holding `objects` (COCO names, largest first, repeats counted)
    in a scene described by `scene` ("in a park")."""
    counts = Counter(objects)  # keeps first-appearance (salience) order
    templates = rng.sample(PLAIN_TEMPLATES + SCENE_TEMPLATES, n)
    captions = []
    for template in templates:
        names = list(counts)
        if rng.random() < 0.5:
            rng.shuffle(names)
        nouns = [(SURFACE.get(name, name), counts[name]) for name in names]
        objs = join_and([count_phrase(noun, count) for noun, count in nouns])
        be = "are" if is_plural_phrase(*nouns[0]) else "is"
        captions.append(capitalize(template.format(objs=objs, Objs=capitalize(objs), be=be, scene=scene)))
    return captions
