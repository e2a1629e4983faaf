"""Validation and extraction: the raw resources the sieve keeps, validated with the reading models
(the fhir.resources R4B models cut down to the elements the rules read: fhir_mappings/clinical/
reading.py) and read into `Clinical` facts (what, when, which resource, which code or quoted text);
`read_record` is the whole step for one patient's resources.

`_clinical` is the only reader of the models (everything after it, rules, cards, the evidence view,
the store and the audit, sees `Clinical`, `Evidence` and `Assessment`): an element it reads must be
on its class's reading model (reading.READ). `warm_models` readies the models at process start-up.
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import ValidationError

from fhir_mappings.fhir.bundle import attachments
from fhir_mappings.fhir.notes import attachment_text
from fhir_mappings.clinical.terminology import Terminology
from fhir_mappings.clinical.facts import NOTE_MAX_CHARS, NOTE_NEVER_COUNTS, Clinical, Record, latest, to_instant
from fhir_mappings.clinical.reading import READING_MODELS
from fhir_mappings.clinical.sieve import is_relevant

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


def _clinical(model, rtype: str) -> Clinical:
    version = model.meta.versionId if model.meta else None
    item = Clinical(rtype, model.id, version, None)
    if rtype == "Condition":
        item.date = latest(model.onsetDateTime, model.onsetPeriod.start if model.onsetPeriod else None,
                            model.recordedDate)
        item.abatement = latest(model.abatementDateTime,
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
        item.date = latest(model.effectiveDateTime, model.effectiveInstant,
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
        item.date = latest(model.effectiveDateTime, model.effectivePeriod.end if model.effectivePeriod else None,
                            model.issued)
        item.status = model.status
        _add_concept(item, model.code, "DiagnosticReport.code")
        if model.conclusion:
            item.texts.append((model.conclusion, "DiagnosticReport.conclusion"))
        for concept in model.conclusionCode or []:
            _add_concept(item, concept, "DiagnosticReport.conclusionCode")
    elif rtype == "DocumentReference":
        period = model.context.period if model.context else None
        item.date = latest(period.end if period else None, period.start if period else None) or to_instant(model.date)
        item.status = model.status
        item.label = _label(model.type) or "clinical note"
    elif rtype == "ClinicalImpression":
        period = model.effectivePeriod
        item.date = latest(model.effectiveDateTime, period.end if period else None, period.start if period else None,
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
        item.date = latest(model.performedDateTime, period.end if period else None, period.start if period else None)
        item.status = model.status
        _add_concept(item, model.code, "Procedure.code")
    elif rtype == "ServiceRequest":
        item.date = to_instant(model.authoredOn)
        item.status = model.status
        _add_concept(item, model.code, "ServiceRequest.code")
        period = model.occurrencePeriod
        item.due = latest(model.occurrenceDateTime, period.end if period else None)
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


def _never_counts(raw: dict, replaced: set[str]) -> bool:
    if raw.get("resourceType") != "DocumentReference":
        return False
    if raw.get("status") in NOTE_NEVER_COUNTS or raw.get("docStatus") in NOTE_NEVER_COUNTS:
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
        if rtype not in READING_MODELS or not is_relevant(raw, term):
            continue
        if _never_counts(raw, replaced):
            continue  # entered in error, or superseded by a note in the record
        rid = raw.get("id")
        try:
            model = READING_MODELS[rtype].model_validate(raw)
        except ValidationError as exc:
            problems.append(describe_validation_error(rtype, rid if isinstance(rid, str) else None, exc))
            continue
        seen[f"{rtype}/{model.id}"] = model.meta.versionId if model.meta else None
        if rtype == "Patient":
            if model.id:
                patients.append(f"Patient/{model.id}")
            continue
        item = _clinical(model, rtype)
        _read_attachments(item, raw, binaries, note_max_chars, problems)
        items.append(item)
    patient = patients[0] if len(set(patients)) == 1 else None
    return Record(patient=patient, items=items, problems=problems, seen=seen)


# A resource of each model with only its required elements (FHIR R4 cardinality 1..1).
_MINIMAL = {
    "Patient": {},
    "Condition": {"subject": {"reference": "Patient/p"}},
    "Observation": {"status": "final", "code": {"text": "warm-up"}},
    "DiagnosticReport": {"status": "final", "code": {"text": "warm-up"}},
    "ImagingStudy": {"status": "available", "subject": {"reference": "Patient/p"}},
    "Procedure": {"status": "completed", "subject": {"reference": "Patient/p"}},
    "ServiceRequest": {"status": "active", "intent": "order", "subject": {"reference": "Patient/p"}},
    "DocumentReference": {"status": "current", "content": [{"attachment": {"contentType": "text/plain"}}]},
    "ClinicalImpression": {"status": "completed", "subject": {"reference": "Patient/p"}},
}


def warm_models() -> None:
    """Ready the reading models at process start-up (the worker's, the API's) rather than in the
    first evaluation: building them (fhir_mappings/clinical/reading.py, on import) imports every R4B
    class they are cut from, and one minimal instance of each is validated here. Raises if a model
    refuses its minimal instance."""
    for rtype, model in READING_MODELS.items():
        model.model_validate({"resourceType": rtype, **_MINIMAL[rtype]})
