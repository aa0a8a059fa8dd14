"""AMBER (vlmfix.data.amber, vlmfix.metrics.amber, the `amber` task): the metrics on a hand-made fixture, the
loader of the benchmark's annotation format, and the AMBER-format split of an EmojiCOCO world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmfix.data.amber import load_amber, number_question, write_emojicoco_amber
from vlmfix.data.errors import DataFormatError
from vlmfix.metrics import amber

ASSOCIATION = {"person": ["man", "woman"], "dog": ["puppy"], "cat": [], "tree": [], "car": []}
#: (response, truth, hallu): worked out by hand in test_generative_metrics_on_a_hand_made_fixture
RESPONSES = [
    ("A man walks a puppy past a cat and a car.", ["person", "dog", "tree"], ["cat", "car"]),
    ("Two cats sit under a tree.", ["cat"], ["dog"]),
    ("A woman stands next to the car.", ["car", "person"], ["dog"]),
]


def test_generative_metrics_on_a_hand_made_fixture():
    items = [amber.generative_item(text, truth, hallu, ASSOCIATION) for text, truth, hallu in RESPONSES]
    # 1: mentions man, puppy, cat, car; cat and car are not in the image (both are targets); person, dog named
    assert items[0]["mentions"] == ["man", "puppy", "cat", "car"]
    assert items[0]["hallucinated"] == ["cat", "car"] and items[0]["named"] == ["dog", "person"]
    assert items[0]["targets"] == 2
    # 2: "cats" -> cat (named), tree hallucinated, no target; 3: woman -> person, car: nothing hallucinated
    assert items[1]["hallucinated"] == ["tree"] and items[1]["targets"] == 0
    assert items[2]["hallucinated"] == [] and items[2]["named"] == ["car", "person"]
    m = amber.generative_metrics(items)
    assert m["CHAIR"] == pytest.approx(3 / 8)   # 3 hallucinated of 8 mentions
    assert m["Cover"] == pytest.approx(5 / 6)   # (2 + 1 + 2) named of (3 + 1 + 2) objects
    assert m["Hal"] == pytest.approx(2 / 3)     # responses 1 and 2 hallucinate
    assert m["Cog"] == pytest.approx(2 / 8)     # 2 mentions of targets of 8
    assert m["counts"]["mentions"] == 8
    # a safe word is never a hallucination
    assert amber.generative_item("A cat.", ["dog"], [], ASSOCIATION, safe_words={"cat"})["hallucinated"] == []


def test_discriminative_metrics_and_the_amber_score():
    d = amber.discriminative_metrics(["Yes", "No", "Yes, there is.", "No"], ["yes", "yes", "no", "no"],
                                     ["discriminative-existence", "discriminative-existence",
                                      "discriminative-attribute-number", "discriminative-relation"])
    assert (d["tp"], d["fn"], d["fp"], d["tn"]) == (1, 1, 1, 1)
    assert d["accuracy"] == 0.5 and d["f1"] == pytest.approx(0.5)
    assert d["types"]["existence"]["accuracy"] == 0.5 and d["types"]["attribute-number"]["accuracy"] == 0.0
    assert d["types"]["relation"]["accuracy"] == 1.0
    assert amber.amber_score(3 / 8, 0.5) == pytest.approx(0.5625)


def _write(folder: Path, queries: list, notes: list) -> Path:
    (folder / "query").mkdir(parents=True)
    (folder / "query" / "query_all.json").write_text(json.dumps(queries))
    (folder / "annotations.json").write_text(json.dumps(notes))
    (folder / "relation.json").write_text(json.dumps(ASSOCIATION))
    (folder / "safe_words.txt").write_text("picture\n")
    return folder


def test_the_loader_reads_the_benchmark_format_and_names_bad_entries(tmp_path):
    queries = [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
               {"id": 2, "image": "AMBER_1.jpg", "query": "Is there a dog in this image?"}]
    notes = [{"id": 1, "type": "generative", "truth": ["person"], "hallu": ["dog"]},
             {"id": 2, "type": "discriminative-existence", "truth": "no"}]
    loaded = load_amber(_write(tmp_path / "ok", queries, notes))
    assert [q.type for q in loaded.queries] == ["generative", "discriminative-existence"]
    assert loaded.queries[0].hallu == ("dog",) and loaded.queries[1].truth == "no"
    assert loaded.safe_words == {"picture"} and loaded.association == ASSOCIATION
    with pytest.raises(DataFormatError, match="id 2 has no entry"):
        load_amber(_write(tmp_path / "missing", queries, notes[:1]))
    with pytest.raises(DataFormatError, match="truth 'maybe'"):
        load_amber(_write(tmp_path / "bad", queries, [notes[0], {**notes[1], "truth": "maybe"}]))


def test_an_emojicoco_world_becomes_an_amber_split_that_the_task_scores(tmp_path):
    from vlmfix.data.world import generate_world
    from vlmfix.eval.tasks import amber_task, load_config, resolve_data

    world = tmp_path / "world"
    generate_world(world, 3, seed=0)
    split = load_amber(write_emojicoco_amber(world, tmp_path / "amber"))
    instances = json.loads((world / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present = {im["file_name"]: sorted({names[a["category_id"]] for a in instances["annotations"]
                                        if a["image_id"] == im["id"]}) for im in instances["images"]}
    generative = [q for q in split.queries if q.type == "generative"]
    assert {q.image: list(q.truth) for q in generative} == present
    assert all(not set(q.hallu) & set(q.truth) and len(q.hallu) == 5 for q in generative)
    existence = [q for q in split.queries if q.type == "discriminative-existence"]
    assert sum(q.truth == "yes" for q in existence) == sum(map(len, present.values()))
    assert number_question("person", 3) == "Are there three people in this image?"

    config = load_config("amber", None, {"world": str(world), "out": str(tmp_path / "out")})
    task = amber_task(config, resolve_data("amber", config))
    assert (world / "amber" / "annotations.json").is_file()
    # answers that name exactly the image's objects and answer every question right
    records = [{"id": item.id, **item.fields, "output": ("There is " + " and ".join(item.fields["truth"]) + ".")
                if item.fields["type"] == "generative" else item.fields["truth"].capitalize()} for item in task.items]
    scored = task.score(records)
    assert scored["generative"]["CHAIR"] == 0 and scored["generative"]["Cover"] == 1
    assert scored["discriminative"]["accuracy"] == 1
    assert scored["amber_score"] == 1
