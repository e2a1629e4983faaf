"""The reading models: the fhir.resources R4B models cut down to the elements the rules read.

`_clinical` (extract.py) reads a few elements of each resource: its codes, dates, statuses and texts.
The full R4B models validate every element at every depth with Python validators, which was the
largest part of a CDS Hooks call and of a worker's evaluation (docs/capacity.md). A reading model
is built from the R4B model itself at import time, keeping of each class only

- the elements listed in READ below (what `_clinical` reads), and
- the elements R4 requires (cardinality 1..1 or 1..*: Condition.subject, Observation.status ...),

each with the R4B model's own type: the same primitive types (the FHIR R4 regular expressions for
code, id, dateTime, instant ...; https://hl7.org/fhir/R4/datatypes.html), the same parsed values
(datetime, Decimal), and for a complex element the reading model of its class. Two rules the R4B
models check in Python are checked here on the raw JSON, once per resource or element: a required
primitive is present (as the value or its `_element` extension sibling,
https://hl7.org/fhir/R4/json.html#primitive), and a choice element `x[x]` has one type at most
(https://hl7.org/fhir/R4/formats.html#choice).

Elements the rules never read are ignored, not validated: a resource is readable when what is read
of it is valid, and a server's own additions elsewhere (Medplum's meta.project, an R5 element in an
R4 resource, a DICOM series' thousands of instances, a note's base64 data, read separately from the
raw JSON by fhir_mappings/fhir/notes.py) neither cost validation time nor make a whole resource,
and with it the patient's cancer or red flag, unreadable.
"""

from __future__ import annotations

import typing

from fhir_core.types import FhirBase
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError

from fhir_mappings.clinical.facts import MODELS

# What `_clinical` reads of each class, by the R4B models' field names. Add an element here when a
# rule starts reading it: an element not listed is not on the reading model (AttributeError).
READ: dict[str, frozenset[str]] = {name: frozenset(fields) for name, fields in {
    "Patient": {"id", "meta"},
    "Condition": {"id", "meta", "clinicalStatus", "verificationStatus", "code", "note", "bodySite",
                  "onsetDateTime", "onsetPeriod", "abatementDateTime", "abatementPeriod", "recordedDate"},
    "Observation": {"id", "meta", "status", "code", "effectiveDateTime", "effectiveInstant", "effectivePeriod",
                    "issued", "valueCodeableConcept", "valueString", "valueQuantity", "valueInteger", "note",
                    "component", "bodySite"},
    "DiagnosticReport": {"id", "meta", "status", "code", "effectiveDateTime", "effectivePeriod", "issued",
                         "conclusion", "conclusionCode"},
    "DocumentReference": {"id", "meta", "status", "type", "date", "context"},
    "ClinicalImpression": {"id", "meta", "status", "effectiveDateTime", "effectivePeriod", "date", "summary",
                           "description", "finding"},
    "ImagingStudy": {"id", "meta", "status", "started", "procedureCode", "description", "modality", "series"},
    "Procedure": {"id", "meta", "status", "code", "performedDateTime", "performedPeriod"},
    "ServiceRequest": {"id", "meta", "status", "code", "authoredOn", "occurrenceDateTime", "occurrencePeriod"},
    # The elements' own classes
    "Meta": {"versionId", "lastUpdated"},
    "Coding": {"system", "code", "display"},
    "CodeableConcept": {"coding", "text"},
    "Period": {"start", "end"},
    "Annotation": {"text"},
    "Quantity": {"value"},
    "Reference": {"reference"},
    "Attachment": {"contentType"},
    "ObservationComponent": {"code", "valueString", "valueCodeableConcept"},
    "ClinicalImpressionFinding": {"itemCodeableConcept", "basis"},
    "ImagingStudySeries": {"modality", "bodySite", "description"},
    "DocumentReferenceContext": {"period"},
    "DocumentReferenceContent": {"attachment"},
}.items()}


class ReadingModel(BaseModel):
    """Base of the reading models: unread elements ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class CheckedReadingModel(ReadingModel):
    """Base of the reading models whose R4B class has required primitives or choice groups: those
    rules checked on the raw JSON first. The others (Coding, Period ...) skip this Python call."""

    # Filled in per class by `_reading_model`.
    _required_primitives: typing.ClassVar[tuple[str, ...]] = ()
    _choice_groups: typing.ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _r4_rules(cls, data: typing.Any) -> typing.Any:
        if not isinstance(data, dict):
            return data
        missing = [name for name in cls._required_primitives if name not in data and f"_{name}" not in data]
        if missing:
            raise PydanticCustomError("missing", "required element(s) missing: {names}", {"names": ", ".join(missing)})
        for prefix, aliases in cls._choice_groups:
            given = [alias for alias in aliases if alias in data]
            if len(given) > 1:
                raise PydanticCustomError("choice", "{prefix}[x] given as more than one type: {given}",
                                          {"prefix": prefix, "given": ", ".join(given)})
        return data


def _element_type(annotation) -> tuple[type | None, bool]:
    """(the R4B class of a complex element, or None for a primitive; whether it repeats), looking
    through Optional and List: X, X | None, list[X], list[X] | None."""
    pending, repeats = [annotation], False
    while pending:
        candidate = pending.pop()
        if isinstance(candidate, type) and issubclass(candidate, FhirBase):
            return candidate.get_model_klass(), repeats
        repeats = repeats or typing.get_origin(candidate) in (list, typing.List)
        pending.extend(typing.get_args(candidate))
    return None, repeats


_BUILT: dict[type, type[ReadingModel]] = {}


def _reading_model(r4b: type) -> type[ReadingModel]:
    """The reading model of the R4B class `r4b` (built once; nested classes first)."""
    if r4b in _BUILT:
        return _BUILT[r4b]
    read = READ.get(r4b.__name__, frozenset())
    fields, required_primitives, choices = {}, [], {}
    for name, info in r4b.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if "one_of_many" in extra:
            choices.setdefault(extra["one_of_many"], []).append(info.alias or name)
        nested, repeats = _element_type(info.annotation)
        required = info.is_required() or extra.get("element_required", False)
        if nested is None and extra.get("element_required", False):
            required_primitives.append(info.alias or name)
        if name not in read and not required:
            continue
        if nested is None:
            fields[name] = (info.annotation, Field(None, alias=info.alias))
            continue
        model = _reading_model(nested)
        annotation = list[model] if repeats else model
        fields[name] = ((annotation, Field(alias=info.alias)) if info.is_required()
                        else (annotation | None, Field(None, alias=info.alias)))
    choice_groups = tuple((prefix, tuple(aliases)) for prefix, aliases in choices.items() if len(aliases) > 1)
    checked = bool(required_primitives or choice_groups)
    model = create_model(f"Reading{r4b.__name__}", __base__=CheckedReadingModel if checked else ReadingModel, **fields)
    if checked:
        model._required_primitives, model._choice_groups = tuple(required_primitives), choice_groups
    _BUILT[r4b] = model
    return model


READING_MODELS: dict[str, type[ReadingModel]] = {rtype: _reading_model(model) for rtype, model in MODELS.items()}
