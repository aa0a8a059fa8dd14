"""Scene types of the EmojiCOCO world: which objects appear together, and how often.

An image draws one scene (probability proportional to `Scene.weight`), then its objects one by one:
with probability `INTRUDER_P` any category (uniform: the odd object out that real photos have),
otherwise a category of the scene with probability proportional to its weight. Drawing a category
already in the image is accepted with probability `REPEAT_P` (giving "two dogs"), else redrawn.
Each new category o then pulls in its companions: for every (o, c, p) in `Scene.pairs`, c is added
with probability p while there is room. Weights and pairs follow COCO's strong pairs (fork with
knife and dining table, dog with frisbee, car with traffic light, mouse with keyboard, tv with
couch, skis with person, ...), so object co-occurrence carries the priors that make models
hallucinate the usual companion of an object.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INTRUDER_P = 0.06
REPEAT_P = 0.35


@dataclass(frozen=True)
class Scene:
    name: str
    phrase: str  # where, for captions: "in a park"
    weight: float
    objects: dict[str, float]
    pairs: tuple[tuple[str, str, float], ...] = ()
    ground: tuple[int, int, int] | None = None  # outdoor scenes: colour of the ground band

    def sample(self, rng: random.Random, n: int, categories: tuple[str, ...]) -> list[str]:
        """`n` object categories (repeats allowed) for one image of this scene."""
        names, weights = list(self.objects), list(self.objects.values())
        chosen: list[str] = []
        while len(chosen) < n:
            if rng.random() < INTRUDER_P:
                name = rng.choice(categories)
            else:
                name = rng.choices(names, weights)[0]
            if name in chosen and rng.random() >= REPEAT_P:
                continue
            new = name not in chosen
            chosen.append(name)
            if new:
                for a, b, p in self.pairs:
                    if a == name and b not in chosen and len(chosen) < n and rng.random() < p:
                        chosen.append(b)
        return chosen


SCENES: tuple[Scene, ...] = (
    Scene("dining room", "in a dining room", 2.0,
          {"dining table": 5, "fork": 3, "knife": 3, "spoon": 2, "cup": 3, "wine glass": 2, "bottle": 2,
           "bowl": 2, "pizza": 2, "cake": 1.5, "sandwich": 1.5, "hot dog": 1, "donut": 1, "chair": 2,
           "person": 3, "vase": 1, "potted plant": 0.5},
          (("fork", "knife", 0.8), ("knife", "fork", 0.6), ("fork", "dining table", 0.6),
           ("pizza", "dining table", 0.6), ("wine glass", "bottle", 0.4), ("cake", "knife", 0.4),
           ("spoon", "cup", 0.3), ("chair", "dining table", 0.5))),
    Scene("kitchen", "in a kitchen", 1.5,
          {"bowl": 3, "banana": 2, "apple": 2, "orange": 2, "broccoli": 2, "carrot": 2, "knife": 2,
           "spoon": 2, "fork": 1, "cup": 2, "bottle": 2, "wine glass": 1, "dining table": 1,
           "sandwich": 1, "donut": 1, "scissors": 0.5, "person": 1.5, "clock": 0.5, "vase": 0.5},
          (("broccoli", "carrot", 0.4), ("carrot", "broccoli", 0.3), ("banana", "apple", 0.3),
           ("apple", "orange", 0.3), ("orange", "banana", 0.3), ("spoon", "bowl", 0.4),
           ("fork", "knife", 0.6))),
    Scene("street", "on a city street", 2.0,
          {"car": 5, "bus": 2, "truck": 2, "traffic light": 3, "stop sign": 1.5, "bicycle": 1.5,
           "motorcycle": 1.5, "person": 5, "handbag": 1, "backpack": 1, "umbrella": 1,
           "cell phone": 0.5, "dog": 0.5},
          (("traffic light", "car", 0.7), ("car", "traffic light", 0.35), ("bus", "car", 0.5),
           ("stop sign", "car", 0.5), ("truck", "car", 0.5), ("bicycle", "person", 0.6),
           ("motorcycle", "person", 0.6), ("umbrella", "person", 0.7), ("handbag", "person", 0.8),
           ("backpack", "person", 0.7)),
          (128, 128, 132)),
    Scene("park", "in a park", 1.5,
          {"dog": 4, "frisbee": 3, "kite": 2, "person": 5, "sports ball": 2, "bicycle": 1, "bird": 1.5,
           "backpack": 0.5, "umbrella": 0.5, "skateboard": 1},
          (("dog", "frisbee", 0.5), ("frisbee", "dog", 0.6), ("frisbee", "person", 0.6),
           ("kite", "person", 0.6), ("sports ball", "person", 0.6), ("skateboard", "person", 0.8)),
          (96, 168, 72)),
    Scene("office", "in an office", 1.2,
          {"laptop": 4, "mouse": 3, "keyboard": 3, "tv": 2, "cell phone": 2, "book": 2, "cup": 2,
           "chair": 2, "clock": 1, "scissors": 1, "bottle": 1, "potted plant": 1, "person": 2,
           "tie": 1, "backpack": 0.5},
          (("laptop", "mouse", 0.5), ("mouse", "keyboard", 0.6), ("keyboard", "mouse", 0.6),
           ("keyboard", "tv", 0.4), ("tie", "person", 0.9))),
    Scene("living room", "in a living room", 1.2,
          {"couch": 4, "tv": 3, "chair": 2, "potted plant": 2, "clock": 1, "vase": 1.5, "book": 2,
           "cat": 2, "dog": 1.5, "teddy bear": 1, "laptop": 1, "cup": 1, "person": 2},
          (("tv", "couch", 0.5), ("couch", "tv", 0.4), ("vase", "potted plant", 0.3), ("cat", "couch", 0.3))),
    Scene("bedroom", "in a bedroom", 1.0,
          {"bed": 5, "teddy bear": 2, "book": 2, "clock": 2, "cat": 2, "dog": 1, "laptop": 1,
           "cell phone": 1.5, "chair": 1, "tv": 1, "potted plant": 0.5, "person": 1.5, "suitcase": 0.5},
          (("teddy bear", "bed", 0.5), ("cat", "bed", 0.5))),
    Scene("bathroom", "in a bathroom", 0.8,
          {"toilet": 5, "toothbrush": 3, "scissors": 1, "cup": 1.5, "bottle": 2, "vase": 0.5,
           "potted plant": 0.5, "cell phone": 0.5},
          (("toothbrush", "cup", 0.4), ("toothbrush", "toilet", 0.5))),
    Scene("farm", "on a farm", 1.0,
          {"cow": 4, "sheep": 4, "horse": 3, "dog": 2, "bird": 1.5, "truck": 1.5, "person": 2},
          (("sheep", "dog", 0.3), ("horse", "person", 0.5)),
          (120, 160, 70)),
    Scene("savanna", "on the savanna", 1.0,
          {"elephant": 4, "zebra": 4, "giraffe": 4, "bird": 1.5, "truck": 1, "car": 0.5, "person": 1},
          (("zebra", "giraffe", 0.4), ("giraffe", "zebra", 0.4), ("elephant", "giraffe", 0.3)),
          (206, 180, 110)),
    Scene("beach", "on the beach", 1.0,
          {"umbrella": 4, "kite": 2, "boat": 2, "person": 4, "bird": 2, "frisbee": 1, "sports ball": 1.5,
           "dog": 1, "bottle": 1, "handbag": 0.5, "cell phone": 0.5},
          (("umbrella", "person", 0.5), ("kite", "person", 0.5)),
          (236, 214, 160)),
    Scene("harbor", "at a harbor", 0.8,
          {"boat": 5, "bird": 2, "person": 2, "car": 1, "truck": 1, "umbrella": 0.5, "bicycle": 0.5},
          (("boat", "bird", 0.3),),
          (70, 120, 170)),
    Scene("airport", "at an airport", 0.8,
          {"airplane": 5, "suitcase": 3, "person": 3, "truck": 1.5, "bus": 1, "backpack": 1.5,
           "handbag": 1, "cell phone": 1},
          (("suitcase", "person", 0.6), ("airplane", "truck", 0.3), ("suitcase", "handbag", 0.3)),
          (150, 150, 150)),
    Scene("train station", "at a train station", 0.8,
          {"train": 5, "person": 3, "suitcase": 1.5, "backpack": 1.5, "clock": 1.5, "handbag": 1,
           "cell phone": 1, "umbrella": 0.5},
          (("train", "person", 0.4),),
          (140, 130, 120)),
    Scene("ski slope", "on a snowy slope", 0.7,
          {"skis": 5, "person": 4, "backpack": 2, "bear": 0.5, "dog": 0.5, "bottle": 0.5},
          (("skis", "person", 0.9),),
          (244, 246, 250)),
    Scene("skate park", "at a skate park", 0.7,
          {"skateboard": 4, "sports ball": 3, "person": 5, "bottle": 1.5, "backpack": 1, "cell phone": 0.5,
           "frisbee": 1},
          (("skateboard", "person", 0.8), ("sports ball", "person", 0.6)),
          (160, 160, 165)),
    Scene("party", "at a party", 0.8,
          {"cake": 4, "cup": 2, "wine glass": 2, "bottle": 2, "person": 4, "tie": 1.5, "knife": 1,
           "fork": 1, "dining table": 2, "chair": 1.5, "teddy bear": 1, "donut": 1, "pizza": 1},
          (("cake", "knife", 0.4), ("tie", "person", 0.9), ("wine glass", "bottle", 0.4))),
    Scene("forest", "in the woods", 0.6,
          {"bear": 4, "bird": 3, "backpack": 1, "person": 1.5, "dog": 1, "bicycle": 0.5},
          (("backpack", "person", 0.5),),
          (90, 120, 60)),
)
