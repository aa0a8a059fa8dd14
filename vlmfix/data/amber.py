"""AMBER (Wang et al., 2023, "AMBER: An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination
Evaluation", arXiv 2311.07397): its annotation format, a loader for a local copy, and an AMBER-format split
written from an EmojiCOCO world so that the benchmark runs offline.

The benchmark's `data/` folder (github.com/junyangwang0410/AMBER; the images are a separate download):

- `query/query_all.json` (or `query_generative.json`, `query_discriminative[-existence|-attribute|
  -relation].json`): [{"id": int, "image": "AMBER_1.jpg", "query": "Describe this image."}, ...];
- `annotations.json`: one entry per query id. Generative (ids 1..1004 in the release):
  {"id", "type": "generative", "truth": [objects in the image], "hallu": [hallucination-prone objects
  that are not]}; discriminative: {"id", "type": "discriminative-existence" |
  "discriminative-attribute-state" | "discriminative-attribute-number" | "discriminative-attribute-action" |
  "discriminative-relation", "truth": "yes" | "no"};
- `relation.json`: {object: [words that name it too]} (the association table: "person" <- "man", ...);
  its keys and values are the object vocabulary of the generative metrics;
- `safe_words.txt`: one word a line, never counted as a hallucination.

`load_amber(folder)` reads them (any error names the file and the entry). `write_emojicoco_amber(world, out)`
writes the same files for an EmojiCOCO world: per image a generative query ("Describe this image.") with
truth = its object categories and hallu = up to 5 absent categories that co-occur most with its own in the
world (the adversarial sampling of POPE, the closest analogue of AMBER's annotator-chosen hallucination
targets); discriminative existence questions (each present category: "yes"; each hallu category: "no") and
attribute-number questions (each present category at its true count: "yes", at one more: "no"). There are no
state, action or relation questions (EmojiCOCO scenes have no attributes or relations). relation.json maps
each COCO category to its synonyms of CHAIR's table. Image file names are the world's (`images/000001.png`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfix.data.errors import DataFormatError

GENERATIVE = "generative"
DISCRIMINATIVE_TYPES = ("discriminative-existence", "discriminative-attribute-state",
                        "discriminative-attribute-number", "discriminative-attribute-action",
                        "discriminative-relation")
QUERY_FILE = "query/query_all.json"
DESCRIBE = "Describe this image."
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
            "scissors": "scissors", "bus": "buses", "wine glass": "wine glasses", "couch": "couches",
            "sandwich": "sandwiches", "toothbrush": "toothbrushes", "bench": "benches"}


@dataclass(frozen=True)
class AmberQuery:
    """One query: its id, image file name, text, and annotation (type, truth, hallu)."""

    id: int
    image: str
    query: str
    type: str
    truth: Any
    hallu: tuple[str, ...] = ()


@dataclass(frozen=True)
class AmberSet:
    """A loaded AMBER folder: the queries (file order), the association table and the safe words."""

    queries: list[AmberQuery]
    association: dict[str, list[str]]
    safe_words: frozenset[str] = field(default_factory=frozenset)
    source: str = ""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: AMBER file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err.msg})") from None


def load_amber(folder: str | Path, query_file: str = QUERY_FILE) -> AmberSet:
    """The queries of `folder/query_file` with their annotations (`folder/annotations.json`), the
    association table (`relation.json`) and the safe words (`safe_words.txt`, optional)."""
    folder = Path(folder)
    queries_path, notes_path = folder / query_file, folder / "annotations.json"
    raw_queries, raw_notes = _read_json(queries_path), _read_json(notes_path)
    association = _read_json(folder / "relation.json")
    if not isinstance(association, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(w, str) for w in v)
            for k, v in association.items()):
        raise DataFormatError(f"{folder / 'relation.json'}: expected {{object: [associated words]}}")
    safe_path = folder / "safe_words.txt"
    safe = frozenset(w.strip() for w in safe_path.read_text(encoding="utf-8").splitlines() if w.strip()) \
        if safe_path.is_file() else frozenset()
    if not isinstance(raw_notes, list) or not isinstance(raw_queries, list):
        raise DataFormatError(f"{folder}: annotations.json and {query_file} must be JSON lists")
    notes: dict[int, dict] = {}
    for k, note in enumerate(raw_notes):
        if not isinstance(note, dict) or not isinstance(note.get("id"), int) or "type" not in note or "truth" not in note:
            raise DataFormatError(f"{notes_path}: entry {k} needs an integer 'id', a 'type' and a 'truth'")
        kind = note["type"]
        if kind == GENERATIVE:
            if not all(isinstance(note.get(key), list) for key in ("truth", "hallu")):
                raise DataFormatError(f"{notes_path}: id {note['id']}: a generative entry needs 'truth' and 'hallu' "
                                      "lists of objects")
        elif kind not in DISCRIMINATIVE_TYPES or note["truth"] not in ("yes", "no"):
            raise DataFormatError(f"{notes_path}: id {note['id']}: type {kind!r} truth {note['truth']!r}; expected "
                                  f"'generative' or one of {', '.join(DISCRIMINATIVE_TYPES)} with truth 'yes' or 'no'")
        notes[note["id"]] = note
    queries = []
    for k, q in enumerate(raw_queries):
        if not isinstance(q, dict) or not isinstance(q.get("id"), int) or not all(
                isinstance(q.get(key), str) for key in ("image", "query")):
            raise DataFormatError(f"{queries_path}: entry {k} needs an integer 'id' and 'image' and 'query' strings")
        note = notes.get(q["id"])
        if note is None:
            raise DataFormatError(f"{queries_path}: id {q['id']} has no entry in {notes_path}")
        queries.append(AmberQuery(q["id"], q["image"], q["query"], note["type"],
                                  note["truth"], tuple(note.get("hallu", ()))))
    return AmberSet(queries, association, safe, str(folder))


def _plural(name: str) -> str:
    if name in _PLURALS:
        return _PLURALS[name]
    return name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


def number_question(name: str, count: int) -> str:
    """"Is there one dog in this image?" / "Are there three people in this image?"."""
    word = _NUMBERS[count] if count < len(_NUMBERS) else str(count)
    return f"Is there one {name} in this image?" if count == 1 else f"Are there {word} {_plural(name)} in this image?"


def emojicoco_amber(instances: dict, n_hallu: int = 5) -> dict[str, Any]:
    """The AMBER files' contents ({"query/query_all.json", "annotations.json", "relation.json",
    "safe_words.txt"}) for an EmojiCOCO (COCO-format) instances dict (see the module docstring)."""
    from vlmfix.data.pope import question_text
    from vlmfix.metrics.chair_words import INVERSE_SYNONYMS

    names = {c["id"]: c["name"] for c in instances["categories"]}
    counts: dict[int, Counter] = {im["id"]: Counter() for im in instances["images"]}
    for a in instances["annotations"]:
        counts[a["image_id"]][names[a["category_id"]]] += 1
    together: Counter = Counter()
    for found in counts.values():
        together.update((x, y) for x in found for y in found if x != y)
    generative, discriminative = [], []
    for im in sorted(instances["images"], key=lambda im: im["id"]):
        present = counts[im["id"]]
        if not present:
            continue
        absent = sorted((n for n in set(names.values()) if n not in present),
                        key=lambda n: (-sum(together[(p, n)] for p in present), n))[:n_hallu]
        generative.append((im["file_name"], {"type": GENERATIVE, "truth": sorted(present), "hallu": absent},
                           DESCRIBE))
        for name in sorted(present):
            discriminative.append((im["file_name"], {"type": "discriminative-existence", "truth": "yes"},
                                   question_text(name).replace("the image", "this image")))
        for name in absent:
            discriminative.append((im["file_name"], {"type": "discriminative-existence", "truth": "no"},
                                   question_text(name).replace("the image", "this image")))
        for name, n in sorted(present.items()):
            for count, truth in ((n, "yes"), (n + 1, "no")):
                discriminative.append((im["file_name"], {"type": "discriminative-attribute-number", "truth": truth},
                                       number_question(name, count)))
    queries, notes = [], []
    for k, (image, note, query) in enumerate(generative + discriminative, 1):
        queries.append({"id": k, "image": image, "query": query})
        notes.append({"id": k, **note})
    category_names = set(names.values())
    relation = {node: sorted(w for w, n in INVERSE_SYNONYMS.items() if n == node and w != node and w.strip() == w)
                for node in sorted(category_names)}
    return {QUERY_FILE: queries, "annotations.json": notes, "relation.json": relation, "safe_words.txt": ""}


def write_emojicoco_amber(world: str | Path, out: str | Path) -> Path:
    """Write the AMBER-format split of the EmojiCOCO world in `world` (its instances.json) into `out`
    (files written whole, each replaced atomically); returns `out`."""
    import os

    world, out = Path(world), Path(out)
    instances = _read_json(world / "instances.json")
    for name, content in emojicoco_amber(instances).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(content if isinstance(content, str) else json.dumps(content, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    return out
