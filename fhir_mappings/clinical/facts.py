"""FHIR R4 resources → typed clinical facts (what, when, which resource, which code or quoted text).

Only resources the rules could use are validated with the fhir.resources R4B models: a cheap sieve
on the raw JSON (codes, text phrases) decides first, because model validation costs ~30× a
`json.loads` and a Synthea record holds hundreds of vital-sign Observations the rules never read.

A resource that the sieve keeps but that fails validation is skipped and reported in
`Record.problems` (type, id and the failing field; never the value). A real EHR record is never
perfect, and one malformed resource must not hide the red flags in all the others; the card says
how many resources could not be read, so the clinician knows the assessment is partial.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone

from fhir.resources.R4B.clinicalimpression import ClinicalImpression
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.procedure import Procedure
from fhir.resources.R4B.servicerequest import ServiceRequest

from fhir_mappings.clinical.terminology import KNOWN_SYSTEMS, Concept

MODELS = {
    "Patient": Patient,
    "Condition": Condition,
    "Observation": Observation,
    "DiagnosticReport": DiagnosticReport,
    "ImagingStudy": ImagingStudy,
    "Procedure": Procedure,
    "ServiceRequest": ServiceRequest,
    "DocumentReference": DocumentReference,
    "ClinicalImpression": ClinicalImpression,
}
NOTE_MAX_CHARS = 200_000  # the longest note text read (EvaluationSettings.note_max_chars)
# US Core clinical notes: these never count (FHIR R4 DocumentReference.status / docStatus).
NOTE_NEVER_COUNTS = {"entered-in-error"}
_IMAGING_TYPES = ("DiagnosticReport", "ImagingStudy", "Procedure", "ServiceRequest")


@dataclass(frozen=True)
class Evidence:
    concept: str  # a flag id, or known-cancer, back-pain, pain-score, mri-completed, mri-ordered
    resource_type: str
    resource_id: str | None
    version_id: str | None
    date: datetime | None
    field: str  # where in the resource: "Condition.code", "Observation.note", ...
    code: str | None = None  # "system|code" when a coding raised it
    display: str | None = None
    quote: str | None = None  # the clause, when free text raised it
    value: float | None = None  # a pain score
    status: str | None = None  # the text's context when not plainly present: "uncertain", "historical"

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.resource_id}" if self.resource_id else self.resource_type

    def to_json(self) -> dict:
        out = {"concept": self.concept, "reference": self.reference, "field": self.field}
        optional = {
            "versionId": self.version_id,
            "date": self.date.isoformat() if self.date else None,
            "code": self.code,
            "display": self.display,
            "quote": self.quote,
            "value": self.value,
            "status": self.status,
        }
        return out | {k: v for k, v in optional.items() if v is not None}


@dataclass
class Clinical:
    """One validated resource's clinically relevant view: status, dates, codings and texts."""

    resource_type: str
    resource_id: str | None
    version_id: str | None
    date: datetime | None  # the latest clinical date the resource has
    clinical_status: str | None = None
    verification_status: str | None = None
    status: str | None = None
    abatement: datetime | None = None
    codings: list[tuple[str, str | None, str | None, str]] = field(default_factory=list)  # system, code, display, field
    texts: list[tuple[str, str]] = field(default_factory=list)  # text, field
    body_site_codings: list[tuple[str | None, str | None]] = field(default_factory=list)
    body_site_texts: list[str] = field(default_factory=list)
    numeric_value: float | None = None
    value_codings: list[tuple[str | None, str | None]] = field(default_factory=list)
    value_texts: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    due: datetime | None = None
    label: str | None = None  # what kind of record it is, for the evidence: "Emergency department note"

    def evidence(self, concept: str, field_name: str, **kw) -> Evidence:
        if self.label and not kw.get("display"):
            kw["display"] = self.label  # a quote from a note says which note
        return Evidence(concept, self.resource_type, self.resource_id, self.version_id, self.date, field_name, **kw)


@dataclass
class Record:
    """One patient's parsed record."""

    patient: str | None
    items: list[Clinical]
    problems: list[str]
    seen: dict[str, str | None]  # reference -> versionId, of every resource read


# ---------------------------------------------------------------------------------------------
# Dates

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def to_instant(value) -> datetime | None:
    """A FHIR date, dateTime or instant as an aware UTC datetime (partial dates: their first moment)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime.combine(value, time.min, tzinfo=timezone.utc)
    if isinstance(value, str):
        m = _PARTIAL.match(value)
        if m:
            return datetime(int(m[1]), int(m[2] or 1), int(m[3] or 1), tzinfo=timezone.utc)
        try:
            return to_instant(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def latest(*values) -> datetime | None:
    instants = [i for i in (to_instant(v) for v in values) if i is not None]
    return max(instants) if instants else None

# ---------------------------------------------------------------------------------------------
# Concept tests over one item


def concept_evidence(item: Clinical, concept: Concept, label: str | None = None) -> Evidence | None:
    """Evidence that `item` is an instance of `concept`: a coding first, the text fallback only when
    no coding in a known system says anything about it (SNOMED CT and ICD-10-CM)."""
    label = label or concept.id
    if concept.overriding is not None and any(concept.vetoed_by_text(text) for text, _ in item.texts):
        return None
    said_no = False
    for system, code, display, field_name in item.codings:
        verdict = concept.match_coding(system, code)
        if verdict:
            return item.evidence(label, field_name, code=f"{system}|{code}", display=display)
        if verdict is False:
            said_no = True
    if said_no:
        return None
    for text, field_name in item.texts:
        match = concept.match_text(text)
        if match:
            return item.evidence(label, field_name, quote=match.quote, status=_status(match.status))
    return None


def _status(status: str) -> str | None:
    return None if status == "present" else status


def has_known_coding(item: Clinical) -> bool:
    return any(system in KNOWN_SYSTEMS and code for system, code, _, _ in item.codings)
