"""The sieve: could any rule use this raw resource? A cheap look at the raw JSON (codes, text
phrases) before model validation, which costs ~30x a `json.loads` (fhir_mappings/clinical/facts.py)."""

from __future__ import annotations

from functools import lru_cache


from fhir_mappings.clinical.terminology import Terminology, normalise_icd
from fhir_mappings.clinical.facts import MODELS

# The sieve: could any rule use this raw resource?


_TEXT_KEYS = frozenset({"text", "display", "valueString", "description"})


def _raw_codings_and_texts(obj, codings: list, texts: list) -> None:
    """Every (system, code) pair and every text element in `obj`, at any depth: one walk for both
    (the sieve runs on every resource of every record, most of which it drops)."""
    if isinstance(obj, dict):
        if "system" in obj and "code" in obj:
            codings.append((obj.get("system"), obj.get("code")))
        for k, v in obj.items():
            if isinstance(v, str):
                if k in _TEXT_KEYS:
                    texts.append(v)
            elif isinstance(v, (dict, list)):
                _raw_codings_and_texts(v, codings, texts)
    elif isinstance(obj, list):
        for v in obj:
            _raw_codings_and_texts(v, codings, texts)


_SIEVE_FIELDS = ("code", "valueCodeableConcept", "valueString", "note", "bodySite", "procedureCode", "component",
                 "modality", "series", "description", "conclusion", "conclusionCode", "category")


def is_relevant(resource: dict, term: Terminology) -> bool:
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return True
    if rtype not in MODELS:
        return False
    if rtype in ("ImagingStudy", "DocumentReference", "ClinicalImpression"):
        return True  # few per record, and their text must be decoded (notes) or read whole to tell
    if rtype == "DiagnosticReport" and resource.get("presentedForm"):
        return True
    parts = [resource.get(k) for k in _SIEVE_FIELDS if k in resource]
    codings: list = []
    texts: list = [p for p in parts if isinstance(p, str)]  # valueString, description, conclusion
    _raw_codings_and_texts(parts, codings, texts)
    for system, code in codings:
        if not isinstance(code, str):
            continue
        if f"{system}|{code}" in term.relevant_keys:
            return True
        if system in ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10") and \
                normalise_icd(code).startswith(term.relevant_icd_prefixes):
            return True
    return any(_text_is_relevant(term, t) for t in texts)


@lru_cache(maxsize=65536)
def _text_is_relevant(term: Terminology, text: str) -> bool:
    # Cached: EHR records repeat the same displays ("Body Height", "Pain severity ...") thousands
    # of times, and one search of the combined phrase pattern costs tens of µs.
    return term.matcher.may_mention(text)
