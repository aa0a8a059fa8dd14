"""Penn-Treebank-style word tokenisation of captions, as CHAIR's reference does it, without NLTK.

The reference calls ``nltk.word_tokenize(caption.lower())``: Punkt sentence splitting, then the
Treebank conventions per sentence. This module implements those conventions for lower-cased
caption text:

- sentences end at "?", "!" and at a "." after a word, when whitespace and another token or
  closing punctuation follow (of several marks glued to one word, only the last counts);
  a "." does not end a sentence after a known abbreviation ("mr.", "st.", "a.m."; not "e.g.",
  which Punkt's English model does not list), after an ellipsis, nor after a single letter or a
  number when a lower-case word follows (in lower-cased text Punkt's orthographic evidence never
  confirms a sentence start there). Closing quotes and brackets after the "." stay with the
  sentence it ends when whitespace follows them;
- the "." that ends a sentence becomes a token; a "." inside a sentence stays on its word
  ("mr.", "3.5", "dog.the");
- "," and ":" split off unless a digit follows ("1,000", "10:30"); "?", "!", ";", "@", "#", "$",
  "%", "&", "*", brackets, "--", the dashes U+2012..U+2015 and runs of two or more "." split off;
- double quotes become `` (opening: at the start or after a space or opening bracket) or '';
  typographic quotes split off as they are;
- clitics split off: "'s", "'m", "'d", "'ll", "'re", "'ve", "n't" and a bare "'" before a space;
  "cannot" -> "can not", "gonna" -> "gon na", "gotta", "gimme", "lemme", "wanna" (before a space),
  "d'ye", "more'n", "'tis", "'twas"; a "'" opening a word that is not a clitic splits off;
- hyphens and slashes stay inside words ("t-shirt", "and/or").

Differences from the reference: Punkt's English model knows about 150 abbreviations (many of
them US states and months) and weighs each next word's capitalisation statistics;
``ABBREVIATIONS`` below is a shorter list of the ones captions use, and the statistics are
replaced by the lower-case rule above. Checked against NLTK 3.10 (Punkt's English parameters,
``NLTKWordTokenizer``) on caption text and on 20,000 random strings of words, clitics and
punctuation: identical tokens except for 2 of the random strings (an abbreviation followed by a
lone ".").
"""

from __future__ import annotations

import re

#: Words that, followed by ".", do not end a sentence (Punkt's abbreviation types, the subset
#: that occurs in image descriptions).
ABBREVIATIONS = frozenset(
    "mr mrs ms messrs dr prof gen lt col maj adm rep sen st ave ft co corp inc ltd bros jr sr "
    "vs yr ok u.s u.k u.n u.s.a d.c a.m p.m ph.d jan feb aug sep sept oct nov dec tues wed fri"
    .split())

# Punkt's view of the text: characters that end a word without belonging to it, words that cannot
# start with some characters, and multi-character punctuation ("--", "...").
_NON_WORD = r"""[)";}\]*:@'({\[\u2018\u2019\u201c\u201d\xab\xbb?!]"""
_NO_WORD_START = "(\"`{[:;&#*@)}]-,"
_MULTI_CHAR = re.compile(r"-{2,}|\.{2,}|(?:\.\s){2,}\.")
_WORD_END = re.compile(r"\s|$|" + _NON_WORD + r"|" + _MULTI_CHAR.pattern
                       + r"|,(?=$|\s|" + _NON_WORD + r"|" + _MULTI_CHAR.pattern + r")")
_CANDIDATE = re.compile(r"[.?!](?=(?P<punct>" + _NON_WORD + r")|\s+(?P<next>\S+))")
_INITIAL = re.compile(r"[^\W\d]\.")
_NUMBER = re.compile(r"-?[.,]?\d[\d,.\-]*\.?")
_CARRIED_OVER = re.compile(r"""["')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|(?=--)|$)""")


def _last_punkt_word(chunk: str) -> str:
    """The last of Punkt's word tokens in a whitespace-free chunk."""
    i, word = 0, ""
    while i < len(chunk):
        multi = _MULTI_CHAR.match(chunk, i)
        if multi:
            end = multi.end()
        elif chunk[i] in _NO_WORD_START:
            end = i + 1
        else:
            end = _WORD_END.search(chunk, i + 1).start()
        word, i = chunk[i:end], end
    return word


