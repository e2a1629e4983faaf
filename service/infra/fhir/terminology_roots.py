"""What the optional terminology server is asked (service/infra/fhir/terminology.py asks it): the
SNOMED CT codes of a record that no local list classifies, per root of
`fhir_mappings/clinical/valuesets/server/terminology-roots.yaml`. Pure, but for reading that file.

Only Conditions and Observations count (`code`, `valueCodeableConcept`, `bodySite`), only codings
whose system is SNOMED CT and whose code is a concept id (SCTID); a code any applicable `exclude`
list names is never asked (exclusions win).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import fhir_mappings.clinical
from fhir_mappings.clinical.schema import RuleFileError, TerminologyRootsFile, load
from fhir_mappings.clinical.terminology import SNOMED, Concept, Terminology, load_terminology

ROOTS_PATH = Path(fhir_mappings.clinical.__file__).parent / "valuesets" / "server" / "terminology-roots.yaml"
_FIELDS = ("code", "valueCodeableConcept", "bodySite")
_RESOURCE_TYPES = ("Condition", "Observation")
_CONCEPT_ID = re.compile(r"^\d{6,18}$")  # a SNOMED CT concept id (SCTID); anything else is not asked


@dataclass(frozen=True)
class Roots:
    version: str
    by_concept: dict[str, tuple[str, ...]]  # concept or rule id -> root codes
    excluded_by: dict[str, tuple[str, ...]]  # concept or rule id -> value sets whose exclude applies


@lru_cache(maxsize=1)
def load_roots(path: Path = ROOTS_PATH) -> Roots:
    data: TerminologyRootsFile = load(path, TerminologyRootsFile)
    term = load_terminology()
    known = set(_concepts(term)) | {r.id for r in term.rules}
    unknown = sorted((set(data.concepts) | {v for c in data.concepts.values() for v in c.excluded_by}) - known)
    if unknown:
        raise RuleFileError(f"{path.name}: unknown concept or rule id(s) {unknown}")
    return Roots(data.version, {cid: tuple(c.snomed) for cid, c in data.concepts.items()},
                 {cid: tuple(c.excluded_by) for cid, c in data.concepts.items()})


def _concepts(term: Terminology) -> dict[str, Concept]:
    return {c.id: c for c in (term.cancer, term.back_pain, term.spinal_site, term.mri_spine, term.xray_spine)}


def record_codes(resources: Iterable[dict]) -> list[str]:
    """The SNOMED CT concept ids coded in the Conditions' and Observations' code,
    valueCodeableConcept and bodySite (raw JSON: this runs before validation)."""
    found: set[str] = set()
    for resource in resources:
        if not isinstance(resource, dict) or resource.get("resourceType") not in _RESOURCE_TYPES:
            continue
        for name in _FIELDS:
            value = resource.get(name)
            for concept in value if isinstance(value, list) else [value]:
                codings = concept.get("coding") if isinstance(concept, dict) else None
                for coding in codings if isinstance(codings, list) else []:
                    if isinstance(coding, dict) and coding.get("system") == SNOMED:
                        code = coding.get("code")
                        if isinstance(code, str) and _CONCEPT_ID.match(code):
                            found.add(code)
    return sorted(found)


def questions(codes: Iterable[str], term: Terminology, roots: Roots) -> list[tuple[str, str, str]]:
    """(concept id, root, code) for every code no local list of the concept classifies; codes any
    applicable `exclude` list names are left out (they are never added)."""
    concepts = _concepts(term)
    rules = {r.id: r for r in term.rules}
    out = []
    for cid, root_codes in roots.by_concept.items():
        excludes = [concepts[v].exclude for v in roots.excluded_by.get(cid, ())]
        if cid in concepts:
            excludes.append(concepts[cid].exclude)
        for code in codes:
            if any(e.contains(SNOMED, code) for e in excludes):
                continue
            known = concepts[cid].match_coding(SNOMED, code) is not None if cid in concepts \
                else rules[cid].codes.contains(SNOMED, code)
            if not known:
                out += [(cid, root, code) for root in root_codes]
    return out
