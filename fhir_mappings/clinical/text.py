"""Clinical language: find concepts in free text the way clinicians write them, and read their context.

Three steps, each compiled once per rule set (`Matcher`):

1. **Vocabulary.** Every concept (a red flag, back pain, known cancer, a spinal site) lists phrases
   in plain words; `compile_phrase` turns them into one case-insensitive pattern per concept, with
   `{class}` references to a shared lexicon (`lexicon.yaml`: UK and US words, abbreviations), `[a|b]`
   optional words, `(a|b)` alternatives, `stem*` and `...` (up to four words between). A bounded
   spelling tolerance corrects a long word one edit away from a vocabulary word (`Speller`).
2. **Context**, after ConText (Harkema, Dowling, Thornblade, Chapman: J Biomed Inform 2009;42:839;
   medspaCy is its reference implementation): each mention is checked for cues of negation,
   hypothetical or conditional mention, another person (experiencer), history and uncertainty
   within its sentence, forward or backward, until a termination word ("but", "except", "positive
   for"). Pseudo-cues ("no improvement in", "not ruled out") block the shorter cue they contain.
   Template answers (`Clonus: nil`, `Leg weakness: yes`, `[ ] retention`) and section headers
   (`Family history:`, `Safety netting:`, `PMH:`) are handled explicitly; a plan's own cues decide.
3. **Decision.** `Mention.status` is the strongest context found (absent > other > hypothetical >
   historical > uncertain > present). Whether a status raises the concept is data: present always;
   uncertain for every red flag (ConText (Harkema et al. 2009) and NG234 1.2: a documented suspicion of MSCC is itself a
   reason for the emergency MRI) but not for a cancer ("suspected" is not a known cancer);
   historical only where the concept counts history (a past cancer, a recorded bone metastasis).
   Box 1 qualifiers (night, mechanical, straining, progressive, severe) are *anchored*: they count
   only when they describe spinal pain (ConText (Harkema et al. 2009) and NG234 1.2; see `Matcher._anchor` and
   `Mention.anchored`). docs/clinical-language.md says it for clinicians, with the measured figures.

Pure: no I/O. Offsets in `Mention` are into the text as given.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# Phrase compiler: plain words -> regular expression

# Between two words of a phrase: spaces, a hyphen, or a template colon ("plantars: upgoing"); never a
# line break (the next line of a template or list), once wrapped lines are joined (Matcher.normalised).
_SPACE = r"[ \t]+"
_GAP = r"(?:[ \t]*[-:][ \t]*|" + _SPACE + ")"
# "..." in a phrase: up to four words, never a negation ("LBP, not worse at night" is no night pain).
_SKIP_WORDS = (r"(?:" + _SPACE + r"(?!(?:no|not|nil|denies|denied|without|never|negative|none)\b)[^\s.;:!?]+){0,4}?"
               + _SPACE)
_TOKEN = re.compile(r"\{[a-z0-9-]+\}|\[[^\]]*\]|\([^)]*\)|\.\.\.|[^\s\[\]({]+")


class PhraseError(ValueError):
    """A phrase in a rule or lexicon file that does not compile (named in the message)."""


_SHORTHAND = {"with": r"(?:with|w/)", "and": r"(?:and|&)"}  # "worse w/ ambulation", "bowel & bladder"


def _word(token: str) -> str:
    if token.endswith("*") and len(token) > 1:
        return re.escape(token[:-1]) + r"\w*"
    return _SHORTHAND.get(token.lower(), re.escape(token))


def compile_phrase(phrase: str, lexicon: dict[str, str]) -> str:
    """One phrase in plain words -> a regular-expression source (no anchors, no flags)."""
    parts: list[tuple[str, bool]] = []  # (regex, optional)
    for token in _TOKEN.findall(phrase.strip()):
        if token == "...":
            parts.append(("...", False))
        elif token.startswith("{"):
            name = token[1:-1]
            if name not in lexicon:
                raise PhraseError(f"unknown lexicon class {token} in phrase {phrase!r}")
            parts.append((f"(?:{lexicon[name]})", False))
        elif token.startswith("[") or token.startswith("("):
            inner = token[1:-1]
            if any(c in inner for c in "[]()"):
                raise PhraseError(f"groups do not nest: {token} in phrase {phrase!r}")
            alternatives = [compile_phrase(a, lexicon) for a in inner.split("|") if a.strip()]
            if not alternatives:
                raise PhraseError(f"empty group {token} in phrase {phrase!r}")
            parts.append(("(?:" + "|".join(alternatives) + ")", token.startswith("[")))
        else:
            parts.append((_word(token), False))
    if not parts or all(opt for _, opt in parts):
        raise PhraseError(f"phrase {phrase!r} has no required word")
    # An optional word carries its own gap: after it while nothing required came before it (or
    # right after "..."), before it otherwise; so "[both] leg weakness" matches "leg weakness".
    out = ""
    open_left = True  # nothing yet (or "...") stands before: the next word needs no leading gap
    for regex, optional in parts:
        if regex == "...":
            out += _SKIP_WORDS
            open_left = True
        elif optional:
            out += f"(?:{regex}{_GAP})?" if open_left else f"(?:{_GAP}{regex})?"
        else:
            out += regex if open_left else _GAP + regex
            open_left = False
    return out


class Lexicon(dict):
    """Lexicon class name -> regex source, and the characters each class can start with."""

    def __init__(self):
        super().__init__()
        self.firsts: dict[str, frozenset[str] | None] = {}


def compile_lexicon(classes: dict[str, dict]) -> Lexicon:
    """Lexicon classes (`words:` in plain words, or a reviewed `regex:`) -> regex sources."""
    compiled = Lexicon()
    for name, spec in classes.items():  # a class may use classes defined above it
        if "regex" in spec:
            re.compile(spec["regex"])
            compiled[name] = spec["regex"]
            compiled.firsts[name] = None
        else:
            words = sorted(spec["words"], key=len, reverse=True)  # "saddle area" before "saddle"
            compiled[name] = "|".join(compile_phrase(w, compiled) for w in words)
            compiled.firsts[name] = _union(phrase_firsts(w, compiled) for w in spec["words"])
    return compiled


def _union(sets) -> frozenset[str] | None:
    out: set[str] = set()
    for s in sets:
        if s is None:
            return None
        out |= s
    return frozenset(out)


def phrase_firsts(phrase: str, lexicon: dict[str, str]) -> frozenset[str] | None:
    """The characters a phrase can start with (None: cannot tell), to dispatch on the first one."""
    firsts = getattr(lexicon, "firsts", {})
    tokens = _TOKEN.findall(phrase.strip())
    if not tokens:
        return None
    token = tokens[0]
    if token == "...":
        return None
    if token.startswith("{"):
        return firsts.get(token[1:-1])
    if token.startswith("[") or token.startswith("("):
        inner = _union(phrase_firsts(a, lexicon) for a in token[1:-1].split("|") if a.strip())
        if token.startswith("(") or inner is None:
            return inner
        rest = " ".join(tokens[1:])
        return _union([inner, phrase_firsts(rest, lexicon) if rest else None])
    return frozenset({token[0].lower()})


_MAX_DISPATCH = 64  # a phrase that can start with more characters than this is tried everywhere, not copied


def dispatch(alternatives: list[tuple[str, frozenset[str] | None]]) -> str:
    """One alternation, grouped by first character behind a one-character lookahead: the regex
    engine then tries only the phrases that can start where it stands (a long flat alternation
    costs a try of every phrase at every position)."""
    buckets: dict[str, list[str]] = {}
    unknown: list[str] = []
    for source, firsts in alternatives:
        if firsts is None or len(firsts) > _MAX_DISPATCH:
            unknown.append(source)
            continue
        for ch in firsts:
            buckets.setdefault(ch, []).append(source)
    groups = [f"(?={re.escape(ch)})(?:" + "|".join(dict.fromkeys(srcs)) + ")" for ch, srcs in sorted(buckets.items())]
    return "|".join(groups + unknown)


def _bounded(alternatives: list[tuple[str, frozenset[str] | None]]) -> re.Pattern[str] | None:
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(?:" + dispatch(alternatives) + r")(?!\w)", re.I)


def phrase_alternatives(phrases: list[str], lexicon: dict[str, str]) -> list[tuple[str, frozenset[str] | None]]:
    return [(compile_phrase(p, lexicon), phrase_firsts(p, lexicon)) for p in phrases]


def compile_phrases(phrases: list[str], lexicon: dict[str, str] | None = None) -> re.Pattern[str] | None:
    return _bounded(phrase_alternatives(phrases, lexicon if lexicon is not None else Lexicon()))


def compile_alternation(alternatives: list[tuple[str, frozenset[str] | None]]) -> re.Pattern[str] | None:
    return _bounded(alternatives)


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


def _back_to_original(pos: int, anchors: list[tuple[int, int]]) -> int:
    if not anchors:
        return pos
    i = bisect_right([a for a, _ in anchors], pos) - 1
    if i < 0:
        return pos
    new, old = anchors[i]
    if i % 2 == 0 and i + 1 < len(anchors):  # inside a corrected word: clamp to its span
        return min(old + (pos - new), anchors[i + 1][1])
    return old + (pos - new)


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
_EDGE_QUOTES = re.compile("(?<![A-Za-z])['\u2018\u2019\"\u201c\u201d]|['\u2018\u2019\"\u201c\u201d](?![A-Za-z])")
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
class _Sentence:
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
        self.sentences = [_Sentence(start, end, self) for start, end in sentence_bounds(text)]
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

    def sentence_of(self, pos: int) -> _Sentence:
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

    def _in_scope(self, cue: Cue, start: int, end: int, sentence: _Sentence) -> bool:
        if cue.direction in ("forward", "both") and cue.start < start:
            # A cue running into the target ("no acute" before "ACUTE DISTRESS") still precedes it.
            return self._reaches(cue, min(cue.end, start), start, sentence, forward=True)
        if cue.direction in ("backward", "both") and cue.start >= end:
            return self._reaches(cue, end, cue.start, sentence, forward=False)
        return False

    def _reaches(self, cue: Cue, gap_start: int, gap_end: int, sentence: _Sentence, forward: bool) -> bool:
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

    def _said_current(self, start: int, end: int, sentence: _Sentence) -> bool:
        for m in self.rules.current.finditer(self.text, sentence.start, sentence.end):
            directions = {d for _, d, _ in _cue_kinds_of(self.rules.current_kinds, self.text, m)}
            before = m.end() <= start
            if not directions & ({"forward", "both"} if before else {"backward", "both"}):
                continue
            between = self.text[m.end():start] if before else self.text[end:m.start()]
            if "," not in between and len(_WORDS_BETWEEN.findall(between)) <= 4:
                return True
        return False

    def _template_answer(self, end: int, sentence: _Sentence) -> str | None:
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


# ---------------------------------------------------------------------------------------------
# Concepts and the matcher


@dataclass(frozen=True)
class ConceptText:
    """One concept's compiled text vocabulary and how its context statuses count."""

    id: str
    pattern: re.Pattern[str] | None  # phrases: count wherever they stand (subject to context)
    qualifiers: re.Pattern[str] | None = None  # elliptical Box 1 qualifiers ("worse at night")
    vetoes: re.Pattern[str] | None = None  # in the same sentence, these void a mention ("in situ")
    raises: frozenset[str] = frozenset({"present", "uncertain"})
    anchored: bool = False  # Box 1 qualifier: counts only when it describes spinal pain
    yields_to: frozenset[str] = frozenset()  # a mention inside one of these counts as that one only
    alternatives: tuple = ()  # (regex source, first characters) of every phrase: for benchmarks


