"""Exported AuditEvents validate as FHIR R4 (fhir.resources) and carry the IHE BALP elements."""

import base64
import json

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from fhir_mappings.fhir.audit_events import BALP, ExportContext, audit_event, bundle

H0, H1 = "0" * 64, "1" * 64


def record(kind, outcome="success", patient="Patient/p1", actor="https://ehr.example.org", **detail):
    return {"seq": 7, "recorded": "2026-06-01T12:00:00.123456Z", "kind": kind, "outcome": outcome,
            "actor": actor, "patient": patient, "detail": detail, "prev_hash": H0, "hash": H1}


RECORDS = {
    "notification": record("notification", actor="Subscription/sub-1", subscription="Subscription/sub-1",
                           type="event-notification", focus=["Condition/c1"]),
    "evaluation": record("evaluation", actor="spinewatch-worker", tier="emergency", flags=["limb-weakness"],
                         inputs={"Condition/c1": "3", "Observation/o1": "1"}, rules={"limb-weakness": "1.0.0"}),
    "card": record("card", hook="patient-view", hookInstance="d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                   cards=["0b8f...1", "0b8f...2"]),
    "feedback": record("feedback", card="0b8f...1", outcome="overridden",
                       overrideReason={"reason": {"code": "patient-declined", "system": "urn:x"}}),
    "alert": record("alert", actor="spinewatch-worker", communication="Communication/c9", tier="emergency",
                    recipients=["Practitioner/onc"], evidence=["Observation/o1"]),
    "audit-access": record("audit-access", actor="reviewer", filters={"patient": "Patient/p1"}, count=3),
}
PROFILES = {"notification": "PatientCreate", "evaluation": "PatientCreate", "card": "PatientRead",
            "feedback": "PatientCreate", "alert": "PatientCreate", "audit-access": "PatientQuery"}


def validated(event: dict) -> dict:
    AuditEvent.model_validate(event)
    return event


@pytest.mark.parametrize("kind", list(RECORDS))
def test_each_kind_validates_and_carries_the_balp_elements(kind):
    e = validated(audit_event(RECORDS[kind], ExportContext(site="sw.example.org")))
    assert e["meta"]["profile"] == [BALP + PROFILES[kind]]
    assert e["type"]["code"] == "rest" and e["subtype"][0]["system"] == "http://hl7.org/fhir/restful-interaction"
    assert e["outcome"] == "0" and e["recorded"] == "2026-06-01T12:00:00.123456Z"
    roles = [a["type"]["coding"][0]["code"] for a in e["agent"]]
    assert sorted(roles) == ["110152", "110153"]  # BALP client and server agents
    assert all(a["network"]["address"] and a["who"] for a in e["agent"])  # BALP: who and network 1..1
    assert e["source"]["observer"]["display"] == "SpineWatch"
    patient = [x for x in e["entity"] if x["role"]["code"] == "1"]
    assert patient == [{"what": {"reference": "Patient/p1"},
                        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1",
                                 "display": "Person"},
                        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1",
                                 "display": "Patient"}}]
    data = [x for x in e["entity"] if x["type"]["code"] == "2"]
    assert len(data) == 1 and data[0]["what"]  # BALP: exactly one data entity (System Object)
    chain = {x["url"]: x for x in e["extension"][0]["extension"]}
    assert chain["seq"]["valueInteger"] == 7 and chain["hash"]["valueString"] == H1


def test_create_and_read_keep_balp_role_conventions():
    create = audit_event(RECORDS["feedback"])
    read = audit_event(RECORDS["card"])
    caller = lambda e: next(a for a in e["agent"] if a["requestor"])  # noqa: E731
    assert caller(create)["type"]["coding"][0]["code"] == "110153"  # Create: client is Source Role ID
    assert caller(read)["type"]["coding"][0]["code"] == "110152"  # Read: client is Destination Role ID
    assert caller(read)["network"] == {"address": "https://ehr.example.org", "type": "5"}


def test_evaluation_inputs_are_entities_with_versions():
    e = audit_event(RECORDS["evaluation"])
    inputs = [x for x in e["entity"] if x["type"]["system"] == "http://hl7.org/fhir/resource-types"]
    assert {x["what"]["reference"] for x in inputs} == {"Condition/c1/_history/3", "Observation/o1/_history/1"}
    details = {d["type"]: d["valueString"] for d in next(x for x in e["entity"] if x["type"]["code"] == "2")["detail"]}
    assert details["tier"] == "emergency" and json.loads(details["rules"]) == {"limb-weakness": "1.0.0"}


def test_audit_access_carries_the_query_base64():
    e = audit_event(RECORDS["audit-access"])
    query = next(x for x in e["entity"] if x["role"]["code"] == "24")
    assert json.loads(base64.b64decode(query["query"])) == {"patient": "Patient/p1"}


def test_a_failure_keeps_the_shape_but_claims_no_profile():
    e = validated(audit_event(record("alert", "failure", actor="spinewatch-worker", alert_id="abc",
                                     error="AlertRetry")))
    assert "meta" not in e and e["outcome"] == "8" and e["outcomeDesc"] == "AlertRetry"


def test_an_authentication_failure_is_a_dicom_user_authentication_event():
    e = validated(audit_event(record("auth-failure", "failure", patient=None, actor="10.0.0.9",
                                     surface="cds-hooks", reason="bad-signature")))
    assert e["type"]["code"] == "110114" and e["subtype"][0]["code"] == "110122"
    assert e["outcome"] == "4" and e["outcomeDesc"] == "bad-signature"


def test_records_without_a_patient_use_the_non_patient_profile():
    e = validated(audit_event(record("notification", patient=None, subscription="Subscription/s")))
    assert e["meta"]["profile"] == [BALP + "Create"]
    assert all(x["role"]["code"] != "1" for x in e["entity"])


def test_an_unknown_kind_is_an_application_activity():
    e = validated(audit_event(record("heartbeat", patient=None, actor="scheduler")))
    assert e["type"]["code"] == "110100" and "meta" not in e


def test_bundle_validates():
    events = [audit_event(r) for r in RECORDS.values()]
    Bundle.model_validate(bundle(events))
