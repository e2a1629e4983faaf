"""Telling a FHIR R4 server or resource from an earlier (or later) release: /metadata's
fhirVersion, and the types and shapes that exist only before R4."""

from __future__ import annotations

import pytest

from fhir_mappings.fhir.versions import first_pre_r4_shape, pre_r4_shape, server_release


@pytest.mark.parametrize("metadata, name, accepted", [
    ({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"}, "R4", True),
    ({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.0"}, "R4", True),
    ({"resourceType": "CapabilityStatement", "fhirVersion": "4.3.0"}, "R4B", True),
    ({"resourceType": "CapabilityStatement", "fhirVersion": "3.0.2"}, "STU3", False),
    ({"resourceType": "CapabilityStatement", "fhirVersion": "5.0.0"}, "R5", False),
    ({"resourceType": "CapabilityStatement", "fhirVersion": "4.2.0"}, "an unknown release", False),  # an R5 preview
    ({"resourceType": "Conformance", "fhirVersion": "1.0.2"}, "DSTU2", False),
    ({"resourceType": "Conformance"}, "DSTU2", False),  # fhirVersion was optional in DSTU2: still not R4
])
def test_server_release_from_metadata(metadata, name, accepted):
    release = server_release(metadata)
    assert release is not None and release.name == name and release.accepted is accepted


@pytest.mark.parametrize("metadata", [
    {"resourceType": "CapabilityStatement"},  # no fhirVersion
    {"resourceType": "CapabilityStatement", "fhirVersion": "four"},
    {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1\n<script>"},
    {"resourceType": "OperationOutcome"},
    {"resourceType": "Patient", "fhirVersion": "1.0.2"},
    "not a resource",
])
def test_metadata_that_states_no_usable_release_is_unknown(metadata):
    assert server_release(metadata) is None


def test_the_refusal_names_the_release_and_what_is_read_and_echoes_only_a_version():
    dstu2 = server_release({"resourceType": "Conformance", "fhirVersion": "1.0.2"})
    assert dstu2.refusal() == ("fhirServer is FHIR DSTU2 (its /metadata says fhirVersion 1.0.2); SpineWatch reads "
                               "FHIR R4 (4.0.x) or R4B (4.3.x): choose an R4 FHIR server")
    odd = server_release({"resourceType": "Conformance", "fhirVersion": "<b>1.0.2</b>"})
    assert "<b>" not in odd.refusal() and "not stated" in odd.refusal()


R4_CONDITION = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
                "clinicalStatus": {"coding": [{"code": "active"}]},
                "verificationStatus": {"coding": [{"code": "confirmed"}]}, "code": {"text": "Breast cancer"}}


@pytest.mark.parametrize("resource, expected", [
    ({"resourceType": "Condition", "patient": {"reference": "Patient/p1"}, "clinicalStatus": {"coding": []}},
     "a Condition with `patient` instead of R4's `subject` (FHIR DSTU2)"),
    (R4_CONDITION | {"clinicalStatus": "active"}, "clinicalStatus or verificationStatus is a plain code"),
    (R4_CONDITION | {"verificationStatus": "confirmed"}, "plain code"),
    ({"resourceType": "ImagingStudy", "patient": {"reference": "Patient/p1"}}, "ImagingStudy with `patient`"),
    ({"resourceType": "MedicationOrder", "id": "m1"}, "a MedicationOrder, a FHIR DSTU2 resource type"),
    ({"resourceType": "Conformance"}, "a Conformance, a FHIR DSTU2 resource type that R4 does not have"),
    ({"resourceType": "ProcedureRequest"}, "a ProcedureRequest, a FHIR DSTU2/STU3 resource type"),
])
def test_pre_r4_shapes_are_named(resource, expected):
    assert expected in pre_r4_shape(resource)


@pytest.mark.parametrize("resource", [
    R4_CONDITION,
    {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}},  # statuses are optional in R4
    {"resourceType": "ImagingStudy", "subject": {"reference": "Patient/p1"}},
    {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p1"}},  # R4's own `patient`
    {"resourceType": "ServiceRequest", "subject": {"reference": "Patient/p1"}},
    {"resourceType": "Binary", "contentType": "text/plain"},
])
def test_r4_resources_pass(resource):
    assert pre_r4_shape(resource) is None


def test_first_pre_r4_shape_finds_one_among_r4_resources():
    assert first_pre_r4_shape([R4_CONDITION, R4_CONDITION]) is None
    assert "MedicationOrder" in first_pre_r4_shape([R4_CONDITION, {"resourceType": "MedicationOrder"}])
