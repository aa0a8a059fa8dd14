"""Lemmas of caption tokens as CHAIR's reference computes them, without NLTK or its data.

The reference (the Python 3 port of CHAIR used by OPERA, PAI, DeCo, GIFT) POS-tags the tokens
with NLTK's averaged-perceptron tagger and lemmatises each with ``WordNetLemmatizer`` under the
tag's WordNet part of speech (J -> adjective, V -> verb, N -> noun, R -> adverb, else noun).

Lemmatiser: WordNet's morphy, as NLTK 3.10 runs it. For a part of speech, the candidates of a
word are the word itself plus either its exception-list entries (when it has some) or one
application of each suffix rule; the candidates that are WordNet lemmas are kept and the
shortest wins, the earliest on a tie; with none, the word stays as it is (some older NLTK
releases went on applying the rules to such non-words: "womens" -> "woman"). This reproduces
WordNet's own quirks: "men" stays "men" (a WordNet noun, tied in length with "man"), "people"
stays "people", "vases" becomes "vas", while "women" -> "woman", "children" -> "child",
"knives" -> "knife", "mice" -> "mouse", "geese" -> "goose", "oxen" -> "ox", "glasses" ->
"glass", "skis" -> "ski", "scissors" stays "scissors". The lexicon is WordNet restricted to what
can reach a CHAIR token (``chair_lexicon``), so the lemma is exact whenever it can matter.

Part of speech (differences from the reference, by design): no tagger model ships here, so the
part of speech is decided only where it can change a CHAIR token, by rules:

- every token is lemmatised as a noun, except an "-ed"/"-ing" or irregular verb form whose verb
  lemma differs from its noun lemma ("seated" -> seat, "tied" -> tie, "skiing" -> ski,
  "taxiing" -> taxi, "born" -> bear, "potted" -> pot, "parking" -> park) and that is not itself
  a synonym-table word ("moped" stays a moped, "stove" a stove);
- such a form is read as a verb after a form of "be"/"have"/"get" ("is skiing"); otherwise not
  when it stands first or after a determiner, numeral, preposition or sentence punctuation ("a
  potted plant", "two parking meters", "for skiing"), nor when it is one of a few everyday
  "-ing" nouns ("parking", "training", "bowling", ...); otherwise it is a verb ("a man seated at
  a table", "a plane taxiing", "a dog tied to a bench" mention a chair, a car and a tie, as in
  the reference);
- consequences: plural nouns are never read as verbs or adjectives, where the reference's tagger
  occasionally loses them ("geese" or "several potted plants" mistagged); adjective comparatives
  are not reduced ("hotter" stays "hotter"); and "-ed"/"-ing" forms follow these rules where the
  tagger follows its weights ("a seated woman" is a chair for the tagger, not here). The rules
  were checked against an averaged-perceptron tagger of the same design on caption-style
  sentences (about 85% agreement on these forms), not against NLTK's exact weights.
"""

from __future__ import annotations

from typing import Sequence

from vlmfix.metrics.chair_lexicon import NOUN_EXCEPTIONS, NOUN_LEMMAS, VERB_EXCEPTIONS, VERB_LEMMAS
from vlmfix.metrics.chair_words import INVERSE_SYNONYMS

# WordNet's detachment rules (morphy), as (suffix, replacement), in WordNet's order.
_NOUN_RULES = (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"),
               ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y"))
_VERB_RULES = (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
               ("ing", "e"), ("ing", ""))

_BE_HAVE_GET = frozenset(
    "is are was were be been being am 's 're 'm has have had 've get gets got getting".split())
# "-ing" forms that are everyday nouns: tagged NN unless a form of "be"/"have"/"get" precedes.
_ING_NOUNS = frozenset(
    "parking training shipping bowling bedding bearing trucking monitoring".split())
_NOMINAL_CONTEXT = frozenset(
    "a an the this that these those some any each every no another either neither both all "
    "several many few my your his her its our their one two three four five six seven eight "
    "nine ten of in on at for with by from to into onto about near under over through during "
    "without behind beside besides between across along around against toward towards upon "
    "like . ! ? ; : `` '' ( )".split())


def _morphy(word: str, rules: tuple[tuple[str, str], ...],
            exceptions: dict[str, tuple[str, ...]], lemmas: frozenset[str]) -> str:
    if word in exceptions:
        candidates = [word, *exceptions[word]]
    else:
        candidates = [word] + [word[: len(word) - len(old)] + new
                               for old, new in rules if word.endswith(old)]
    found = [c for c in candidates if c in lemmas]
    return min(found, key=len) if found else word


def noun_lemma(word: str) -> str:
    """WordNet noun lemma (``WordNetLemmatizer().lemmatize(word, "n")``) where it can matter."""
    return _morphy(word, _NOUN_RULES, NOUN_EXCEPTIONS, NOUN_LEMMAS)


def verb_lemma(word: str) -> str:
    """WordNet verb lemma (``WordNetLemmatizer().lemmatize(word, "v")``) where it can matter."""
    return _morphy(word, _VERB_RULES, VERB_EXCEPTIONS, VERB_LEMMAS)


def _verb_sensitive(word: str) -> bool:
    """An inflected verb form whose reading (verb or not) changes a CHAIR-relevant lemma."""
    if word in INVERSE_SYNONYMS:
        return False
    irregular = word in VERB_EXCEPTIONS and not word.endswith("s")  # "born", "lit", not "taxis"
    if not (word.endswith(("ed", "ing")) or irregular):
        return False
    return verb_lemma(word) != noun_lemma(word)


def _reads_as_verb(tokens: Sequence[str], i: int) -> bool:
    prev = tokens[i - 1] if i > 0 else None
    if prev in _BE_HAVE_GET:
        return True
    if tokens[i] in _ING_NOUNS:
        return False
    return prev is not None and prev not in _NOMINAL_CONTEXT


def lemmatize_tokens(tokens: Sequence[str]) -> list[str]:
    """Lemmas of a lower-cased, tokenised caption (one per token, in order)."""
    return [verb_lemma(tok) if _verb_sensitive(tok) and _reads_as_verb(tokens, i)
            else noun_lemma(tok)
            for i, tok in enumerate(tokens)]
