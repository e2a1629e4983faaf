"""The phrase compiler: a concept's phrases in plain words (`{class}` lexicon references, `[optional]`
words, `(a|b)` alternatives, `stem*`, `...` for up to four words between) compiled to one
case-insensitive regular expression, dispatched on its possible first characters.

Pure: no I/O. See fhir_mappings/clinical/text.py for how the three steps fit together.
"""

from __future__ import annotations

import re

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
