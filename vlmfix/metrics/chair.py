"""CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018), with the
Recall metric of the Python 3 port used by OPERA, PAI, DeCo and GIFT.

A caption is parsed into COCO object mentions: lower-case, tokenise (``chair_tokenize``),
lemmatise (``chair_lemma``), merge the two-word phrases of ``chair_words.DOUBLE_WORDS`` scanning
left to right, drop "seat" when "toilet" also occurs, keep the synonym-table words and map each
to its node word (``chair_words.INVERSE_SYNONYMS``). Mentions are not deduplicated.

Ground truth of an image = node words of its instance annotations' categories (through the
synonym table) ∪ node words parsed from its reference captions. A mention is hallucinated when
its node word is not in the image's ground truth. Over a set of generated captions:

    CHAIR_s = #(captions with at least one hallucinated mention) / #captions
    CHAIR_i = #(hallucinated mentions) / #(mentions)
    Recall  = Σ |ground-truth node words mentioned| / Σ |ground-truth node words|
    Len     = mean number of tokens per caption after phrase merging

CHAIR_s, CHAIR_i and Recall are fractions in [0, 1] (papers print ×100); Len is in tokens (the
reference stores 0.01 × Len so that its ×100 printing shows tokens).

Differences from the reference script:

- no NLTK: tokenisation, part of speech and lemmas are computed here; see ``chair_tokenize``
  and ``chair_lemma`` for what is exact (WordNet lemmas of every word that can become a COCO
  mention) and what is approximated (Punkt's abbreviation list, the tagger's verb/noun choice
  for "-ed"/"-ing" forms such as "seated", "skiing", "tied");
- ``hallucination_idxs`` are token indices (before phrase merging, as in the reference) of each
  hallucinated mention's first token; the reference misaligns them after a dropped "seat";
- CHAIR_i and Recall are 0 when there is no mention / no ground truth (the reference divides by
  zero); per-caption metrics hold CHAIR_s, CHAIR_i and Recall only (no BLEU/METEOR/CIDEr);
- errors in the annotation files name the file and the entry instead of raising KeyError.

Described, with its choices and defaults, in docs/methods.md ("CHAIR").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from vlmfix.data.errors import DataFormatError
from vlmfix.metrics.chair_lemma import lemmatize_tokens
from vlmfix.metrics.chair_tokenize import word_tokenize
from vlmfix.metrics.chair_words import DOUBLE_WORDS, INVERSE_SYNONYMS

Source = Union[str, os.PathLike, Mapping[str, Any]]


@dataclass(frozen=True)
class ParsedCaption:
    """A caption's tokens after phrase merging and its COCO mentions (in order)."""

    words: list[str]             # lemmatised tokens after phrase merging ("Len" counts these)
    mentions: list[str]          # synonym-table words mentioned
    node_words: list[str]        # their node words
    token_indices: list[int]     # index of each mention's first token, before merging


def parse_caption(caption: str) -> ParsedCaption:
    """Parse one caption into CHAIR's mentions (see the module docstring)."""
    lemmas = lemmatize_tokens(word_tokenize(caption.lower()))
    merged: list[tuple[str, int]] = []
    i = 0
    while i < len(lemmas):
        phrase = DOUBLE_WORDS.get(" ".join(lemmas[i:i + 2]))
        merged.append((phrase, i) if phrase else (lemmas[i], i))
        i += 2 if phrase else 1
    words = [word for word, _ in merged]
    if "toilet" in words and "seat" in words:
        merged = [(word, idx) for word, idx in merged if word != "seat"]
    kept = [(word, idx) for word, idx in merged if word in INVERSE_SYNONYMS]
    return ParsedCaption(
        words=words,
        mentions=[word for word, _ in kept],
        node_words=[INVERSE_SYNONYMS[word] for word, _ in kept],
        token_indices=[idx for _, idx in kept],
    )


