"""Phrase matching in clinical free text, with negation in the same clause.

CLINICAL.md "Free text": match case-insensitively and honour negation within the same sentence
("denies night pain", "no bladder or bowel dysfunction", "without leg weakness"). The approach is
NegEx-like (Chapman et al., J Biomed Inform 2001): a negation cue before the phrase, in the same
clause, within a few words, negates it. Clauses end at sentence punctuation and at contrastive
conjunctions ("denies night pain but reports leg weakness" raises leg weakness).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Clause boundaries: sentence punctuation, line breaks, and contrastive conjunctions.
_CLAUSE_SPLIT = re.compile(r"[.;:!?\n]+|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b", re.I)
_NEGATION_CUE = re.compile(
    r"\b(?:no|not|denies|denied|deny|denying|without|negative for|absence of|absent|free of|nil|"
    r"never|ruled out|rules out|resolved)\b",
    re.I,
)
# Words that end a negation's scope inside a clause ("No fever ... and now night pain").
_SCOPE_END = re.compile(
    r"\b(?:reports?|reporting|presents?|presenting|complains?|complaining|endorses?|endorsing|admits?|"
    r"now|new|describes?|developed|states?|says|notes?)\b",
    re.I,
)
# Negation written right after the finding ("Babinski sign negative", "ankle clonus absent"); not
# across a comma ("leg weakness, negative straight-leg raise" still raises leg weakness).
_POST_NEGATION = re.compile(
    r"^[ \t]+(?:\w+[ \t]+)?(?:negative|absent|not (?:present|seen|elicited|demonstrated|found)|ruled out|"
    r"denied|downgoing|flexor)\b",
    re.I,
)
# How many words may stand between a cue and the phrase, unless what stands between is a list
# ("Denies fever, chills, night sweats, bowel or bladder dysfunction or saddle anaesthesia").
_NEGATION_WINDOW_WORDS = 6
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class TextMatch:
    phrase: str  # the pattern that matched, as written in the rule file
    quote: str  # the clause that raised it, trimmed, for the card to quote


def compile_phrases(phrases: list[str]) -> list[tuple[str, re.Pattern[str]]]:
    """Each phrase is a reviewed regular-expression fragment; it must start and end at a word edge."""
    return [(p, re.compile(r"(?<!\w)(?:" + p + r")(?!\w)", re.I)) for p in phrases]


def _is_negated(clause: str, start: int, end: int) -> bool:
    if _POST_NEGATION.match(clause[end:]):
        return True
    before = clause[:start]
    cues = list(_NEGATION_CUE.finditer(before))
    if not cues:
        return False
    between = before[cues[-1].end():]
    if _SCOPE_END.search(between):
        return False
    is_list = "," in between or re.search(r"\b(?:or|and|nor)\b", between, re.I) is not None
    return is_list or len(_WORD.findall(between)) <= _NEGATION_WINDOW_WORDS


def clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSE_SPLIT.split(text) if c and c.strip()]


def find_affirmed(
    text: str,
    patterns: list[tuple[str, re.Pattern[str]]],
    exclude: list[tuple[str, re.Pattern[str]]] | None = None,
) -> TextMatch | None:
    """The first phrase affirmed (not negated, not in an excluded clause) in `text`, or None."""
    for clause in clauses(text):
        if exclude and any(p.search(clause) for _, p in exclude):
            continue
        for phrase, pattern in patterns:
            for m in pattern.finditer(clause):
                if not _is_negated(clause, m.start(), m.end()):
                    return TextMatch(phrase=phrase, quote=clause[:200])
    return None
