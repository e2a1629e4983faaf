"""Value sets and red-flag rules, loaded from the reviewed data files beside this module.

Codes live in `valuesets/*.yaml` and `rules/*.yaml`, never as literals in logic (SNOMED CT,
ICD-10-CM, LOINC: each file cites its sources). Matching is by `system|code`; with no terminology server, ICD-10-CM ranges match by
prefix and SNOMED CT by explicit lists, with the clinical-language matcher (text.py) as the fallback.
Every file is validated against its schema (schema.py) before it is compiled.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from fhir_mappings.clinical.schema import (Codes, ContextFile, LexiconFile, RuleFile, RuleFileError, Score, Source,
                                  ValueSetFile, load)
from fhir_mappings.clinical.context import Context, ContextRules, TextContext
from fhir_mappings.clinical.phrases import compile_lexicon, compile_phrases, phrase_alternatives
from fhir_mappings.clinical.speller import Speller
from fhir_mappings.clinical.text import ConceptText, Matcher, Mention

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"  # accepted as ICD-10-CM (SNOMED CT and ICD-10-CM)
_ICD_SYSTEMS = (ICD10CM, ICD10)
_EXACT_SYSTEMS = {"snomed": SNOMED, "loinc": LOINC, "cpt": CPT}
KNOWN_SYSTEMS = frozenset({SNOMED, LOINC, CPT, ICD10CM, ICD10})

_HERE = Path(__file__).parent


def normalise_icd(code: str) -> str:
    return code.replace(".", "").strip().upper()


@dataclass(frozen=True)
class CodeSet:
    """Explicit `system|code` keys plus ICD-10(-CM) prefixes (dots removed)."""

    keys: frozenset[str] = frozenset()
    icd_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_codes(cls, codes: Codes | None) -> "CodeSet":
        if codes is None:
            return cls()
        keys = {f"{system}|{code}" for name, system in _EXACT_SYSTEMS.items() for code in codes.code_list(name)}
        prefixes = tuple(sorted({normalise_icd(p) for p in codes.code_list("icd10cm_prefixes")}))
        return cls(frozenset(keys), prefixes)

    def contains(self, system: str | None, code: str | None) -> bool:
        if not system or not code:
            return False
        if system in _ICD_SYSTEMS:
            return normalise_icd(code).startswith(self.icd_prefixes) if self.icd_prefixes else False
        return f"{system}|{code}" in self.keys


# What a concept's text mention counts as, by its context (ConText (Harkema et al. 2009) and NG234 1.2; text.py).
_RAISES_FLAG = frozenset({"present", "uncertain"})
_RAISES_HISTORY = frozenset({"present", "uncertain", "historical"})
_RAISES_CANCER = frozenset({"present", "historical"})  # "suspected" cancer is not a known cancer
_NOT_SAID = frozenset({"absent", "uncertain", "other", "hypothetical"})


@dataclass(frozen=True, eq=False)
class Concept:
    """One value set: codes that include, codes that exclude, and a text fallback."""

    id: str
    version: str
    title: str
    include: CodeSet
    exclude: CodeSet
    text: ConceptText
    matcher: "Matcher | None" = None  # set once the whole vocabulary is compiled
    overriding: re.Pattern[str] | None = None  # text that vetoes even a coded match ("suspected")

    def vetoed_by_text(self, text: str) -> bool:
        """A coded entry whose own text says it is suspected, screening, family history or denied."""
        if self.overriding is not None and self.overriding.search(text):
            return True
        if self.matcher is None:
            return False
        said = [m.status for m in self.matcher.remembered_mentions(text) if m.concept == self.id]
        return bool(said) and all(s in _NOT_SAID for s in said)

    def match_coding(self, system: str | None, code: str | None) -> bool | None:
        """True: included; False: explicitly excluded; None: says nothing about this concept."""
        if self.exclude.contains(system, code):
            return False
        if self.include.contains(system, code):
            return True
        return None

    def match_text(self, text: str | None, on_spinal_pain_resource: bool = False) -> Mention | None:
        if not text or self.matcher is None:
            return None
        return self.matcher.findings(text, on_spinal_pain_resource).get(self.id)


@dataclass(frozen=True)
class Rule:
    """A red flag as reviewed data (SigmaHQ-style: id, version, status, sources, false positives)."""

    id: str
    version: str
    status: str
    box: int
    tier: str
    title: str
    sources: list[Source]
    codes: CodeSet
    score: Score | None
    counts_history: bool = False  # true: counts whatever the evidence's date (recency: history)
    pain_site_codes: CodeSet = CodeSet()  # sites of a spinal pain reading that raise this flag
    pain_site_phrases: re.Pattern[str] | None = None

    @property
    def source_labels(self) -> list[str]:
        return [f"{s.id} {s.section or ''}".strip() for s in self.sources]


@dataclass(frozen=True, eq=False)  # identity hash: a loaded terminology is a cache key
class Terminology:
    cancer: Concept
    back_pain: Concept
    spinal_site: Concept
    mri_spine: Concept
    xray_spine: Concept
    pain_severity_codes: frozenset[str]
    pain_location_codes: frozenset[str]
    rules: tuple[Rule, ...]
    matcher: Matcher  # every concept's vocabulary, compiled once: one pass per text
    # Everything any rule or concept could match, for the cheap pre-parse sieve.
    relevant_keys: frozenset[str]
    relevant_icd_prefixes: tuple[str, ...]
    versions: dict[str, str] = field(default_factory=dict)

    def rule(self, rule_id: str) -> Rule:
        return next(r for r in self.rules if r.id == rule_id)

    def extended(self, extra: Mapping[str, Iterable[str]]) -> "Terminology":
        """This terminology with more `system|code` keys per concept id (known-cancer, back-pain,
        spinal-site, mri-spine, xray-spine, or a flag id), e.g. as a terminology server resolved
        them ($subsumes). Pure: the local sets still decide everything else; exclusions still win."""
        if not any(extra.values()):
            return self
        def more(codes: CodeSet, cid: str) -> CodeSet:
            keys = frozenset(extra.get(cid, ()))
            return replace(codes, keys=codes.keys | keys) if keys else codes
        concepts = {name: replace(c, include=more(c.include, c.id)) for name, c in
                    (("cancer", self.cancer), ("back_pain", self.back_pain), ("spinal_site", self.spinal_site),
                     ("mri_spine", self.mri_spine), ("xray_spine", self.xray_spine))}
        rules = tuple(replace(r, codes=more(r.codes, r.id)) for r in self.rules)
        added = frozenset(k for keys in extra.values() for k in keys)
        return replace(self, **concepts, rules=rules, relevant_keys=self.relevant_keys | added)


def _rule(data: RuleFile, lexicon: dict[str, str]) -> tuple[Rule, ConceptText]:
    if (data.tier, data.box) not in (("emergency", 2), ("urgent", 1)):
        raise RuleFileError(f"rule {data.id}: tier/box must be emergency/2 or urgent/1")
    history = data.recency == "history"
    text = ConceptText(
        id=data.id,
        pattern=compile_phrases(data.phrases, lexicon),
        qualifiers=compile_phrases(data.qualifiers, lexicon),
        vetoes=compile_phrases(data.exclude_phrases, lexicon),
        raises=_RAISES_HISTORY if history else _RAISES_FLAG,
        anchored=data.anchor == "spinal-pain",
        yields_to=frozenset(data.yields_to),
        alternatives=tuple(phrase_alternatives(data.phrases + data.qualifiers, lexicon)),
    )
    sites = data.pain_sites
    rule = Rule(
        id=data.id, version=data.version, status=data.status, box=int(data.box), tier=data.tier, title=data.title,
        sources=list(data.sources), codes=CodeSet.from_codes(data.codes), score=data.score, counts_history=history,
        pain_site_codes=CodeSet.from_codes(sites),
        pain_site_phrases=compile_phrases(sites.phrases, lexicon) if sites else None,
    )
    return rule, text


def _concept_text(data: ValueSetFile, lexicon: dict[str, str], raises: frozenset[str]) -> ConceptText:
    return ConceptText(
        id=data.id,
        pattern=compile_phrases(data.text.phrases, lexicon),
        vetoes=compile_phrases(data.text.exclude_phrases, lexicon),
        raises=raises,
        alternatives=tuple(phrase_alternatives(data.text.phrases, lexicon)),
    )


@lru_cache(maxsize=1)
def load_terminology() -> Terminology:
    lexicon_file = load(_HERE / "language" / "lexicon.yaml", LexiconFile)
    lexicon = compile_lexicon({k: v.model_dump(exclude_none=True) for k, v in lexicon_file.classes.items()})
    context_file = load(_HERE / "language" / "context.yaml", ContextFile)
    vs = {p.stem: load(p, ValueSetFile) for p in sorted((_HERE / "valuesets").glob("*.yaml"))}
    rule_files = [load(p, RuleFile) for p in sorted((_HERE / "rules").glob("*.yaml"))]
    for path_stem, data in vs.items():
        if data.id != path_stem:
            raise RuleFileError(f"{path_stem}.yaml: id {data.id!r} differs from the file name")
    compiled = [_rule(d, lexicon) for d in rule_files if d.status != "deprecated"]
    rules = tuple(r for r, _ in compiled)

    concept_raises = {"known-cancer": _RAISES_CANCER}
    texts = {r.id: t for r, t in compiled}
    for vid in ("known-cancer", "back-pain", "spinal-site", "mri-spine", "xray-spine"):
        texts[vid] = _concept_text(vs[vid], lexicon, concept_raises.get(vid, _RAISES_FLAG))
    back_pain_sources = [t.pattern.pattern for t in (texts["back-pain"], texts["thoracic-or-cervical-pain"]) if t.pattern]
    matcher = Matcher(
        concepts=texts,
        context_rules=ContextRules.from_data(context_file.model_dump(), lexicon),
        speller=Speller(_vocabulary(rule_files, vs, lexicon_file), set(_PROTECTED_WORDS) | _protected_words()),
        spinal_pain=re.compile("|".join(f"(?:{s})" for s in back_pain_sources), re.I),
        other_pain=compile_phrases(["{other-pain-site} {pain}", "{pain} (in|of|over|at|around) [{det}] [{side}] {other-pain-site}",
                                    "headache", "headaches", "migraine", "arthralgia", "angina", "chest pain", "abdo pain"], lexicon),
        other_symptom=compile_phrases(["{other-symptom}", "{other-pain-site}"], lexicon),
        pain_word=compile_phrases(["{pain}", "{analgesic}"], lexicon),
    )

    def concept(vid: str) -> Concept:
        data = vs[vid]
        return Concept(id=data.id, version=data.version, title=data.title, include=CodeSet.from_codes(data.include),
                       exclude=CodeSet.from_codes(data.exclude), text=texts[vid], matcher=matcher,
                       overriding=compile_phrases(data.text.overrides_codes, lexicon))

    pain = vs["pain-observation"].groups
    severity = frozenset(f"{LOINC}|{c}" for c in pain.severity.code_list("loinc"))
    location = frozenset(f"{LOINC}|{c}" for c in pain.location.code_list("loinc"))
    keys: set[str] = set(severity | location)
    prefixes: set[str] = set()
    for codes in [d.include for d in vs.values()] + [d.exclude for d in vs.values()] + [d.codes for d in rule_files]:
        cs = CodeSet.from_codes(codes)
        keys |= cs.keys
        prefixes |= set(cs.icd_prefixes)
    concepts = {vid: concept(vid) for vid in ("known-cancer", "back-pain", "spinal-site", "mri-spine", "xray-spine")}
    versions = {c.id: c.version for c in concepts.values()} | {r.id: r.version for r in rules}
    versions |= {"lexicon": lexicon_file.version, "context": context_file.version}
    return Terminology(
        cancer=concepts["known-cancer"],
        back_pain=concepts["back-pain"],
        spinal_site=concepts["spinal-site"],
        mri_spine=concepts["mri-spine"],
        xray_spine=concepts["xray-spine"],
        pain_severity_codes=severity,
        pain_location_codes=location,
        rules=rules,
        matcher=matcher,
        relevant_keys=frozenset(keys),
        relevant_icd_prefixes=tuple(sorted(prefixes)),
        versions=versions,
    )


# Words one edit from the vocabulary that are real words of their own: never "corrected".
_PROTECTED_WORDS = ("tinkling", "detention", "retentive", "weakens", "clonic", "sensations", "paralyse", "numbers",
                    "frontal", "thoracics", "lumbars", "babinskis", "incontinent", "cervicals", "sciatic", "tendering",
                    "tenders", "increase", "decrease", "straining", "strained", "coughed", "sneezed", "radiates", "radiated", "walking",
                    "standing", "sitting", "bending", "lifting", "twisting", "moving", "retaining", "catheters",
                    "anaesthetic", "anesthetic", "anaesthetist", "anesthetist", "anaesthetics", "anesthetics",
                    "metastasis", "metastases", "metastatic", "malignancy", "malignant", "carcinoma", "carcinomas")
def _protected_words() -> set[str]:
    """Real words seen in public clinical text (language/protected-words.txt): never "corrected"."""
    path = _HERE / "language" / "protected-words.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return {w.strip().lower() for w in lines if w.strip() and not w.startswith("#")}


def _vocabulary(rule_files: list[RuleFile], vs: dict[str, ValueSetFile], lexicon_file: LexiconFile) -> set[str]:
    """The literal long words of every phrase and lexicon class: what a misspelling may be corrected to."""
    phrases = [p for d in rule_files for p in d.phrases + d.qualifiers]
    phrases += [p for d in vs.values() for p in d.text.phrases]
    phrases += [w for c in lexicon_file.classes.values() for w in c.words or []]
    words = {w.lower() for p in phrases for w in re.findall(r"[A-Za-z]+(?![A-Za-z]*\*)", p)}
    return {w for w in words if len(w) >= 6}


def context_of(text: str, start: int, end: int, rules: ContextRules | None = None) -> Context:
    """The ConText status of the span [start, end) in `text` (for measuring on given targets)."""
    if rules is None:
        rules = load_terminology().matcher.context_rules
    return TextContext(text, rules).context(start, end)