def _load(source: Source, kind: str) -> tuple[Mapping[str, Any], str]:
    """(JSON object, name for messages) of a path or an already-loaded dict."""
    if isinstance(source, Mapping):
        return source, f"{kind} (dict)"
    path = Path(source)
    name = str(path)
    if not path.is_file():
        raise DataFormatError(f"{name}: {kind} file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataFormatError(f"{name}: {kind} file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{name}: not valid JSON (line {err.lineno}, column {err.colno}: "
                              f"{err.msg})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{name}: expected a COCO-format JSON object, got "
                              f"{type(data).__name__}")
    return data, name


def _list_field(data: Mapping[str, Any], field: str, name: str) -> list:
    if field not in data:
        raise DataFormatError(f"{name}: missing field {field!r}")
    if not isinstance(data[field], list):
        raise DataFormatError(f"{name}: field {field!r} must be a list")
    return data[field]


def _entry(item: Any, fields: Sequence[str], name: str, where: str) -> list:
    if not isinstance(item, Mapping):
        raise DataFormatError(f"{name}: {where} is not an object")
    missing = [f for f in fields if f not in item]
    if missing:
        raise DataFormatError(f"{name}: {where} lacks {', '.join(map(repr, missing))}")
    return [item[f] for f in fields]


def _image_ids(data: Mapping[str, Any], name: str) -> set | None:
    if "images" not in data:
        return None
    return {_entry(im, ["id"], name, f"images[{k}]")[0]
            for k, im in enumerate(_list_field(data, "images", name))}


def _check_image(image_id: Any, listed: set | None, name: str, where: str) -> None:
    if listed is not None and image_id not in listed:
        raise DataFormatError(f"{name}: {where} has image_id {image_id!r}, which is not in "
                              "the file's 'images'")


class CHAIR:
    """CHAIR evaluator over COCO-format instances and captions (paths or loaded dicts)."""

    def __init__(self, instances: Source, captions: Source) -> None:
        self.ground_truth: dict[Any, set[str]] = {}
        self._add_instances(*_load(instances, "instances"))
        self._add_captions(*_load(captions, "captions"))

    def _objects(self, image_id: Any) -> set[str]:
        return self.ground_truth.setdefault(image_id, set())

    def _add_instances(self, data: Mapping[str, Any], name: str) -> None:
        listed = _image_ids(data, name)
        names = {}
        for k, cat in enumerate(_list_field(data, "categories", name)):
            cat_id, cat_name = _entry(cat, ["id", "name"], name, f"categories[{k}]")
            if cat_name not in INVERSE_SYNONYMS:
                raise DataFormatError(f"{name}: categories[{k}] name {cat_name!r} is not a COCO "
                                      "object of the CHAIR synonym table")
            names[cat_id] = cat_name
        for k, ann in enumerate(_list_field(data, "annotations", name)):
            where = f"annotations[{k}]"
            image_id, cat_id = _entry(ann, ["image_id", "category_id"], name, where)
            if cat_id not in names:
                raise DataFormatError(f"{name}: {where} has category_id {cat_id!r}, which is "
                                      "not in 'categories'")
            _check_image(image_id, listed, name, where)
            self._objects(image_id).add(INVERSE_SYNONYMS[names[cat_id]])
        for image_id in listed or ():
            self._objects(image_id)

    def _add_captions(self, data: Mapping[str, Any], name: str) -> None:
        listed = _image_ids(data, name)
        for k, ann in enumerate(_list_field(data, "annotations", name)):
            where = f"annotations[{k}]"
            image_id, caption = _entry(ann, ["image_id", "caption"], name, where)
            if not isinstance(caption, str):
                raise DataFormatError(f"{name}: {where} caption is not a string")
            _check_image(image_id, listed, name, where)
            self._objects(image_id).update(parse_caption(caption).node_words)
        for image_id in listed or ():
            self._objects(image_id)

    def caption_to_objects(self, caption: str) -> tuple[list[str], list[str]]:
        """(synonym-table words mentioned, their node words), in caption order."""
        parsed = parse_caption(caption)
        return parsed.mentions, parsed.node_words

    def compute(self, generated: Sequence[Mapping[str, Any]]) -> dict:
        """CHAIR_s, CHAIR_i, Recall, Len and per-caption details of generated captions.

        ``generated``: [{"image_id": ..., "caption": "..."}, ...]; every image_id must be in the
        annotations. Returns {"CHAIRs", "CHAIRi", "Recall", "Len", "counts", "sentences"}.
        """
        if not generated:
            raise ValueError("no generated captions to evaluate")
        sentences = []
        totals = dict.fromkeys(
            ("captions", "hallucinated_captions", "mentions", "hallucinated_mentions",
             "gt_objects", "gt_objects_mentioned", "words"), 0)
        for k, item in enumerate(generated):
            image_id, caption = self._generated(item, k)
            gt = self.ground_truth[image_id]
            parsed = parse_caption(caption)
            hallucinated = [(word, node, idx) for word, node, idx in
                            zip(parsed.mentions, parsed.node_words, parsed.token_indices)
                            if node not in gt]
            recalled = set(parsed.node_words) & gt
            totals["captions"] += 1
            totals["hallucinated_captions"] += bool(hallucinated)
            totals["mentions"] += len(parsed.mentions)
            totals["hallucinated_mentions"] += len(hallucinated)
            totals["gt_objects"] += len(gt)
            totals["gt_objects_mentioned"] += len(recalled)
            totals["words"] += len(parsed.words)
            sentences.append({
                "image_id": image_id,
                "caption": caption,
                "words": parsed.words,
                "mscoco_generated_words": parsed.node_words,
                "mscoco_gt_words": sorted(gt),
                "mscoco_hallucinated_words": [(word, node) for word, node, _ in hallucinated],
                "hallucination_idxs": [idx for _, _, idx in hallucinated],
                "metrics": {
                    "CHAIRs": int(bool(hallucinated)),
                    "CHAIRi": _ratio(len(hallucinated), len(parsed.mentions)),
                    "Recall": _ratio(len(recalled), len(gt)),
                },
            })
        return {
            "CHAIRs": totals["hallucinated_captions"] / totals["captions"],
            "CHAIRi": _ratio(totals["hallucinated_mentions"], totals["mentions"]),
            "Recall": _ratio(totals["gt_objects_mentioned"], totals["gt_objects"]),
            "Len": totals["words"] / totals["captions"],
            "counts": totals,
            "sentences": sentences,
        }

    def _generated(self, item: Any, k: int) -> tuple[Any, str]:
        if not isinstance(item, Mapping) or "image_id" not in item or "caption" not in item:
            raise ValueError(f"generated caption {k} must be a dict with 'image_id' and "
                             f"'caption', got {item!r:.80}")
        image_id, caption = item["image_id"], item["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"generated caption {k} (image_id {image_id!r}): caption is "
                             f"{type(caption).__name__}, not str")
        if image_id not in self.ground_truth:
            raise ValueError(f"generated caption {k}: image_id {image_id!r} "
                             f"({type(image_id).__name__}) is not in the instances or captions "
                             "annotations")
        return image_id, caption


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0
