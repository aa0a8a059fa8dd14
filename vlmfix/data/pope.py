"""POPE question files: loaders for the official and Hugging Face copies, and a builder (Li et al., EMNLP 2023).

Source: Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023.

Builder, per split, from COCO-format instances:
- images: those with >= `questions_per_image` (3) annotated categories, optionally `n_images` of
  them drawn at random; per image `questions_per_image` ground-truth objects drawn at random.
  Images and objects depend on the seed only, so the three splits ask about the same ones.
- after the positive question on object o ("yes"), one negative ("no") on a category that is not
  in the image and not yet asked about for that image:
  random: uniform among all categories of the file;
  popular: the first in the ranking by image frequency over the chosen image set;
  adversarial: the first in the ranking by co-occurrence with o (number of chosen images holding
  both, count > 0).  Ties rank by COCO category id; an exhausted ranking falls back to random.
- text: "Is there {a|an} {object} in the image?" in correct English (`english.indefinite`); the
  reference builder's "imange" typo is not reproduced.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vlmfix.data.coco import image_categories, load_instances
from vlmfix.data.english import indefinite
from vlmfix.data.errors import DataFormatError

SPLITS = ("random", "popular", "adversarial")
LABELS = ("yes", "no")
JSONL_FIELDS = ("question_id", "image", "text", "label")
HF_COLUMNS = ("question_id", "question", "answer", "image_source", "category")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question. `image` is the image file name (official files) or id (`image_source`)."""

    question_id: int
    image: str
    text: str
    label: str
    image_id: int | None = None
    category: str | None = None


def question_text(object_name: str) -> str:
    """'Is there an apple in the image?'"""
    return f"Is there {indefinite(object_name)} in the image?"


# ---------------------------------------------------------------------------------------- loaders


def check_splits(splits: Sequence[str]) -> None:
    """Raise unless `splits` is a non-empty list of POPE's split names."""
    if not splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"POPE splits must be among {', '.join(SPLITS)}, got {list(splits)!r}")


def pope_file(folder: str | Path, split: str) -> Path:
    """The official POPE file of `split` in `folder` (`coco_pope_{split}.json`); FileNotFoundError when missing."""
    path = Path(folder) / f"coco_pope_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: POPE questions of split {split!r} not found")
    return path


def load_pope_jsonl(path: str | Path) -> list[PopeQuestion]:
    """An official POPE file (`coco_pope_{split}.json`: JSON Lines despite the extension)."""
    path = Path(path)
    questions: list[PopeQuestion] = []
    first_line: dict[int, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in JSONL_FIELDS if k not in row]
            if missing:
                raise DataFormatError(f"{where}: missing field(s) {missing}")
            q = _question(where, row["question_id"], row["image"], row["text"], row["label"], row.get("image_id"))
            if q.question_id in first_line:
                raise DataFormatError(
                    f"{where}: duplicate question_id {q.question_id} (first on line {first_line[q.question_id]})"
                )
            first_line[q.question_id] = lineno
            questions.append(q)
    if not questions:
        raise DataFormatError(f"{path}: empty file, no POPE questions")
    return questions


def load_pope_hf(path_or_dir: str | Path, split: str) -> list[PopeQuestion]:
    """A local copy of the Hugging Face dataset `lmms-lab/POPE` (parquet), read with `datasets`.

    `path_or_dir` is a parquet file or a folder searched recursively for `{split}-*.parquet`
    (config "Full": adversarial / popular / random); if none matches, all its parquet files are
    read. For the three POPE splits, rows are kept where `category == split` (so the 9,000-row
    default config works too). Image pixels are not decoded: `image` is the `image_source` id.
    Nothing is downloaded.
    """
    import datasets
    import pyarrow.parquet as pq

    root = Path(path_or_dir)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder (a local copy of lmms-lab/POPE)")
    files = [root] if root.is_file() else sorted(root.rglob(f"{split}-*.parquet")) or sorted(root.rglob("*.parquet"))
    if not files:
        raise DataFormatError(f"{root}: no parquet files (expected e.g. Full/{split}-00000-of-00001.parquet)")
    for file in files:
        missing = [c for c in HF_COLUMNS if c not in pq.read_schema(file).names]
        if missing:
            raise DataFormatError(f"{file}: not an lmms-lab/POPE parquet file, missing column(s) {missing}")

    table = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", columns=list(HF_COLUMNS)
    )
    questions = [
        _question(f"{root} ({split}) row {i}", row["question_id"], row["image_source"], row["question"],
                  row["answer"], None, row["category"])
        for i, row in enumerate(table)
        if split not in SPLITS or row["category"] == split
    ]
    if not questions:
        raise DataFormatError(f"{root}: no POPE rows for split {split!r}")
    return questions