@dataclass(frozen=True)
class Mention:
    concept: str
    start: int
    end: int
    quote: str
    context: Context
    # Box 1 qualifiers only: what the qualifier describes. "spinal" or "other" (a pain with a site,
    # in its sentence or the text's last one); "siteless" (a pain with no site: "pain worse at
    # night"); "unresolved" (no pain named at all: "Wakes her at night."). None: not a qualifier.
    anchor: str | None = None

    @property
    def status(self) -> str:
        return self.context.status

    def anchored(self, pain_context: str | None) -> bool:
        """Does it describe spinal pain, given what the text is written about? pain_context:
        "spinal" (a note on a spinal pain record), "patient" (a patient with recent back pain:
        a pain with no site is that pain), None (nothing known beyond the text)."""
        if self.anchor is None or self.anchor == "spinal":
            return True
        if self.anchor == "siteless":
            return pain_context in ("spinal", "patient")
        if self.anchor == "unresolved":
            return pain_context == "spinal"
        return False


_QUOTE_CHARS = 200
_VETO_REACH = 30  # characters either side of a mention in which a veto phrase voids it


def _quote(text: str, sentence: _Sentence, start: int, end: int) -> str:
    s, e = sentence.start, sentence.end
    if e - s > _QUOTE_CHARS:  # centre a long sentence on the mention
        s = max(s, min(start - 60, e - _QUOTE_CHARS))
        e = min(e, s + _QUOTE_CHARS)
    return text[s:e].strip(" \t-:,")


