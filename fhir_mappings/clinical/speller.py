"""Spelling tolerance: a long word one edit away from a vocabulary word is read as that word, never
from a protected word (a real word one edit away, fhir_mappings/clinical/language/protected-words.txt).

Pure: no I/O.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# Spelling tolerance: one edit on long words, only towards the vocabulary, never from a protected word

_WORDS = re.compile(r"[A-Za-z]+")
MIN_CORRECTED_LENGTH = 7  # shorter words are too often other real words one edit away


def _deletes(word: str) -> set[str]:
    return {word[:i] + word[i + 1:] for i in range(len(word))}


def _one_edit(a: str, b: str) -> bool:
    """Optimal string alignment distance exactly 1 (substitution, insertion, deletion, transposition)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def _transposition(a: str, b: str) -> bool:
    return len(a) == len(b) and sorted(a) == sorted(b)


def _inflection(a: str, b: str) -> bool:
    """"increase" / "increased", "weakness" / "weaknesss": a word form, not a misspelling."""
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return len(long_) == len(short) + 1 and long_.startswith(short) and long_[-1] in "dr"


class Speller:
    """Corrects a word of >= 7 letters to the one vocabulary word one edit away with the same first
    letter (SymSpell-style delete index). Real words that sit one edit from the vocabulary
    ("tinkling" / "tingling") are protected in the lexicon and never corrected."""

    def __init__(self, vocabulary: set[str], protected: set[str]):
        self.vocabulary = frozenset(w for w in vocabulary if len(w) >= MIN_CORRECTED_LENGTH - 1)
        self.protected = frozenset(protected) | self.vocabulary
        self._index: dict[str, set[str]] = {}
        for word in self.vocabulary:
            for key in _deletes(word) | {word}:
                self._index.setdefault(key, set()).add(word)
        self.correct = lru_cache(maxsize=65536)(self._correct)

    def _correct(self, word: str) -> str | None:
        lower = word.lower()
        if len(lower) < MIN_CORRECTED_LENGTH - 1 or lower in self.protected:
            return None
        candidates: set[str] = set()
        for key in _deletes(lower) | {lower}:
            candidates |= self._index.get(key, set())
        found = [c for c in candidates if c[0] == lower[0] and _one_edit(lower, c) and not _inflection(lower, c)
                 and (len(lower) >= MIN_CORRECTED_LENGTH or _transposition(lower, c))]  # "equnia": six letters
        # Several: spellings of one word (paraesthesia, paresthesia); a dropped letter is the usual slip.
        return max(found, key=lambda c: (len(c), c)) if found else None

    def corrected(self, text: str) -> tuple[str, list[tuple[int, int]]] | None:
        """The text with misspellings corrected, and (new offset, old offset) anchors; None if clean."""
        pieces: list[str] = []
        anchors: list[tuple[int, int]] = []
        last = 0
        shift = 0
        for m in _WORDS.finditer(text):
            fixed = self.correct(m.group())
            if fixed is None:
                continue
            pieces.append(text[last:m.start()])
            anchors.append((m.start() + shift, m.start()))
            pieces.append(fixed)
            shift += len(fixed) - (m.end() - m.start())
            anchors.append((m.end() + shift, m.end()))
            last = m.end()
        if not pieces:
            return None
        pieces.append(text[last:])
        return "".join(pieces), anchors


def back_to_original(pos: int, anchors: list[tuple[int, int]]) -> int:
    if not anchors:
        return pos
    i = bisect_right([a for a, _ in anchors], pos) - 1
    if i < 0:
        return pos
    new, old = anchors[i]
    if i % 2 == 0 and i + 1 < len(anchors):  # inside a corrected word: clamp to its span
        return min(old + (pos - new), anchors[i + 1][1])
    return old + (pos - new)
