"""Informative words of a question, for GIFT's saliency (arXiv 2510.22067: nouns, proper nouns, verbs, adjectives, adverbs and numbers).

A word is informative when its part of speech is NOUN, PROPN, VERB, ADJ, ADV or NUM. With spaCy
and an English pipeline installed (e.g. `en_core_web_sm`) its tagger decides; otherwise a
built-in closed-class word list does: determiners, pronouns, adpositions, conjunctions,
auxiliaries, particles and interjections are not informative, punctuation never is, and every
other word is. Tokens map to words through their character offsets in the decoded text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

INFORMATIVE_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"})

#: English closed-class words (DET, PRON, ADP, CCONJ, SCONJ, AUX, PART, INTJ) and contraction pieces
CLOSED_CLASS = frozenset("""
a an the this that these those some any each every either neither no all both half such what which whose
whatever whichever another
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its itself
we us our ours ourselves they them their theirs themselves one ones who whom whoever someone anyone everyone
something anything everything nothing somebody anybody everybody nobody
of in on at by for with about against between into through during before after above below to from up down
out off over under near onto upon within without along across behind beyond among around toward towards via
per than like as
and or but nor so yet plus
if because although though while whereas unless until since whether that once
is am are was were be been being do does did doing have has had having will would shall should can could may
might must ought 's 're 've 'd 'll 'm n't
not to there here
oh hey please yes ok okay well
""".split())

_WORD = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z]+(?:'[A-Za-z]+)?|'[A-Za-z]+|[^\sA-Za-z\d]")


def words_with_spans(text: str) -> list[tuple[str, int, int]]:
    """Words (and punctuation marks) of `text` with their [start, end) character offsets."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


@lru_cache(maxsize=1)
def _spacy():
    try:
        import spacy

        return spacy.load("en_core_web_sm", disable=["parser", "ner", "lemmatizer"])
    except Exception:  # spaCy or its English pipeline is not installed: use the word list
        return None


def informative_words(text: str, use_spacy: bool | None = None) -> list[tuple[int, int]]:
    """[start, end) character spans of the informative words of `text`.

    use_spacy: None = when available, True = required (ImportError otherwise), False = word list.
    """
    nlp = _spacy() if use_spacy is not False else None
    if use_spacy and nlp is None:
        raise ImportError("spaCy with an English pipeline is needed: pip install spacy && "
                          "python -m spacy download en_core_web_sm (or use the built-in word list)")
    if nlp is not None:
        return [(t.idx, t.idx + len(t.text)) for t in nlp(text) if t.pos_ in INFORMATIVE_POS]
    spans = []
    for word, start, end in words_with_spans(text):
        if not (word[0].isalnum() or word[0] == "'"):
            continue  # punctuation
        if word.lower() not in CLOSED_CLASS:
            spans.append((start, end))
    return spans


def informative_tokens(pieces: Sequence[str], use_spacy: bool | None = None) -> list[bool]:
    """For decoded token pieces (in order), whether each belongs to an informative word: every
    sub-word token of an informative word is informative; a token overlapping none is not."""
    text = "".join(pieces)
    spans = informative_words(text, use_spacy)
    flags, pos = [], 0
    for piece in pieces:
        start, end = pos, pos + len(piece)
        flags.append(any(s < end and start < e for s, e in spans) and bool(piece.strip()))
        pos = end
    return flags