def _ends_sentence(word: str, next_token: str) -> bool:
    """Punkt's decision for lower-cased text: does ``word`` (ending in . ? !) end a sentence?"""
    if word in (".", "?", "!") or not word.endswith("."):
        return True
    if re.fullmatch(r"\.\.+", word):
        return False  # an ellipsis: only an upper-case next word would start a sentence
    stem = word[:-1]
    if stem in ABBREVIATIONS or stem.rsplit("-", 1)[-1] in ABBREVIATIONS:
        return False
    if _INITIAL.fullmatch(word) or _NUMBER.fullmatch(word):
        # Punkt asks whether the next word is known to start sentences: a lower-case word or
        # in-sentence punctuation says no.
        return not (next_token[:1].isalpha() or next_token in (";", ":", ",", ".", "!", "?"))
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of a lower-cased caption (Punkt's decisions for caption text, see above)."""
    bounds, begin = [], 0
    candidates = list(_CANDIDATE.finditer(text))
    for match, following in zip(candidates, candidates[1:] + [None]):
        end = match.end()
        glued = following and not re.search(r"\s", text[end:following.start()])
        if glued and match.start() > 0 and not text[match.start() - 1].isspace():
            continue  # of the marks glued to one word ("!!!", "dog.)."), only the last counts
        chunk = re.split(r"\s", text[begin:end])[-1]
        if not _ends_sentence(_last_punkt_word(chunk), match.group("next") or match.group("punct")):
            continue
        bounds.append((begin, end))
        begin = match.start("next") if match.group("next") else end
    bounds.append((begin, len(text.rstrip())))
    for k in range(1, len(bounds)):  # closing quotes and brackets stay with their sentence
        carried = _CARRIED_OVER.match(text, bounds[k][0], bounds[k][1])
        if carried:
            bounds[k - 1] = (bounds[k - 1][0], bounds[k][0] + len(carried.group().rstrip()))
            bounds[k] = (carried.end(), bounds[k][1])
    sentences = [text[a:b] for a, b in bounds]
    return [s.strip() for s in sentences if s.strip()]


# Rules applied in order to one sentence (padding tokens with spaces), then a split on spaces.
_OPENING = [
    (re.compile(r"([«“‘„]|`+)"), r" \1 "),
    (re.compile(r'^"'), "``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"""([ (\[{<])("|'')"""), r"\1 `` "),
    (re.compile(r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), "' "),
]
_PUNCTUATION = [
    (re.compile(r"""([^.])\.([\])}>"'»”’ ]*)\s*$"""), r"\1 . \2 "),  # the sentence's "."
    (re.compile(r"([:,])(\D)"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&\u2012-\u2015?!*\[\](){}<>]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"--"), " -- "),
]
_CLOSING = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[smd]|') ", re.I), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'re|'ve|n't) ", re.I), r"\1 \2 "),
]
_SPLIT_WORDS = [
    re.compile(pattern, re.I) for pattern in (
        r"\b(can)(not)\b", r"\b(d)('ye)\b", r"\b(gim)(me)\b", r"\b(gon)(na)\b",
        r"\b(got)(ta)\b", r"\b(lem)(me)\b", r"\b(more)('n)\b", r"\b(wan)(na)(?=\s)",
        r" ('t)(is)\b", r" ('t)(was)\b")
]


def tokenize_sentence(sentence: str) -> list[str]:
    """Treebank tokens of one sentence."""
    text = sentence
    for pattern, replacement in _OPENING + _PUNCTUATION:
        text = pattern.sub(replacement, text)
    text = f" {text} "
    for pattern, replacement in _CLOSING:
        text = pattern.sub(replacement, text)
    for pattern in _SPLIT_WORDS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Tokens of a caption: ``nltk.word_tokenize`` for lower-cased caption text."""
    return [token for sentence in split_sentences(text) for token in tokenize_sentence(sentence)]
