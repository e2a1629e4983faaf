"""ConText (Harkema, Dowling, Thornblade, Chapman: J Biomed Inform 2009;42:839): the negation,
hypothetical, other-person, historical and uncertain status of a mention within its sentence, with
pseudo-cues, terminations, template answers, section headers and list lead-ins.

Pure: no I/O. This module is one algorithm over one sentence model (`TextContext`), so it stays in
one file although it is over 300 lines: splitting the cue scan from the sentence model would split
one state machine across two files.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

from fhir_mappings.clinical.phrases import compile_phrase, dispatch, phrase_firsts

# ---------------------------------------------------------------------------------------------
# Context (ConText)

NEGATED, OTHER, HYPOTHETICAL, HISTORICAL, UNCERTAIN = "negated", "other", "hypothetical", "historical", "uncertain"
_CATEGORIES = (NEGATED, OTHER, HYPOTHETICAL, HISTORICAL, UNCERTAIN)


@dataclass(frozen=True)
class Context:
    negated: bool = False
    hypothetical: bool = False
    other_experiencer: bool = False
    historical: bool = False
    uncertain: bool = False

    @property
    def status(self) -> str:
        if self.negated:
            return "absent"
        if self.other_experiencer:
            return "other"
        if self.hypothetical:
            return "hypothetical"
        if self.historical:
            return "historical"
        if self.uncertain:
            return "uncertain"
        return "present"


@dataclass(frozen=True)
class Cue:
    category: str  # one of _CATEGORIES, "pseudo" or "terminate"
    direction: str  # forward, backward, both
    start: int
    end: int
    window: int  # words of scope


@dataclass(frozen=True)
class ContextRules:
    """Compiled cue lexicon: one alternation, longest cue first, each alternative a named group."""

    pattern: re.Pattern[str]  # every cue, one pass
    kinds: list[tuple[re.Pattern[str], str, str, int]]  # (cue pattern, category, direction, window)
    current: re.Pattern[str]  # "for 3 weeks", "ongoing": what is said is happening now
    current_kinds: list[tuple[re.Pattern[str], str, str, int]]
    section_pattern: re.Pattern[str]
    section_groups: dict[str, str]  # group name -> category ("" for a neutral header)
    template_negative: re.Pattern[str]
    template_positive: re.Pattern[str]
    patient_subject: re.Pattern[str]

    @classmethod
    def from_data(cls, data: dict, lexicon: dict[str, str]) -> "ContextRules":
        cues, current = _cue_alternation(data["cues"], lexicon)
        section_groups: dict[str, str] = {}
        section_alternatives = []
        for i, (category, headers) in enumerate(data["sections"].items()):
            section_groups[f"s{i}"] = "" if category == "neutral" else category
            section_alternatives.append(f"(?P<s{i}>" + "|".join(compile_phrase(h, lexicon) for h in headers) + ")")
        section_pattern = re.compile(
            r"(?:^|(?<=[\n.;]))[ \t*#>-]*(?:" + "|".join(section_alternatives) + r")[ \t]*(?:[:>]|-(?=\s)|\n)",
            re.I | re.M)
        answers = data["template_answers"]
        return cls(
            pattern=cues[0],
            kinds=cues[1],
            current=current[0],
            current_kinds=current[1],
            section_pattern=section_pattern,
            section_groups=section_groups,
            template_negative=re.compile(r"^\s*(?:" + "|".join(answers["negative"]) + r")(?!\w)", re.I),
            template_positive=re.compile(r"^\s*(?:" + "|".join(answers["positive"]) + r")(?!\w)", re.I),
            patient_subject=re.compile(r"(?<!\w)(?:" + "|".join(data["patient_subjects"]) + r")(?!\w)", re.I),
        )


def _cue_alternation(specs: list[dict], lexicon: dict[str, str]):
    """(pattern, kinds) for the cues, and apart the "current" cues (read only on a historical cue,
    which is rare). `pattern` finds every cue in one pass (no capture groups: with hundreds of
    them the engine would spend its time saving marks); `kinds` then tells, for the few cues
    found, which (category, direction, window) each is (`_cue_kinds`)."""
    out = {}
    for want_current in (False, True):
        alternatives: list[tuple[str, frozenset[str] | None]] = []
        kinds: list[tuple[re.Pattern[str], str, str, int]] = []
        for spec in specs:
            if (spec["category"] == "current") != want_current:
                continue
            phrases = spec["phrases"]
            if isinstance(phrases, dict):  # reviewed regexes, with their own boundaries
                mine = [(source, None) for source in phrases.values()]
            else:
                mine = [(r"(?<![\w?])(?:" + compile_phrase(ph, lexicon) + r")(?!\w)", phrase_firsts(ph, lexicon))
                        for ph in phrases]
            alternatives += mine
            kinds.append((re.compile("|".join(f"(?:{src})" for src, _ in mine), re.I),
                          spec["category"], spec.get("direction", "forward"), spec.get("window", 8)))
        # Longer cues first within each first-character group: "no improvement" before "no".
        alternatives.sort(key=lambda a: -len(a[0]))
        out[want_current] = (re.compile(dispatch(alternatives), re.I), kinds)
    return out[False], out[True]


def _cue_kinds(rules: "ContextRules", text: str, m: re.Match) -> list[tuple[str, str, int]]:
    """Every kind whose pattern matches the whole cue `m` ("absent" negates forwards and backwards;
    "cannot be excluded" is a pseudo-negation and an uncertainty)."""
    return _cue_kinds_of(rules.kinds, text, m)


def _cue_kinds_of(kinds, text: str, m: re.Match) -> list[tuple[str, str, int]]:
    out = [(category, direction, window) for pattern, category, direction, window in kinds
           if pattern.fullmatch(text, m.start(), m.end())]
    if not out:  # a cue whose lookahead reads past its end ("?" before "CES")
        for pattern, category, direction, window in kinds:
            found = pattern.match(text, m.start())
            if found and found.end() == m.end():
                out.append((category, direction, window))
    return out


# Sentence ends: line breaks, semicolons, bars and bullets, and a full stop or "!" before a space.
# A quote mark at a word's edge (not the apostrophe of "can't"): "legs 'giving way'", "I can't feel my 'bum'".
EDGE_QUOTES = re.compile("(?<![A-Za-z])['\u2018\u2019\"\u201c\u201d]|['\u2018\u2019\"\u201c\u201d](?![A-Za-z])")
_WRAP_WIDTH = 50  # a line this long that stops mid-sentence was wrapped, not ended
_SENTENCE_END = re.compile(r"\n|;|\||•|(?<=[^\s.])[.!](?=\s|$)")
_WORDS_BETWEEN = re.compile(r"[\w/+-]+")
# A negation that a long finding can hold and still be negated by ("bone scan negative for
# metastases"); never the "not" of "not passed urine" or "walking not possible".
_INNER_NEGATION = re.compile(r"negative|no evidence|free of|neg for", re.I)
_PARAGRAPH_END = re.compile(r"\n\s*\n")
_DEVELOPS = re.compile(r"(?:has )?develop\w*", re.I)  # "if she developed leg weakness" stays hypothetical
_STRONG_TERMINATION = re.compile(r"but|however|whereas|although|though|yet|except|apart from|aside from", re.I)
_NEW_LABEL = re.compile(r"[A-Za-z][A-Za-z/ ]{1,30}:\s|\s\d{1,2}[).]\s")
_LIST_MARK = re.compile(r",|\b(?:or|and|nor)\b|/", re.I)
# A template answer follows the finding: "Clonus: nil", "Retention - no", "Weakness? Y", "Retention ✗".
# The finding may end the label ("Numbness in the saddle area: absent"): up to three more words.
_TEMPLATE_SEPARATOR = re.compile(r"^(?:[ \t/]*[\w/()'-]+){0,3}?[ \t]*(?:[:=]|\?|-(?=\s))[ \t]*|^[ \t]+(?=[✓✔✗✘☑☒])")
_WORD = re.compile(r"[A-Za-z]")
_TEMPLATE_VALUE_END = re.compile(r"[,;\n|.]|\s{2,}")


def _wrapped(text: str, newline: int) -> bool:
    """A line break inside a sentence (a hard-wrapped note): a long line that does not end a
    sentence, followed by a line that carries on in lower case."""
    line_start = text.rfind("\n", 0, newline) + 1
    before = text[line_start:newline].rstrip()
    after = text[newline + 1:newline + 2]
    return len(before) >= _WRAP_WIDTH and before[-1:] not in ".:;!?" and after.islower()


def join_wrapped_lines(text: str) -> str:
    """A hard-wrapped note's line breaks inside a sentence become spaces (same length, same offsets)."""
    breaks = [m.start() for m in re.finditer("\n", text) if _wrapped(text, m.start())]
    if not breaks:
        return text
    chars = list(text)
    for i in breaks:
        chars[i] = " "
    return "".join(chars)