def _question(where: str, question_id: Any, image: Any, text: Any, label: Any,
              image_id: Any, category: str | None = None) -> PopeQuestion:
    normalized = label.strip().lower() if isinstance(label, str) else label
    if normalized not in LABELS:
        raise DataFormatError(f"{where}: label must be 'yes' or 'no', got {label!r}")
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{where}: empty or non-text question {text!r}")
    return PopeQuestion(_integer(where, "question_id", question_id), str(image), text, normalized,
                        None if image_id is None else _integer(where, "image_id", image_id), category)


def _integer(where: str, field: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataFormatError(f"{where}: {field} must be an integer, got {value!r}") from None


# ---------------------------------------------------------------------------------------- builder


def build_pope(
    instances: str | Path | Mapping[str, Any],
    split: str,
    seed: int,
    n_images: int | None = None,
    questions_per_image: int = 3,
) -> list[PopeQuestion]:
    """POPE questions of one split (`random`, `popular`, `adversarial`) from COCO-format instances.

    2 x `questions_per_image` questions per image, alternating yes/no; question ids 1, 2, ...
    """
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
    coco = load_instances(instances)
    objects = image_categories(coco)
    eligible = sorted(i for i, names in objects.items() if len(names) >= questions_per_image)
    pick = random.Random(f"pope/{seed}")
    if n_images is None:
        chosen = eligible
    elif n_images > len(eligible):
        raise ValueError(
            f"{n_images} images requested but only {len(eligible)} have >= {questions_per_image} categories"
        )
    else:
        chosen = sorted(pick.sample(eligible, n_images))
    positives = {i: pick.sample(sorted(objects[i]), questions_per_image) for i in chosen}

    categories = [coco.cats[c]["name"] for c in sorted(coco.cats)]
    rank = {name: r for r, name in enumerate(categories)}
    frequency = Counter(name for i in chosen for name in objects[i])
    popular = sorted(frequency, key=lambda n: (-frequency[n], rank[n]))
    co_occurrence: dict[str, Counter] = defaultdict(Counter)
    for i in chosen:
        for a in objects[i]:
            co_occurrence[a].update(b for b in objects[i] if b != a)

    negatives = random.Random(f"pope/{seed}/{split}")
    questions: list[PopeQuestion] = []
    for image_id in chosen:
        file_name = coco.imgs[image_id]["file_name"]
        excluded = set(objects[image_id])
        for obj in positives[image_id]:
            if split == "random":
                ranking: Iterable[str] = ()
            elif split == "popular":
                ranking = popular
            else:
                counts = co_occurrence[obj]
                ranking = sorted(counts, key=lambda n: (-counts[n], rank[n]))
            negative = next((n for n in ranking if n not in excluded), None)
            if negative is None:
                pool = [n for n in categories if n not in excluded]
                if not pool:
                    raise ValueError(f"image {image_id}: no absent category left to ask about")
                negative = negatives.choice(pool)
            excluded.add(negative)
            for name, label in ((obj, "yes"), (negative, "no")):
                questions.append(
                    PopeQuestion(len(questions) + 1, file_name, question_text(name), label, image_id, split)
                )
    return questions


def write_pope_jsonl(questions: Iterable[PopeQuestion], path: str | Path) -> Path:
    """Write the official format: one {"question_id", "image", "text", "label"[, "image_id"]} per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            row: dict[str, Any] = {"question_id": q.question_id, "image": q.image, "text": q.text, "label": q.label}
            if q.image_id is not None:
                row["image_id"] = q.image_id
            f.write(json.dumps(row) + "\n")
    return path
