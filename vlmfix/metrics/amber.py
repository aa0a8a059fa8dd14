"""AMBER's metrics (Wang et al., 2023, arXiv 2311.07397, section 3.3), as pure functions of responses
and annotations (`vlmfix.data.amber`).

Generative task: the objects R_obj a response mentions are the words of the AMBER vocabulary (the keys and
values of relation.json) among its tokens, lower-cased, tokenised and lemmatised as CHAIR does
(`chair_tokenize`, `chair_lemma`), two-word entries matched first ("dining table"), then a plural the
lemmatiser does not know is reduced by the English rules ("-ies" -> "-y", "-es", "-s") or the irregular
plurals of `IRREGULAR` ("men" -> "man") when that gives a vocabulary word; words of safe_words.txt are dropped. A mention m *names* an annotated object o when m = o or
m is in relation[o]. With A_obj the image's objects ("truth") and H_obj its hallucination targets ("hallu"):

    CHAIR = 1 - |{m in R_obj naming an object of A_obj}| / |R_obj|        (mentions, not deduplicated)
    Cover = |{o in A_obj named by some m in R_obj}| / |A_obj|               (objects, deduplicated)
    Hal   = 1 if CHAIR > 0 else 0                                          (the response hallucinates)
    Cog   = |{m in R_obj naming an object of H_obj}| / |R_obj|

Over a set of responses each is micro-averaged like CHAIR_i (sums of numerators over sums of
denominators: hallucinated mentions / mentions, named objects / objects, hallucinating responses /
responses, mentions of targets / mentions), and `per_item` gives each response's numerators and
denominators for the bootstrap (`vlmfix.metrics.stats`).

Discriminative task: each answer is parsed to yes / no with POPE's rules (`vlmfix.metrics.pope`); accuracy,
precision, recall, F1 (positive class "yes", as POPE) over all questions and accuracy per type
(existence, attribute-state/number/action, relation). AMBER Score = (1 - CHAIR + F1) / 2.

Choices where the paper and its release differ or are silent, made here: no spaCy word-vector similarity
(the release also counts a noun as a hallucination target or a truth when its en_core_web_lg similarity
passes 0.8; here matching is exact through the association table, so it is deterministic and offline);
Cog is divided by the mentions, as the paper's formula (the release divides by the targets); duplicate
objects in "truth" count once for Cover.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from vlmfix.metrics.chair_lemma import lemmatize_tokens
from vlmfix.metrics.chair_tokenize import word_tokenize
from vlmfix.metrics.pope import parse_answer, pope_metrics

GENERATIVE_METRICS = ("CHAIR", "Cover", "Hal", "Cog")


def vocabulary(association: Mapping[str, Sequence[str]]) -> frozenset[str]:
    """Every object word: the association table's keys and values."""
    return frozenset(association) | frozenset(w for words in association.values() for w in words)


#: plurals WordNet's lemmatiser leaves as they are ("men" is a noun lemma of its own there)
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
             "teeth": "tooth", "mice": "mouse", "geese": "goose", "knives": "knife", "leaves": "leaf"}


def _singular(word: str, vocab: frozenset[str]) -> str:
    if word in vocab:
        return word
    if IRREGULAR.get(word) in vocab:
        return IRREGULAR[word]
    for suffix, replacement in (("ies", "y"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: len(word) - len(suffix)] + replacement in vocab:
            return word[: len(word) - len(suffix)] + replacement
    return word


def extract_objects(text: str, vocab: frozenset[str], safe_words: Iterable[str] = ()) -> list[str]:
    """The vocabulary words a response mentions, in order (see the module docstring)."""
    lemmas = [_singular(w, vocab) for w in lemmatize_tokens(word_tokenize(text.lower()))]
    safe = set(safe_words)
    found, i = [], 0
    while i < len(lemmas):
        pair = " ".join(lemmas[i:i + 2])
        if i + 1 < len(lemmas) and (pair in vocab or _singular(pair, vocab) in vocab):
            found.append(_singular(pair, vocab))
            i += 2
            continue
        if lemmas[i] in vocab:
            found.append(lemmas[i])
        i += 1
    return [w for w in found if w not in safe]


def _names(mention: str, objects: Iterable[str], association: Mapping[str, Sequence[str]]) -> set[str]:
    return {o for o in objects if mention == o or mention in association.get(o, ())}


def generative_item(response: str, truth: Sequence[str], hallu: Sequence[str],
                    association: Mapping[str, Sequence[str]], safe_words: Iterable[str] = ()) -> dict[str, Any]:
    """One response's mentions and counts: {"mentions", "hallucinated", "named", "objects", "targets"}."""
    mentions = extract_objects(response, vocabulary(association), safe_words)
    truth_set, hallu_set = set(truth), set(hallu)
    named: set[str] = set()
    hallucinated, targets = [], 0
    for m in mentions:
        hits = _names(m, truth_set, association)
        named |= hits
        if not hits:
            hallucinated.append(m)
        targets += bool(_names(m, hallu_set, association))
    return {"mentions": mentions, "hallucinated": hallucinated, "named": sorted(named), "objects": len(truth_set),
            "targets": targets}


def per_item(items: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (numerators, denominators)} of `generative_item` outputs, for the bootstrap."""
    return {
        "CHAIR": ([len(i["hallucinated"]) for i in items], [len(i["mentions"]) for i in items]),
        "Cover": ([len(i["named"]) for i in items], [i["objects"] for i in items]),
        "Hal": ([float(bool(i["hallucinated"])) for i in items], [1.0] * len(items)),
        "Cog": ([i["targets"] for i in items], [len(i["mentions"]) for i in items]),
    }


def generative_metrics(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """CHAIR, Cover, Hal, Cog (fractions) and their counts over `generative_item` outputs."""
    if not items:
        raise ValueError("no generative responses to score")
    columns = per_item(items)
    out: dict[str, Any] = {name: (sum(num) / sum(den) if sum(den) else 0.0) for name, (num, den) in columns.items()}
    out["counts"] = {"responses": len(items), "mentions": sum(len(i["mentions"]) for i in items),
                     "hallucinated_mentions": sum(len(i["hallucinated"]) for i in items),
                     "objects": sum(i["objects"] for i in items), "named_objects": sum(len(i["named"]) for i in items),
                     "target_mentions": sum(i["targets"] for i in items)}
    return out


def discriminative_metrics(answers: Sequence[str], truths: Sequence[str], types: Sequence[str],
                           rule: str = "reference") -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (yes = positive) over every question, and accuracy per type."""
    if not answers:
        raise ValueError("no discriminative answers to score")
    preds = [parse_answer(a, rule) for a in answers]
    out = pope_metrics(preds, list(truths))
    by_type: dict[str, dict[str, int]] = {}
    for pred, truth, kind in zip(preds, truths, types):
        row = by_type.setdefault(kind.removeprefix("discriminative-"), {"correct": 0, "n": 0})
        row["correct"] += pred == truth
        row["n"] += 1
    out["types"] = {k: {**v, "accuracy": v["correct"] / v["n"]} for k, v in sorted(by_type.items())}
    return out


def amber_score(chair: float, f1: float) -> float:
    """(1 - CHAIR + F1) / 2."""
    return (1 - chair + f1) / 2