def sentence_bounds(text: str) -> list[tuple[int, int]]:
    bounds = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if m.group() == "\n" and _wrapped(text, m.start()):
            continue
        if m.start() > start:
            bounds.append((start, m.start()))
        start = m.end()
    if start < len(text):
        bounds.append((start, len(text)))
    return bounds or [(0, len(text))]


@dataclass
class Sentence:
    start: int
    end: int
    context: "TextContext"
    _cues: list[Cue] | None = None

    @property
    def cues(self) -> list[Cue]:
        """Read on the first mention in this sentence only: most sentences of a note mention nothing."""
        if self._cues is None:
            self._cues = self.context._cues(self.start, self.end)
        return self._cues


class TextContext:
    """The context of one text: its sentences and sections, computed once, read per mention."""

    def __init__(self, text: str, rules: ContextRules):
        self.text = text
        self.rules = rules
        self.sentences = [Sentence(start, end, self) for start, end in sentence_bounds(text)]
        self._starts = [s.start for s in self.sentences]
        self.sections = self._sections()

    def _cues(self, start: int, end: int) -> list[Cue]:
        cues = []
        for m in self.rules.pattern.finditer(self.text, start, end):
            for category, direction, window in _cue_kinds(self.rules, self.text, m):
                cues.append(Cue(category, direction, m.start(), m.end(), window))
        return cues

    def _sections(self) -> list[tuple[int, int, str]]:
        """(start, end, category) of each hypothetical / other / historical section's scope."""
        headers = [(m.start(), m.end(), self.rules.section_groups[m.lastgroup])
                   for m in self.rules.section_pattern.finditer(self.text)]
        scopes = []
        for i, (_, end, category) in enumerate(headers):
            if not category:
                continue
            limit = headers[i + 1][0] if i + 1 < len(headers) else len(self.text)
            # Plan and safety-netting run to the end of their paragraph; family and past history
            # lists to the end of their sentence, so "PMH: Ca breast. Presents with leg weakness"
            # is read as now (a missed emergency is the worse error).
            stop = re.compile(r"\n\s*\n" if category == HYPOTHETICAL else r"\n|(?<=[^\s.])[.;](?=\s|$)")
            m = stop.search(self.text, end, limit)
            scopes.append((end, m.start() if m else limit, category))
        return scopes + self._lead_ins()

    def _lead_ins(self) -> list[tuple[int, int, str]]:
        """A line that ends in a colon and carries a cue leads a list that follows it to the end of
        its paragraph: "Attend A&E at once if she develops any of the following:" / "- leg weakness"."""
        scopes = []
        for sentence in self.sentences:
            if not self.text[sentence.start:sentence.end].rstrip().endswith(":"):
                continue
            kinds = {c.category for c in sentence.cues} & {HYPOTHETICAL, NEGATED, OTHER}
            if not kinds:
                continue
            body = re.compile(r"\s*").match(self.text, sentence.end).end()  # the list starts after its own blank line
            stop = _PARAGRAPH_END.search(self.text, body)
            for category in kinds:
                scopes.append((sentence.end, stop.start() if stop else len(self.text), category))
        return scopes

    def sentence_of(self, pos: int) -> Sentence:
        i = max(bisect_right(self._starts, pos) - 1, 0)
        return self.sentences[i]

    def context(self, start: int, end: int) -> Context:
        sentence = self.sentence_of(start)
        found = {c: False for c in _CATEGORIES}
        for s_start, s_end, category in self.sections:
            if s_start <= start < s_end:
                found[category] = True
        informant_at = min((c.end for c in sentence.cues if c.category == "informant" and c.end <= start), default=None)
        for cue in sentence.cues:
            if cue.category not in _CATEGORIES or found[cue.category]:
                continue
            if cue.category == OTHER and informant_at is not None and cue.start >= informant_at:
                continue  # "Daughter reports her mother has been wetting the bed": the mother is the patient
            if (cue.category == NEGATED and cue.direction == "forward" and start < cue.start and cue.end <= end
                    and _INNER_NEGATION.match(self.text, cue.start)):
                found[NEGATED] = True  # a negation inside a long finding ("bone scan negative for metastases")
            elif self._in_scope(cue, start, end, sentence):
                found[cue.category] = True
        if found[HISTORICAL] and self._said_current(start, end, sentence):
            found[HISTORICAL] = False
        template = self._template_answer(end, sentence)
        if template == "negative":
            found[NEGATED] = True
        elif template == "positive":
            found[NEGATED] = False  # "Leg weakness: yes" answers the template, whatever came before
        return Context(negated=found[NEGATED], hypothetical=found[HYPOTHETICAL], other_experiencer=found[OTHER],
                       historical=found[HISTORICAL], uncertain=found[UNCERTAIN])

    def _in_scope(self, cue: Cue, start: int, end: int, sentence: Sentence) -> bool:
        if cue.direction in ("forward", "both") and cue.start < start:
            # A cue running into the target ("no acute" before "ACUTE DISTRESS") still precedes it.
            return self._reaches(cue, min(cue.end, start), start, sentence, forward=True)
        if cue.direction in ("backward", "both") and cue.start >= end:
            return self._reaches(cue, end, cue.start, sentence, forward=False)
        return False

    def _reaches(self, cue: Cue, gap_start: int, gap_end: int, sentence: Sentence, forward: bool) -> bool:
        between = self.text[gap_start:gap_end]
        if any(c.category == "terminate" and gap_start <= c.start and c.end <= gap_end
               and ((cue.category != OTHER and forward) or _STRONG_TERMINATION.fullmatch(self.text, c.start, c.end))
               and not (cue.category == HYPOTHETICAL and _DEVELOPS.fullmatch(self.text, c.start, c.end))
               for c in sentence.cues):
            return False  # a relative's story runs on ("brother developed cord compression"), and a cue
            # after its finding reaches back over "which" ("leg weakness, which resolved"), to a "but"
        if cue.category == NEGATED and _NEW_LABEL.search(between):
            return False  # "COMPLICATIONS: None DIAGNOSIS: 1) ...": a template's next field
        if cue.category == UNCERTAIN and forward and "," in between:
            return False  # "consistent with metastasis, hx RCC": the suspicion is the first finding's
        if cue.category == OTHER and forward and self.rules.patient_subject.search(between):
            return False  # "mother had breast Ca; she now has ..." is about the patient again
        if not forward and cue.category == NEGATED and "," in between:
            return False  # "Leg weakness, negative straight-leg raise": the negation is the test's
        words = len(_WORDS_BETWEEN.findall(between))
        if words <= cue.window:
            return True
        # A negation list runs as far as the list does ("Denies fever, chills, ... or retention").
        return forward and cue.category == NEGATED and cue.window >= 4 and _LIST_MARK.search(between) is not None

    def _said_current(self, start: int, end: int, sentence: Sentence) -> bool:
        for m in self.rules.current.finditer(self.text, sentence.start, sentence.end):
            directions = {d for _, d, _ in _cue_kinds_of(self.rules.current_kinds, self.text, m)}
            before = m.end() <= start
            if not directions & ({"forward", "both"} if before else {"backward", "both"}):
                continue
            between = self.text[m.end():start] if before else self.text[end:m.start()]
            if "," not in between and len(_WORDS_BETWEEN.findall(between)) <= 4:
                return True
        return False

    def _template_answer(self, end: int, sentence: Sentence) -> str | None:
        rest = self.text[end:sentence.end]
        m = _TEMPLATE_SEPARATOR.match(rest)
        if not m:
            return None
        value = rest[m.end():]
        stop = _TEMPLATE_VALUE_END.search(value)
        value = value[:stop.start()] if stop else value
        negative = self.rules.template_negative.match(value)
        if negative and not (negative.group().strip().lower() in ("no", "n") and _WORD.search(value, negative.end())):
            return "negative"  # "Retention - no", but not "LBP - no relief from oramorph"
        if self.rules.template_positive.match(value):
            return "positive"
        return None
