"""Value sets and red-flag rules, loaded from the reviewed data files beside this module.

Codes live in `valuesets/*.yaml` and `rules/*.yaml`, never as literals in logic (CLINICAL.md
"Codes"). Matching is by `system|code`; with no terminology server, ICD-10-CM ranges match by
prefix and SNOMED CT by explicit lists, with a conservative text classifier as the fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from fhir_mappings.text import TextMatch, compile_phrases, find_affirmed

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"  # accepted as ICD-10-CM (CLINICAL.md "Codes")
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
    def from_data(cls, data: dict | None) -> "CodeSet":
        data = data or {}
        keys = {f"{system}|{code}" for name, system in _EXACT_SYSTEMS.items() for code in data.get(name, [])}
        prefixes = tuple(sorted({normalise_icd(p) for p in data.get("icd10cm_prefixes", [])}))
        return cls(frozenset(keys), prefixes)

    def contains(self, system: str | None, code: str | None) -> bool:
        if not system or not code:
            return False
        if system in _ICD_SYSTEMS:
            return normalise_icd(code).startswith(self.icd_prefixes) if self.icd_prefixes else False
        return f"{system}|{code}" in self.keys


@dataclass(frozen=True)
class Concept:
    """One value set: codes that include, codes that exclude, and a text fallback."""

    id: str
    version: str
    title: str
    include: CodeSet
    exclude: CodeSet
    phrases: list = field(default_factory=list)
    exclude_phrases: list = field(default_factory=list)
    overriding_phrases: list = field(default_factory=list)  # text that vetoes even a coded match

    def vetoed_by_text(self, text: str) -> bool:
        return any(p.search(text) for _, p in self.overriding_phrases)

    def match_coding(self, system: str | None, code: str | None) -> bool | None:
        """True: included; False: explicitly excluded; None: says nothing about this concept."""
        if self.exclude.contains(system, code):
            return False
        if self.include.contains(system, code):
            return True
        return None

    def match_text(self, text: str | None) -> TextMatch | None:
        if not text or not self.phrases:
            return None
        return find_affirmed(text, self.phrases, self.exclude_phrases)


@dataclass(frozen=True)
class Rule:
    """A red flag as reviewed data (SigmaHQ-style: id, version, status, sources, false positives)."""

    id: str
    version: str
    status: str
    box: int
    tier: str
    title: str
    sources: list[dict]
    codes: CodeSet
    phrases: list
    score: dict | None
    counts_history: bool = False  # true: counts whatever the evidence's date (recency: history)
    pain_site_codes: CodeSet = CodeSet()  # sites of a spinal pain reading that raise this flag
    pain_site_phrases: list = field(default_factory=list)

    @property
    def source_labels(self) -> list[str]:
        return [f"{s['id']} {s.get('section', '')}".strip() for s in self.sources]


def _load_yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _concept(data: dict) -> Concept:
    text = data.get("text") or {}
    return Concept(
        id=data["id"],
        version=str(data["version"]),
        title=data["title"],
        include=CodeSet.from_data(data.get("include")),
        exclude=CodeSet.from_data(data.get("exclude")),
        phrases=compile_phrases(text.get("phrases", [])),
        exclude_phrases=compile_phrases(text.get("exclude_phrases", [])),
        overriding_phrases=compile_phrases(text.get("overrides_codes", [])),
    )


def _rule(data: dict) -> Rule:
    if data["tier"] not in ("emergency", "urgent") or data["box"] not in (1, 2):
        raise ValueError(f"rule {data['id']}: tier/box must be emergency/2 or urgent/1")
    return Rule(
        id=data["id"],
        version=str(data["version"]),
        status=data["status"],
        box=int(data["box"]),
        tier=data["tier"],
        title=data["title"],
        sources=list(data["sources"]),
        codes=CodeSet.from_data(data.get("codes")),
        phrases=compile_phrases(data.get("phrases", [])),
        score=data.get("score"),
        counts_history=data.get("recency", "lookback") == "history",
        pain_site_codes=CodeSet.from_data(data.get("pain_sites")),
        pain_site_phrases=compile_phrases((data.get("pain_sites") or {}).get("phrases", [])),
    )


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
    # Everything any rule or concept could match, for the cheap pre-parse sieve.
    relevant_keys: frozenset[str]
    relevant_icd_prefixes: tuple[str, ...]
    relevant_text: re.Pattern[str]

    @property
    def versions(self) -> dict[str, str]:
        concepts = [self.cancer, self.back_pain, self.spinal_site, self.mri_spine, self.xray_spine]
        return {c.id: c.version for c in concepts} | {r.id: r.version for r in self.rules}

    def rule(self, rule_id: str) -> Rule:
        return next(r for r in self.rules if r.id == rule_id)


@lru_cache(maxsize=1)
def load_terminology() -> Terminology:
    vs = {p.stem: _load_yaml(p) for p in sorted((_HERE / "valuesets").glob("*.yaml"))}
    rules_data = [_load_yaml(p) for p in sorted((_HERE / "rules").glob("*.yaml"))]
    rules = tuple(_rule(d) for d in rules_data if d.get("status") != "deprecated")
    pain = vs["pain-observation"]["groups"]
    severity = frozenset(f"{LOINC}|{c}" for c in pain["severity"]["loinc"])
    location = frozenset(f"{LOINC}|{c}" for c in pain["location"]["loinc"])

    keys: set[str] = set(severity | location)
    prefixes: set[str] = set()
    raw_phrases: list[str] = []
    for data in list(vs.values()) + rules_data:
        for section in ("include", "exclude", "codes"):
            cs = CodeSet.from_data(data.get(section))
            keys |= cs.keys
            prefixes |= set(cs.icd_prefixes)
        text = data.get("text") or {}
        raw_phrases += text.get("phrases", []) + data.get("phrases", [])
    return Terminology(
        cancer=_concept(vs["known-cancer"]),
        back_pain=_concept(vs["back-pain"]),
        spinal_site=_concept(vs["spinal-site"]),
        mri_spine=_concept(vs["mri-spine"]),
        xray_spine=_concept(vs["xray-spine"]),
        pain_severity_codes=severity,
        pain_location_codes=location,
        rules=rules,
        relevant_keys=frozenset(keys),
        relevant_icd_prefixes=tuple(sorted(prefixes)),
        relevant_text=re.compile("|".join(f"(?:{p})" for p in raw_phrases), re.I),
    )
