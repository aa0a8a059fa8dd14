"""POPE builder (the paper's negative sampling), loaders of official / HF files, COCO loader errors."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from vlmfix.data import DataFormatError, PopeQuestion, build_pope, load_instances, load_pope_hf, load_pope_jsonl
from vlmfix.data.coco_categories import CATEGORY_BY_NAME, coco_category_dicts
from vlmfix.data.english import count_phrase, indefinite, plural
from vlmfix.data.pope import SPLITS, question_text, write_pope_jsonl

NAMES = ["person", "dog", "frisbee", "car", "traffic light", "fork", "knife", "dining table", "cup", "apple",
         "umbrella", "elephant"]
IMAGES = {  # image id -> annotated categories; 8 and 9 have < 3 and are never asked about
    1: ["person", "dog", "frisbee"],
    2: ["person", "car", "traffic light", "car"],
    3: ["fork", "knife", "dining table", "cup"],
    4: ["person", "dog", "frisbee", "umbrella"],
    5: ["fork", "knife", "dining table"],
    6: ["person", "car", "umbrella"],
    7: ["apple", "cup", "dining table"],
    8: ["person", "dog"],
    9: ["elephant"],
}
TEXT_TO_NAME = {question_text(n): n for n in NAMES}
RANK = {n: CATEGORY_BY_NAME[n].id for n in NAMES}


@pytest.fixture()
def instances() -> dict:
    annotations = [
        {"id": len(IMAGES) * 10 + k, "image_id": i, "category_id": CATEGORY_BY_NAME[n].id, "bbox": [0, 0, 1, 1]}
        for i, names in IMAGES.items() for k, n in enumerate(names)
    ]
    return {
        "images": [{"id": i, "file_name": f"img_{i}.jpg", "width": 10, "height": 10} for i in IMAGES],
        "annotations": annotations,
        "categories": coco_category_dicts(NAMES),
    }


def by_image(questions: list[PopeQuestion]) -> dict[int, list[tuple[str, str]]]:
    grouped = defaultdict(list)
    for q in questions:
        grouped[q.image_id].append((TEXT_TO_NAME[q.text], q.label))
    return grouped


def eligible() -> list[int]:
    return [i for i, names in IMAGES.items() if len(set(names)) >= 3]


@pytest.mark.parametrize("split", SPLITS)
def test_structure_and_negatives_absent_and_unique(instances, split):
    questions = build_pope(instances, split, seed=0)
    assert [q.question_id for q in questions] == list(range(1, len(questions) + 1))
    grouped = by_image(questions)
    assert sorted(grouped) == eligible()
    for image_id, asked in grouped.items():
        assert len(asked) == 6
        assert [label for _, label in asked] == ["yes", "no"] * 3
        positives = [n for n, label in asked if label == "yes"]
        negatives = [n for n, label in asked if label == "no"]
        assert set(positives) <= set(IMAGES[image_id]) and len(set(positives)) == 3
        assert not set(negatives) & set(IMAGES[image_id])
        assert len(set(negatives)) == 3
    assert all(q.image == f"img_{q.image_id}.jpg" and q.category == split for q in questions)


def test_popular_follows_frequency(instances):
    frequency = Counter(n for i in eligible() for n in set(IMAGES[i]))
    ranking = sorted(frequency, key=lambda n: (-frequency[n], RANK[n]))
    assert ranking[:2] == ["person", "dining table"]
    for image_id, asked in by_image(build_pope(instances, "popular", seed=3)).items():
        excluded = set(IMAGES[image_id])
        for (_, _), (negative, _) in zip(asked[::2], asked[1::2]):
            expected = next(n for n in ranking if n not in excluded)
            assert negative == expected
            excluded.add(negative)


def test_adversarial_follows_co_occurrence(instances):
    pairs: dict[str, Counter] = defaultdict(Counter)
    for i in eligible():
        for a in set(IMAGES[i]):
            pairs[a].update(b for b in set(IMAGES[i]) if b != a)
    fallbacks = 0
    for seed in range(5):
        for image_id, asked in by_image(build_pope(instances, "adversarial", seed=seed)).items():
            excluded = set(IMAGES[image_id])
            for (positive, _), (negative, _) in zip(asked[::2], asked[1::2]):
                ranking = sorted(pairs[positive], key=lambda n: (-pairs[positive][n], RANK[n]))
                expected = next((n for n in ranking if n not in excluded), None)
                if expected is None:  # exhausted: random fallback
                    fallbacks += 1
                    assert negative not in excluded
                else:
                    assert negative == expected
                excluded.add(negative)
    assert fallbacks > 0  # the fixture exercises the fallback (e.g. frisbee: all its companions present)


def test_random_is_uniform_over_all_categories(instances):
    chosen = Counter()
    for seed in range(40):
        chosen.update(n for q in build_pope(instances, "random", seed=seed) if q.label == "no"
                      for n in [TEXT_TO_NAME[q.text]])
    assert chosen["elephant"] > 0  # in no eligible image, yet a possible random negative
    assert len(chosen) == len(NAMES)


def test_deterministic_and_splits_share_images_and_positives(instances):
    assert build_pope(instances, "random", seed=7) == build_pope(instances, "random", seed=7)
    runs = {s: build_pope(instances, s, seed=7, n_images=4) for s in SPLITS}
    positives = {s: [(q.image_id, q.text) for q in qs if q.label == "yes"] for s, qs in runs.items()}
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    assert len(runs["random"]) == 24
    others = {tuple((q.image_id, q.text) for q in build_pope(instances, "random", seed=s, n_images=4))
              for s in range(6)}
    assert len(others) > 1


def test_too_many_images_and_unknown_split(instances):
    with pytest.raises(ValueError, match="only 7 have >= 3"):
        build_pope(instances, "random", seed=0, n_images=8)
    with pytest.raises(ValueError, match="unknown POPE split"):
        build_pope(instances, "hard", seed=0)


def test_articles_and_english():
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"
    assert question_text("dog") == "Is there a dog in the image?"
    assert question_text("tv") == "Is there a tv in the image?"
    assert question_text("skis") == "Is there a pair of skis in the image?"
    assert indefinite("elephant") == "an elephant" and indefinite("hot dog") == "a hot dog"
    assert [plural(n) for n in ("person", "knife", "bus", "wine glass", "sheep", "couch", "mouse")] == [
        "people", "knives", "buses", "wine glasses", "sheep", "couches", "mice"]
    assert count_phrase("scissors", 2) == "two pairs of scissors" and count_phrase("broccoli", 3) == "broccoli"


def test_built_text_is_correct_english(instances):
    texts = {q.text for s in SPLITS for q in build_pope(instances, s, seed=1)}
    assert "Is there an apple in the image?" in texts or "Is there an umbrella in the image?" in texts
    assert not any("imange" in t or " a a" in t or " an d" in t for t in texts)


# ---------------------------------------------------------------------------------------- loaders


def test_jsonl_round_trip(instances, tmp_path):
    questions = build_pope(instances, "popular", seed=0)
    path = write_pope_jsonl(questions, tmp_path / "coco_pope_popular.json")
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["question_id", "image", "text", "label", "image_id"]
    loaded = load_pope_jsonl(path)
    assert [(q.question_id, q.image, q.text, q.label, q.image_id) for q in loaded] == [
        (q.question_id, q.image, q.text, q.label, q.image_id) for q in questions]


def test_official_file_loads_as_is(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(
        '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",'
        ' "label": "yes"}\n'
        '{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there an apple in the imange?",'
        ' "label": "no"}\n'
        "\n"
    )
    questions = load_pope_jsonl(path)
    assert [q.label for q in questions] == ["yes", "no"]
    assert questions[1].text == "Is there an apple in the imange?" and questions[0].image_id is None


@pytest.mark.parametrize(("lines", "line", "message"), [
    (['{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}', '{"question_id": 2,'], 2,
     "not valid JSON"),
    (['{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?"}'], 1, "missing field"),
    (['{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}'], 1, "label must be"),
    (['{"question_id": "x", "image": "a.jpg", "text": "Is there a dog?", "label": "no"}'], 1, "must be an integer"),
    (['[1, 2]'], 1, "expected a JSON object"),
    (['{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}',
      '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}'], 2, "duplicate question_id"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, line, message):
    path = tmp_path / "bad.json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=message) as error:
        load_pope_jsonl(path)
    assert f"{path}:{line}:" in str(error.value)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match="empty file") as error:
        load_pope_jsonl(path)
    assert str(path) in str(error.value)


def _hf_rows(split: str, n: int) -> dict:
    return {
        "id": [str(i) for i in range(n)],
        "question_id": [str(i + 1) for i in range(n)],
        "question": [f"Is there a dog in the image? ({split} {i})" for i in range(n)],
        "answer": ["Yes" if i % 2 == 0 else "no" for i in range(n)],
        "image_source": [f"COCO_val2014_{i:012d}" for i in range(n)],
        "category": [split] * n,
    }


def test_hf_full_config_and_default_config(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    full = tmp_path / "POPE" / "Full"
    full.mkdir(parents=True)
    for split, n in (("adversarial", 4), ("popular", 6), ("random", 2)):
        rows = _hf_rows(split, n)
        rows["image"] = [Image.new("RGB", (4, 4), "red")] * n
        features = datasets.Features({**{c: datasets.Value("string") for c in rows if c != "image"},
                                      "image": datasets.Image()})
        datasets.Dataset.from_dict(rows, features=features).to_parquet(full / f"{split}-00000-of-00001.parquet")
    popular = load_pope_hf(tmp_path / "POPE", "popular")
    assert len(popular) == 6 and {q.category for q in popular} == {"popular"}
    assert [q.label for q in popular[:2]] == ["yes", "no"]
    assert popular[0].question_id == 1 and popular[0].image == "COCO_val2014_000000000000"

    data = tmp_path / "default" / "data"
    data.mkdir(parents=True)
    mixed = {k: _hf_rows("random", 3)[k] + _hf_rows("popular", 2)[k] for k in _hf_rows("random", 1)}
    datasets.Dataset.from_dict(mixed).to_parquet(data / "test-00000-of-00001.parquet")
    assert len(load_pope_hf(tmp_path / "default", "random")) == 3
    assert len(load_pope_hf(data / "test-00000-of-00001.parquet", "popular")) == 2


def test_hf_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(FileNotFoundError):
        load_pope_hf(tmp_path / "nowhere", "random")
    with pytest.raises(DataFormatError, match="no parquet files"):
        load_pope_hf(tmp_path, "random")
    rows = _hf_rows("random", 2)
    del rows["answer"]
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "random-0.parquet")
    with pytest.raises(DataFormatError, match=r"random-0.parquet.*missing column\(s\) \['answer'\]"):
        load_pope_hf(tmp_path, "random")


# ---------------------------------------------------------------------------------------- COCO


def test_coco_loader_errors(instances, tmp_path):
    coco = load_instances(instances)
    assert len(coco.getImgIds()) == len(IMAGES)
    broken = dict(instances, annotations=instances["annotations"] + [
        {"id": 999, "image_id": 42, "category_id": 1}])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(DataFormatError, match="unknown image_id") as error:
        load_instances(path)
    assert str(path) in str(error.value) and "id 999" in str(error.value)
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataFormatError, match=r"lacks the key\(s\) \['categories'\]"):
        load_instances(path)
    path.write_text("{not json")
    with pytest.raises(DataFormatError, match=f"{path}:1:2: not valid JSON"):
        load_instances(path)
