"""English noun phrases for object names (POPE questions, EmojiCOCO captions).

- indefinite: "a"/"an" by the first letter ("an" before a, e, i, o, u: "an apple", "a tv"); nouns
  that come in pairs take "a pair of" ("a pair of skis"), mass nouns stand bare ("broccoli").
- plural of the last word: irregular table, else "-es" after s, x, ch, sh, else "-s"
  ("wine glasses", "knives", "people", "sheep").
"""

from __future__ import annotations

from typing import Sequence

PAIR_NOUNS = frozenset({"skis", "scissors"})
MASS_NOUNS = frozenset({"broccoli"})
_IRREGULAR = {"person": "people", "knife": "knives", "mouse": "mice", "sheep": "sheep"}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def indefinite(noun: str) -> str:
    """'a dog', 'an umbrella', 'a pair of skis', 'broccoli'."""
    if noun in MASS_NOUNS:
        return noun
    if noun in PAIR_NOUNS:
        return f"a pair of {noun}"
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def plural(noun: str) -> str:
    """Plural of a (possibly multi-word) noun: the last word is inflected."""
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def count_phrase(noun: str, count: int) -> str:
    """'a dog', 'two dogs', 'three pairs of skis', 'broccoli' (mass nouns are not counted)."""
    if count == 1 or noun in MASS_NOUNS:
        return indefinite(noun)
    number = _NUMBERS[count] if count < len(_NUMBERS) else str(count)
    if noun in PAIR_NOUNS:
        return f"{number} pairs of {noun}"
    return f"{number} {plural(noun)}"


def is_plural_phrase(noun: str, count: int) -> bool:
    """Whether `count_phrase(noun, count)` takes a plural verb ("there are two dogs")."""
    return count > 1 and noun not in MASS_NOUNS


def join_and(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 2:
        return " and ".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def capitalize(text: str) -> str:
    """First character upper-cased, the rest untouched ('a TV' -> 'A TV')."""
    return text[:1].upper() + text[1:]
