"""Which FHIR release a server or a resource is, as far as SpineWatch needs to know: everything it
reads is FHIR R4, and data of an earlier release would be misread in silence (a DSTU2 Condition's
plain-string clinicalStatus fails R4 validation, the cancer is dropped, and the patient gets no card).

Two cheap tells:

    server_release(metadata)   the `fhirVersion` of a server's /metadata (the R4 `capabilities`
                               interaction, https://hl7.org/fhir/R4/http.html#capabilities:
                               CapabilityStatement.fhirVersion; DSTU2 answers a Conformance, the
                               resource's name before STU3 renamed it)
    pre_r4_shape(resource)     a resource whose type or shape exists only before R4

Accepted: R4 (4.0.x) and R4B (4.3.x). R4B "incorporates changes to a few selected modules, while
preserving compatibility across the rest of the specification. Implementers that do not use the
specific portions where changes have been made can continue to use either R4 or R4B without any
functional difference" (https://hl7.org/fhir/R4B/r4b-explanation.html): its changes are the
medication-definition, evidence-based-medicine and subscription resources, none of which SpineWatch
reads. R5 (5.0.x) changed resources SpineWatch reads (ImagingStudy, DocumentReference), and DSTU2 /
STU3 predate R4's shapes: all refused.

Pure: no I/O. Messages hold version strings and resource type names only, never resource content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# `major.minor` of a published release's fhirVersion (https://hl7.org/fhir/directory.html).
RELEASES = {"0.0": "DSTU1", "1.0": "DSTU2", "3.0": "STU3", "4.0": "R4", "4.3": "R4B", "5.0": "R5"}
ACCEPTED = ("R4", "R4B")
ACCEPTED_TEXT = "FHIR R4 (4.0.x) or R4B (4.3.x)"
_VERSION = re.compile(r"(\d{1,2})\.(\d{1,2})(?:\.\d{1,3})?(?:-[A-Za-z0-9.]{1,20})?")

# Resource types of DSTU2 / STU3 that R4 does not have (renamed, merged or removed: R4
# https://hl7.org/fhir/R4/history.html, 3.3.0 and 3.5.0: "Renamed Resources: ProcedureRequest to
# ServiceRequest & BodySite to BodyStructure", ReferralRequest merged into ServiceRequest, ...;
# DSTU2 → STU3 https://hl7.org/fhir/STU3/history.html: Conformance → CapabilityStatement,
# MedicationOrder → MedicationRequest, DiagnosticOrder → ProcedureRequest, ...).
PRE_R4_TYPES = {
    "Conformance": "DSTU2", "MedicationOrder": "DSTU2", "DiagnosticOrder": "DSTU2", "DeviceUseRequest": "DSTU2",
    "Order": "DSTU2", "OrderResponse": "DSTU2", "ImagingObjectSelection": "DSTU2",
    "ProcedureRequest": "DSTU2/STU3", "ReferralRequest": "DSTU2/STU3", "BodySite": "DSTU2/STU3",
    "DataElement": "DSTU2/STU3", "EligibilityRequest": "DSTU2/STU3", "EligibilityResponse": "DSTU2/STU3",
    "ProcessRequest": "DSTU2/STU3", "ProcessResponse": "DSTU2/STU3", "DeviceComponent": "DSTU2/STU3",
    "ImagingManifest": "STU3", "ExpansionProfile": "STU3", "Sequence": "STU3", "ServiceDefinition": "STU3",
}
# Resources SpineWatch reads whose patient was `patient` before R4 named it `subject` (DSTU2
# Condition.patient; DSTU2 and STU3 ImagingStudy.patient).
SUBJECT_WAS_PATIENT = {"Condition": "DSTU2", "ImagingStudy": "DSTU2/STU3"}


@dataclass(frozen=True)
class ServerRelease:
    """A server's FHIR release, from its /metadata."""

    name: str  # DSTU2, STU3, R4, R4B, R5, or "an unknown release"
    version: str  # fhirVersion as the server said it, when well formed; else "not stated" / "unrecognised"

    @property
    def accepted(self) -> bool:
        return self.name in ACCEPTED

    def refusal(self) -> str:
        """Why a server of this release cannot be read (for a 412's diagnostics)."""
        return (f"fhirServer is FHIR {self.name} (its /metadata says fhirVersion {self.version}); "
                f"SpineWatch reads {ACCEPTED_TEXT}: choose an R4 FHIR server")


def server_release(metadata: object) -> ServerRelease | None:
    """The release a server's /metadata states, or None when it states none SpineWatch can tell
    (not a CapabilityStatement, or no usable fhirVersion): the caller then decides on the data."""
    if not isinstance(metadata, dict):
        return None
    kind, stated = metadata.get("resourceType"), metadata.get("fhirVersion")
    match = _VERSION.fullmatch(stated) if isinstance(stated, str) else None
    if kind == "Conformance":  # DSTU2 (fhirVersion 0..1 there) or DSTU1: not R4 whatever it says
        return ServerRelease(RELEASES.get(_major_minor(match), "DSTU2"), stated if match else "not stated")
    if kind != "CapabilityStatement" or match is None:
        return None
    return ServerRelease(RELEASES.get(_major_minor(match), "an unknown release"), stated)


def _major_minor(match: re.Match | None) -> str:
    return f"{int(match[1])}.{int(match[2])}" if match else ""


def pre_r4_shape(resource: dict) -> str | None:
    """What marks `resource` as data of a release before R4, or None when nothing does. A few
    dictionary reads: this runs on every prefetched and fetched resource of a hook call."""
    kind = resource.get("resourceType")
    release = PRE_R4_TYPES.get(kind)
    if release:
        return f"a {kind}, a FHIR {release} resource type that R4 does not have"
    release = SUBJECT_WAS_PATIENT.get(kind)
    if release and "subject" not in resource and "patient" in resource:
        return f"a {kind} with `patient` instead of R4's `subject` (FHIR {release})"
    if kind == "Condition" and (isinstance(resource.get("clinicalStatus"), str)
                                or isinstance(resource.get("verificationStatus"), str)):
        return "a Condition whose clinicalStatus or verificationStatus is a plain code, not R4's CodeableConcept " \
               "(FHIR DSTU2/STU3)"
    return None


def first_pre_r4_shape(resources: list[dict]) -> str | None:
    """The first pre-R4 tell among `resources` (see pre_r4_shape), or None."""
    for resource in resources:
        found = pre_r4_shape(resource)
        if found:
            return found
    return None
