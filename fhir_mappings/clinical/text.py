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
from dataclasses import dataclass
from functools import lru_cache

from fhir_mappings.clinical.context import (EDGE_QUOTES, Context, ContextRules, Sentence, TextContext,
                                            join_wrapped_lines)
from fhir_mappings.clinical.speller import Speller, back_to_original

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


def _quote(text: str, sentence: Sentence, start: int, end: int) -> str:
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
        self._mentions = lru_cache(maxsize=16384)(lambda text: tuple(self.mentions(text)))

    def clear_caches(self) -> None:
        """Forget every text read (benchmarks time the reading, not the memory)."""
        self._findings.cache_clear()
        self._hits.cache_clear()
        self._mentions.cache_clear()

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
        text = EDGE_QUOTES.sub(" ", text)
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
                    start, end = back_to_original(m.start(), anchors), back_to_original(m.end(), anchors)
                    quote = _quote(norm, sentence, m.start(), m.end())
                    out.append(Mention(concept.id, start, end, quote, ctx.context(m.start(), m.end()), anchor))
        return out

    def remembered_mentions(self, text: str) -> tuple[Mention, ...]:
        """`mentions`, remembered per text as `findings` is: a coded entry's own text ("Malignant
        neoplasm of breast") is read for its context on every evaluation of every patient who has it."""
        return self._mentions(text)

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

    def _anchor(self, text: str, sentence: Sentence, m: re.Match, elliptical: bool,
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
