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
from decimal import Decimal
from functools import lru_cache

from pydantic import ValidationError
from fhir.resources.R4B.clinicalimpression import ClinicalImpression
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.procedure import Procedure
from fhir.resources.R4B.servicerequest import ServiceRequest

from fhir_mappings.fhir.bundle import attachments
from fhir_mappings.fhir.notes import attachment_text
from fhir_mappings.clinical.terminology import KNOWN_SYSTEMS, Concept, Terminology, normalise_icd

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
_NOTE_NEVER_COUNTS = {"entered-in-error"}
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


def _latest(*values) -> datetime | None:
    instants = [i for i in (to_instant(v) for v in values) if i is not None]
    return max(instants) if instants else None


# ---------------------------------------------------------------------------------------------
# The sieve: could any rule use this raw resource?


def _raw_codings(obj, out: list) -> None:
    if isinstance(obj, dict):
        if "system" in obj and "code" in obj:
            out.append((obj.get("system"), obj.get("code")))
        for v in obj.values():
            if isinstance(v, (dict, list)):
                _raw_codings(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _raw_codings(v, out)


def _raw_texts(obj, out: list) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and k in ("text", "display", "valueString", "description"):
                out.append(v)
            elif isinstance(v, (dict, list)):
                _raw_texts(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _raw_texts(v, out)


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
    _raw_codings(parts, codings)
    for system, code in codings:
        if not isinstance(code, str):
            continue
        if f"{system}|{code}" in term.relevant_keys:
            return True
        if system in ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10") and \
                normalise_icd(code).startswith(term.relevant_icd_prefixes):
            return True
    texts: list = [p for p in parts if isinstance(p, str)]  # valueString, description, conclusion
    _raw_texts(parts, texts)
    return any(_text_is_relevant(term, t) for t in texts)


@lru_cache(maxsize=65536)
def _text_is_relevant(term: Terminology, text: str) -> bool:
    # Cached: EHR records repeat the same displays ("Body Height", "Pain severity ...") thousands
    # of times, and one search of the combined phrase pattern costs tens of µs.
    return term.matcher.may_mention(text)


# ---------------------------------------------------------------------------------------------
# Validation and extraction


def _status_code(concept) -> str | None:
    if concept is None:
        return None
    for coding in concept.coding or []:
        if coding.code:
            return coding.code
    return None


def _add_concept(item: Clinical, concept, field_name: str) -> None:
    if concept is None:
        return
    for coding in concept.coding or []:
        item.codings.append((coding.system, coding.code, coding.display, field_name))
        if coding.display:
            item.texts.append((coding.display, field_name))
    if concept.text:
        item.texts.append((concept.text, field_name))


def _add_notes(item: Clinical, notes, field_name: str) -> None:
    for note in notes or []:
        if note.text:
            item.texts.append((note.text, field_name))


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool) else None


def _clinical(model) -> Clinical:
    rtype = model.get_resource_type()
    version = model.meta.versionId if model.meta else None
    item = Clinical(rtype, model.id, version, None)
    if rtype == "Condition":
        item.date = _latest(model.onsetDateTime, model.onsetPeriod.start if model.onsetPeriod else None,
                            model.recordedDate)
        item.abatement = _latest(model.abatementDateTime,
                                 model.abatementPeriod.end if model.abatementPeriod else None)
        item.clinical_status = _status_code(model.clinicalStatus)
        item.verification_status = _status_code(model.verificationStatus)
        _add_concept(item, model.code, "Condition.code")
        _add_notes(item, model.note, "Condition.note")
        for site in model.bodySite or []:  # a "Pain" Condition at the lumbar spine is back pain
            item.body_site_codings += [(c.system, c.code) for c in site.coding or []]
            item.body_site_texts += [t for t in [site.text] + [c.display for c in site.coding or []] if t]
        code_text = _label(model.code)
        if code_text and item.body_site_texts:  # "Pain" at "Thoracic spine" reads "Thoracic spine pain"
            item.texts.append((f"{item.body_site_texts[0]} {code_text}", "Condition.bodySite"))
    elif rtype == "Observation":
        period = model.effectivePeriod
        item.date = _latest(model.effectiveDateTime, model.effectiveInstant,
                            period.end if period else None, period.start if period else None, model.issued)
        item.status = model.status
        _add_concept(item, model.code, "Observation.code")
        _add_concept(item, model.valueCodeableConcept, "Observation.valueCodeableConcept")
        if model.valueCodeableConcept:
            item.value_codings = [(c.system, c.code) for c in model.valueCodeableConcept.coding or []]
            item.value_texts = [t for t in [model.valueCodeableConcept.text] +
                                [c.display for c in model.valueCodeableConcept.coding or []] if t]
        if model.valueString:
            item.texts.append((model.valueString, "Observation.valueString"))
            item.value_texts.append(model.valueString)
        _add_notes(item, model.note, "Observation.note")
        for component in model.component or []:  # "Saddle sensation: reduced" as a template line
            label = _label(component.code)
            value = component.valueString or _label(component.valueCodeableConcept)
            if value:
                item.texts.append((f"{label}: {value}" if label else value, "Observation.component"))
            if component.valueCodeableConcept:
                for coding in component.valueCodeableConcept.coding or []:
                    item.codings.append((coding.system, coding.code, coding.display, "Observation.component"))
        if model.bodySite:
            item.body_site_codings = [(c.system, c.code) for c in model.bodySite.coding or []]
            item.body_site_texts = [t for t in [model.bodySite.text] +
                                    [c.display for c in model.bodySite.coding or []] if t]
        item.numeric_value = _number(model.valueQuantity.value) if model.valueQuantity else _number(model.valueInteger)
    elif rtype == "DiagnosticReport":
        item.date = _latest(model.effectiveDateTime, model.effectivePeriod.end if model.effectivePeriod else None,
                            model.issued)
        item.status = model.status
        _add_concept(item, model.code, "DiagnosticReport.code")
        if model.conclusion:
            item.texts.append((model.conclusion, "DiagnosticReport.conclusion"))
        for concept in model.conclusionCode or []:
            _add_concept(item, concept, "DiagnosticReport.conclusionCode")
    elif rtype == "DocumentReference":
        period = model.context.period if model.context else None
        item.date = _latest(period.end if period else None, period.start if period else None) or to_instant(model.date)
        item.status = model.status
        item.label = _label(model.type) or "clinical note"
    elif rtype == "ClinicalImpression":
        period = model.effectivePeriod
        item.date = _latest(model.effectiveDateTime, period.end if period else None, period.start if period else None,
                            model.date)
        item.status = model.status
        item.label = "clinical impression"
        if model.summary:
            item.texts.append((model.summary, "ClinicalImpression.summary"))
        if model.description:
            item.texts.append((model.description, "ClinicalImpression.description"))
        for finding in model.finding or []:
            _add_concept(item, finding.itemCodeableConcept, "ClinicalImpression.finding")
            if finding.basis:
                item.texts.append((finding.basis, "ClinicalImpression.finding"))
    elif rtype == "ImagingStudy":
        item.date = to_instant(model.started)
        item.status = model.status
        for concept in model.procedureCode or []:
            _add_concept(item, concept, "ImagingStudy.procedureCode")
        if model.description:
            item.texts.append((model.description, "ImagingStudy.description"))
        item.modalities = [c.code for c in model.modality or [] if c.code]
        for series in model.series or []:
            if series.modality and series.modality.code:
                item.modalities.append(series.modality.code)
            if series.bodySite:
                item.body_site_codings.append((series.bodySite.system, series.bodySite.code))
                if series.bodySite.display:
                    item.body_site_texts.append(series.bodySite.display)
            if series.description:
                item.texts.append((series.description, "ImagingStudy.series.description"))
    elif rtype == "Procedure":
        period = model.performedPeriod
        item.date = _latest(model.performedDateTime, period.end if period else None, period.start if period else None)
        item.status = model.status
        _add_concept(item, model.code, "Procedure.code")
    elif rtype == "ServiceRequest":
        item.date = to_instant(model.authoredOn)
        item.status = model.status
        _add_concept(item, model.code, "ServiceRequest.code")
        period = model.occurrencePeriod
        item.due = _latest(model.occurrenceDateTime, period.end if period else None)
    return item


def _label(concept) -> str | None:
    if concept is None:
        return None
    return concept.text or next((c.display for c in concept.coding or [] if c.display), None)


def _replaced_notes(resources: list[dict]) -> set[str]:
    """DocumentReference/ids that a note in the record replaces: a superseded note counts only
    until its replacement is written (FHIR R4 DocumentReference.relatesTo, code `replaces`)."""
    out = set()
    for raw in resources:
        if raw.get("resourceType") != "DocumentReference":
            continue
        for relation in raw.get("relatesTo") or []:
            target = (relation.get("target") or {}).get("reference") if isinstance(relation, dict) else None
            if relation.get("code") == "replaces" and isinstance(target, str) and "DocumentReference/" in target:
                out.add(target[target.rfind("DocumentReference/"):].split("/_history")[0])
    return out


def _without_note_data(raw: dict) -> dict:
    """The resource to validate, without its notes' base64 (read once, from the raw JSON, by
    notes.py: decoding it twice was a tenth of reading a Synthea record)."""
    found = attachments(raw)
    if not any("data" in a for a in found):
        return raw
    copy = dict(raw)
    if raw.get("resourceType") == "DocumentReference":
        copy["content"] = [{**c, "attachment": {k: v for k, v in c["attachment"].items() if k != "data"}}
                           if isinstance(c, dict) and isinstance(c.get("attachment"), dict) else c
                           for c in raw.get("content") or []]
    else:
        copy["presentedForm"] = [{k: v for k, v in a.items() if k != "data"} if isinstance(a, dict) else a
                                 for a in raw.get("presentedForm") or []]
    return copy


def _never_counts(raw: dict, replaced: set[str]) -> bool:
    if raw.get("resourceType") != "DocumentReference":
        return False
    if raw.get("status") in _NOTE_NEVER_COUNTS or raw.get("docStatus") in _NOTE_NEVER_COUNTS:
        return True
    return raw.get("status") == "superseded" and f"DocumentReference/{raw.get('id')}" in replaced


def _read_attachments(item: Clinical, raw: dict, binaries: dict[str, dict], max_chars: int, problems: list[str]) -> None:
    """The note's text into `item.texts`; a note that cannot be read is named, never skipped silently."""
    field_name = f"{item.resource_type}.{'content' if item.resource_type == 'DocumentReference' else 'presentedForm'}"
    for attachment in attachments(raw):
        note = attachment_text(attachment, binaries, max_chars)
        if note.text:
            item.texts.append((note.text, field_name))
        if note.problem:
            problems.append(f"{item.resource_type}/{item.resource_id or '?'}: {note.problem}")


def describe_validation_error(rtype: str, rid, exc: ValidationError) -> str:
    """Type, id and the failing fields with pydantic's message; never the input value."""
    where = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        where.append(f"{rtype}.{loc}: {err.get('msg', 'invalid')}" if loc else f"{rtype}: {err.get('msg', 'invalid')}")
    more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return f"{rtype}/{rid or '?'} skipped: " + "; ".join(where) + more


def read_record(resources: list[dict], term: Terminology, note_max_chars: int = NOTE_MAX_CHARS) -> Record:
    items: list[Clinical] = []
    problems: list[str] = []
    seen: dict[str, str | None] = {}
    patients: list[str] = []
    binaries = {f"Binary/{r.get('id')}": r for r in resources if r.get("resourceType") == "Binary"}
    replaced = _replaced_notes(resources)
    for raw in resources:
        rtype = raw.get("resourceType")
        if rtype not in MODELS or not is_relevant(raw, term):
            continue
        if _never_counts(raw, replaced):
            continue  # entered in error, or superseded by a note in the record
        rid = raw.get("id")
        try:
            model = MODELS[rtype].model_validate(_without_note_data(raw))
        except ValidationError as exc:
            problems.append(describe_validation_error(rtype, rid if isinstance(rid, str) else None, exc))
            continue
        seen[f"{rtype}/{model.id}"] = model.meta.versionId if model.meta else None
        if rtype == "Patient":
            if model.id:
                patients.append(f"Patient/{model.id}")
            continue
        item = _clinical(model)
        _read_attachments(item, raw, binaries, note_max_chars, problems)
        items.append(item)
    patient = patients[0] if len(set(patients)) == 1 else None
    return Record(patient=patient, items=items, problems=problems, seen=seen)


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
