"""POPE metrics (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models",
EMNLP 2023): answer parsing and the yes/no classification scores, as pure functions.

Answer parsing rules (``RULES``):

- ``"reference"`` (default; the POPE repository and LLaVA's ``eval_pope.py``): keep the text
  before the first "."; remove ","; split on single spaces; the answer is "no" if a word equals
  "No", "not" or "no" (case-sensitive), else "yes". Never unparsed. So "Not sure" and "NO" are
  "yes", and "Yes. There is no cat." is "yes". Surrounding whitespace is stripped first, as in
  LLaVA's answer files.
- ``"strict"``: the first word, lower-cased, with punctuation around it removed, must be "yes" or
  "no"; anything else is unparsed (``None``).
- ``"exact"`` (lmms-eval): the whole answer, lower-cased and stripped, must be "yes" or "no"
  ("Yes." is unparsed).

Metrics (positive class = "yes"), over predictions and labels:

    accuracy  = (TP + TN) / N
    precision = TP / (TP + FP)          (0 when there is no "yes" prediction)
    recall    = TP / (TP + FN)          (0 when there is no "yes" label)
    F1        = 2 P R / (P + R)         (0 when P + R = 0)
    yes_ratio = #("yes" predictions) / N

An unparsed prediction (``None``) is neither "yes" nor "no": it counts in N (so it is wrong for
accuracy and lowers the yes-ratio's share), it is a false negative when the label is "yes"
(a missed positive), and on a "no" label it is neither a true negative nor a false positive.
Hence TP + FP + TN + FN = N - (unparsed predictions on "no" labels).
Values are fractions in [0, 1]; ``format_table`` prints percentages with one decimal.

Described, with its choices and defaults, in docs/methods.md ("POPE").
"""

from __future__ import annotations

import string
from typing import Mapping, Sequence

RULES: dict[str, str] = {
    "reference": 'text before the first ".", "no" if a word is "No", "not" or "no", else "yes"',
    "strict": 'lower-cased first word must be "yes" or "no", else unparsed',
    "exact": 'whole lower-cased answer must be "yes" or "no" (lmms-eval), else unparsed',
}
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_LABELS = ("yes", "no")


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown POPE answer rule {rule!r}; valid rules: {', '.join(RULES)}")


def parse_answer(text: str, rule: str = "reference") -> str | None:
    """"yes", "no", or None (unparsed; never for the reference rule) for a model's answer."""
    _check_rule(rule)
    text = text.strip()
    if rule == "reference":
        words = text.split(".")[0].replace(",", "").split(" ")
        return "no" if any(w in ("No", "not", "no") for w in words) else "yes"
    if rule == "strict":
        first = text.split()[0].strip(string.punctuation).lower() if text.split() else ""
        return first if first in _LABELS else None
    answer = text.lower()
    return answer if answer in _LABELS else None


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def pope_metrics(preds: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1, yes-ratio (fractions) and the raw counts.

    ``preds``: "yes", "no" or None (unparsed); ``labels``: "yes" or "no". Returns
    {"accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn", "n",
    "unparsed"}; see the module docstring for how unparsed predictions count.
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    tp = fp = tn = fn = unparsed = 0
    for i, (pred, label) in enumerate(zip(preds, labels)):
        if label not in _LABELS:
            raise ValueError(f'label {i} is {label!r}; labels must be "yes" or "no"')
        if pred is not None and pred not in _LABELS:
            raise ValueError(f'prediction {i} is {pred!r}; predictions must be "yes", "no" or '
                             "None (parse raw answers with parse_answer first)")
        if pred is None:
            unparsed += 1
            fn += label == "yes"
        elif pred == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            tn += label == "no"
            fn += label == "yes"
    n = len(labels)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n, "unparsed": unparsed,
    }


def mean_over_splits(per_split: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of accuracy, precision, recall, F1 and yes-ratio over the splits."""
    if not per_split:
        raise ValueError("no POPE splits to average")
    return {m: sum(s[m] for s in per_split.values()) / len(per_split) for m in METRICS}


def format_table(per_split: Mapping[str, Mapping[str, float]], rule: str) -> str:
    """Markdown table of the splits and their mean, in percent with one decimal."""
    _check_rule(rule)
    mean = mean_over_splits(per_split)
    lines = [
        f"POPE, answers parsed with the {rule!r} rule ({RULES[rule]}).",
        "",
        "| split | accuracy | precision | recall | F1 | yes-ratio | n | unparsed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, scores in [*per_split.items(), ("mean", mean)]:
        cells = [f"{100 * scores[m]:.1f}" for m in METRICS]
        counts = [str(scores.get("n", "")), str(scores.get("unparsed", ""))]
        lines.append(f"| {name} | " + " | ".join(cells + counts) + " |")
    return "\n".join(lines) + "\n"