@dataclass
class Matcher:
    """Every concept's vocabulary, compiled once per rule set; one pass over a text for all of them."""

    concepts: dict[str, ConceptText]
    context_rules: ContextRules
    speller: Speller
    spinal_pain: re.Pattern[str]  # a pain mention at a spinal site: anchors Box 1 qualifiers
    other_pain: re.Pattern[str]  # a pain mention at another site ("hip pain", "headache")
    other_symptom: re.Pattern[str]  # "SOB", "nausea", "disease": what else a qualifier may describe
    pain_word: re.Pattern[str]  # "pain", "ache", "sore": does a problem-list entry name pain?
    def __post_init__(self):
        self._findings = lru_cache(maxsize=16384)(self.read)
        self._hits = lru_cache(maxsize=65536)(self._concepts_hit)

    def clear_caches(self) -> None:
        """Forget every text read (benchmarks time the reading, not the memory)."""
        self._findings.cache_clear()
        self._hits.cache_clear()

    def _concepts_hit(self, norm: str) -> tuple[ConceptText, ...]:
        """The concepts with a phrase in the (normalised) text: one search each, remembered, so the
        pre-parse sieve and the reading that follows it do not scan the same text twice."""
        return tuple(c for c in self.concepts.values()
                     if any(p is not None and p.search(norm) for p in (c.pattern, c.qualifiers)))

    @property
    def patterns(self) -> dict[str, re.Pattern[str]]:
        return {cid: c.pattern for cid, c in self.concepts.items() if c.pattern is not None}

    def normalised(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """Misspellings corrected and hard-wrapped lines joined (offsets map back to `text`)."""
        if "\n" in text:
            text = join_wrapped_lines(text)
        text = _EDGE_QUOTES.sub(" ", text)
        fixed = self.speller.corrected(text)
        return fixed if fixed else (text, [])

    def may_mention(self, text: str) -> bool:
        """Could any concept be in this text (the pre-parse sieve)? Callers cache it per text."""
        return bool(self._hits(self.normalised(text)[0]))

    def mentions(self, text: str) -> list[Mention]:
        norm, anchors = self.normalised(text)
        ctx: TextContext | None = None  # built on the first hit only: most texts mention nothing
        sites = None
        out: list[Mention] = []
        for concept in self._hits(norm):
            for pattern, elliptical in ((concept.pattern, False), (concept.qualifiers, True)):
                if pattern is None:
                    continue
                for m in pattern.finditer(norm):
                    ctx = ctx or TextContext(norm, self.context_rules)
                    sentence = ctx.sentence_of(m.start())
                    if concept.vetoes and concept.vetoes.search(norm, max(sentence.start, m.start() - _VETO_REACH),
                                                                 min(sentence.end, m.end() + _VETO_REACH)):
                        continue  # "carcinoma in situ", "basal cell carcinoma", "MSCC screen"
                    anchor = None
                    if concept.anchored:
                        sites = sites if sites is not None else self._pain_sites(norm)
                        anchor = self._anchor(norm, sentence, m, elliptical, sites)
                    start, end = _back_to_original(m.start(), anchors), _back_to_original(m.end(), anchors)
                    quote = _quote(norm, sentence, m.start(), m.end())
                    out.append(Mention(concept.id, start, end, quote, ctx.context(m.start(), m.end()), anchor))
        return out

    def findings(self, text: str, on_spinal_pain_resource: bool = False,
                 pain_context: str | None = None) -> dict[str, Mention]:
        """Concept id -> the first mention that raises it (context and anchoring applied).
        `pain_context`: see `Mention.anchored`; on_spinal_pain_resource=True means "spinal"."""
        return self._findings(text, "spinal" if on_spinal_pain_resource else pain_context)

    def read(self, text: str, pain_context: str | None = None) -> dict[str, Mention]:
        """`findings` without its cache: one pass of every concept over the text (benchmarks)."""
        mentions = sorted(self.mentions(text), key=lambda m: m.start)
        raising = [m for m in mentions if m.anchored(pain_context) and m.status in self.concepts[m.concept].raises]
        out: dict[str, Mention] = {}
        for mention in raising:
            yields_to = self.concepts[mention.concept].yields_to
            if yields_to and any(o.concept in yields_to and o.start < mention.end and mention.start < o.end
                                 for o in mentions):
                continue  # "perianal numbness" is saddle anaesthesia, not a second flag
            out.setdefault(mention.concept, mention)
        return out

    def _pain_sites(self, text: str) -> list[tuple[int, int, bool]]:
        """(start, end, spinal?) of every pain mention with a site, in text order."""
        sites = [(m.start(), m.end(), True) for m in self.spinal_pain.finditer(text)]
        sites += [(m.start(), m.end(), False) for m in self.other_pain.finditer(text)]
        return sorted(sites)

    def _anchor(self, text: str, sentence: _Sentence, m: re.Match, elliptical: bool,
                sites: list[tuple[int, int, bool]]) -> str:
        """What a Box 1 qualifier describes: the nearest pain with a site in its sentence; with
        none there, an elliptical one ("Worse at night.") describes the pain the text was last
        about; else the pain it names has no site, or it names none (see `Mention.anchor`)."""
        here = [s for s in sites if sentence.start <= s[0] < sentence.end]
        if here:
            nearest = min(here, key=lambda s: min(abs(s[0] - m.end()), abs(m.start() - s[1])))
            return "spinal" if nearest[2] else "other"
        before = [s for s in sites if s[1] <= m.start()]
        last = ("spinal" if before[-1][2] else "other") if before else None
        if self.pain_word.search(text, sentence.start, sentence.end):
            return last or "siteless"  # "Pain is worst in the early morning": the pain named
        if elliptical and self.other_symptom.search(text, sentence.start, m.start()):
            return "other"  # "SOB getting worse": the qualifier is about something else
        if last:
            return last
        if self.pain_word.search(text, 0, m.start()):
            return "siteless"  # "Pain wraps round the chest. Worse lying flat at night.": that pain
        return "unresolved"
