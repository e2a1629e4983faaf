"""Retractions, the pure part (fhir_mappings/cds/alerts.py): which records no longer stand, which
sent alerts they affect, the follow-up Communication and webhook body, and when the follow-up
stands in for the current alert."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from fhir.resources.R4B.communication import Communication

from fhir_mappings.cds.alerts import (DELETED, ENTERED_IN_ERROR, MOVED, RETRACTION_ID_SYSTEM, RETRACTION_TYPE,
                                      CurrentAssessment, SentAlert, alert_id, alert_input, current_assessment,
                                      entered_in_error, follow_up_recipients, retraction_communication, retraction_for,
                                      retraction_id, retraction_reason, retraction_webhook_body, sign, stands_in_for,
                                      unreported_basis, verify_signature)
from fhir_mappings.clinical.evaluate import assess
from fhir_mappings.fhir.bundle import read_path
from tests.support.paths import ROOT

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
PATIENT = "Patient/example-emergency"
VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


def record(*, neuro: bool = True) -> list[dict]:
    out = read_path(str(ROOT / "examples" / "emergency-breast-cancer-leg-weakness.json"))
    return [r for r in out if neuro or r.get("id") != "neuro-note"]


def sent(assessment, *, sent_at="2026-06-01T02:00:00+00:00", communication="Communication/c1",
         recipients=("Practitioner/oncologist",), retracted=()) -> SentAlert:
    alert = alert_input(assessment)
    return SentAlert(alert_id(alert), alert.tier, sent_at, communication, tuple(recipients), alert.basis,
                     alert.fingerprint, tuple(retracted))


EMERGENCY = assess(record(), NOW)
URGENT = assess(record(neuro=False), NOW)


# -- what no longer stands ------------------------------------------------------------------------

def test_entered_in_error_as_each_resource_type_records_it():
    condition = {"resourceType": "Condition", "verificationStatus": {"coding": [{"system": VER, "code": "entered-in-error"}]}}
    assert entered_in_error(condition)
    assert not entered_in_error(condition | {"verificationStatus": {"coding": [{"system": VER, "code": "confirmed"}]}})
    assert entered_in_error({"resourceType": "Observation", "status": "entered-in-error"})
    assert entered_in_error({"resourceType": "DiagnosticReport", "status": "entered-in-error"})
    assert entered_in_error({"resourceType": "DocumentReference", "status": "current", "docStatus": "entered-in-error"})
    assert entered_in_error({"resourceType": "DocumentReference", "status": "entered-in-error"})
    assert not entered_in_error({"resourceType": "Observation", "status": "final"})
    assert not entered_in_error({"resourceType": "Condition"})


def test_retraction_reason_deleted_entered_in_error_moved_or_standing():
    mine = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": PATIENT}}
    assert retraction_reason(None, PATIENT) == DELETED
    assert retraction_reason(mine | {"status": "entered-in-error"}, PATIENT) == ENTERED_IN_ERROR
    assert retraction_reason(mine | {"subject": {"reference": "Patient/someone-else"}}, PATIENT) == MOVED
    assert retraction_reason(mine, PATIENT) is None  # still there (aged out, say): no retraction


def test_an_alerts_basis_is_every_record_it_rests_on():
    assert alert_input(EMERGENCY).basis == ("Condition/breast-cancer", "Condition/thoracic-back-pain",
                                            "Observation/neuro-note")
    assert alert_input(EMERGENCY.to_json()).basis == alert_input(EMERGENCY).basis


# -- which alerts are affected ----------------------------------------------------------------------

def test_only_alerts_resting_on_a_retracted_record_are_affected_oldest_first():
    urgent = sent(URGENT, sent_at="2026-05-30T09:00:00+00:00", communication="Communication/u1")
    emergency = sent(EMERGENCY, communication="Communication/e1")
    current = current_assessment(URGENT)
    neuro_gone = retraction_for(PATIENT, [emergency, urgent], {"Observation/neuro-note": DELETED}, current)
    assert [a.alert.communication for a in neuro_gone.affected] == ["Communication/e1"]
    assert neuro_gone.references == ("Observation/neuro-note",)
    cancer_gone = retraction_for(PATIENT, [emergency, urgent], {"Condition/breast-cancer": ENTERED_IN_ERROR}, current)
    assert [a.alert.communication for a in cancer_gone.affected] == ["Communication/u1", "Communication/e1"]
    assert cancer_gone.reasons == (("Condition/breast-cancer", ENTERED_IN_ERROR),)
    assert retraction_for(PATIENT, [emergency], {"Observation/other": DELETED}, current) is None


def test_a_record_already_reported_is_not_reported_again():
    reported = sent(EMERGENCY, retracted=["Observation/neuro-note"])
    assert retraction_for(PATIENT, [reported], {"Observation/neuro-note": DELETED}, current_assessment(URGENT)) is None
    # ... and is no longer a candidate to check on the server.
    assert unreported_basis([reported], cited_now={"Condition/breast-cancer"}) == {"Condition/thoracic-back-pain"}


def test_retraction_id_is_per_alerts_and_records_not_per_current_state():
    alert = sent(EMERGENCY)
    one = retraction_for(PATIENT, [alert], {"Observation/neuro-note": DELETED}, current_assessment(URGENT))
    same = retraction_for(PATIENT, [alert], {"Observation/neuro-note": ENTERED_IN_ERROR},
                          CurrentAssessment("none", (), ()))
    more = retraction_for(PATIENT, [alert], {"Observation/neuro-note": DELETED, "Condition/breast-cancer": DELETED},
                          current_assessment(URGENT))
    assert retraction_id(one) == retraction_id(same)
    assert retraction_id(one) != retraction_id(more)
    assert len(retraction_id(one)) == 40


# -- the follow-up ----------------------------------------------------------------------------------

def test_the_follow_up_is_valid_r4_in_response_to_the_alerts_with_the_current_tier():
    urgent = sent(URGENT, sent_at="2026-05-30T09:00:00+00:00", communication="Communication/u1",
                  recipients=["Practitioner/gp"])
    emergency = sent(EMERGENCY, communication="Communication/e1",
                     recipients=["Practitioner/oncologist", "Practitioner/gp"])
    retraction = retraction_for(PATIENT, [urgent, emergency], {"Condition/breast-cancer": ENTERED_IN_ERROR},
                                CurrentAssessment("none", (), ()))
    recipients = follow_up_recipients(retraction)
    assert recipients == ["Practitioner/gp", "Practitioner/oncologist"]
    resource = retraction_communication(retraction, recipients, NOW)
    Communication.model_validate(resource)
    assert resource["identifier"] == [{"system": RETRACTION_ID_SYSTEM, "value": retraction_id(retraction)}]
    assert resource["inResponseTo"] == [{"reference": "Communication/u1"}, {"reference": "Communication/e1"}]
    assert resource["category"][0]["coding"][0]["code"] == "alert"
    assert resource["priority"] == "routine"  # no tier now: routine, never silence
    assert resource["subject"] == {"reference": PATIENT}
    text = resource["payload"][0]["contentString"]
    assert text.startswith("Update to the SpineWatch alerts of 2026-05-30 09:00 UTC (urgent) and "
                           "2026-06-01 02:00 UTC (emergency): they were based on a record since marked "
                           "entered-in-error (Condition/breast-cancer).")
    assert "Current assessment: none" in text and "Red flags now: none." in text
    assert "does not cancel an MRI already requested" in text
    assert len(resource["payload"]) == 1  # no current evidence to point at


def test_the_follow_up_names_the_current_tier_flags_and_evidence_and_quotes_nothing():
    retraction = retraction_for(PATIENT, [sent(EMERGENCY)], {"Observation/neuro-note": DELETED},
                                current_assessment(URGENT))
    resource = retraction_communication(retraction, ["Practitioner/oncologist"], NOW)
    assert resource["priority"] == "urgent"
    text = resource["payload"][0]["contentString"]
    assert "(emergency): it was based on a record since deleted on the server (Observation/neuro-note)" in text
    assert "Current assessment: urgent: Suspected spinal metastasis: whole-spine MRI within 1 week." in text
    assert "Red flags now: nocturnal-pain, thoracic-or-cervical-pain." in text
    assert [p["contentReference"]["reference"] for p in resource["payload"][1:]] == ["Condition/thoracic-back-pain"]
    assert "bilateral" not in json.dumps(resource).lower()  # the note's words stay in the chart
    assert "neuro-note" not in json.dumps(resource.get("reasonReference", []))  # a deleted record is not a reason


def test_the_webhook_body_is_typed_signed_and_names_references_only():
    retraction = retraction_for(PATIENT, [sent(EMERGENCY)], {"Observation/neuro-note": DELETED},
                                current_assessment(URGENT))
    body = retraction_webhook_body(retraction, "Communication/f1", ["Practitioner/oncologist"], NOW)
    data = json.loads(body)
    assert data["type"] == RETRACTION_TYPE == "spinewatch.alert.retraction"
    assert data["id"] == retraction_id(retraction) and data["communication"] == "Communication/f1"
    assert data["retracted"] == [{"reference": "Observation/neuro-note", "reason": DELETED}]
    assert data["alerts"][0]["communication"] == "Communication/c1" and data["alerts"][0]["tier"] == "emergency"
    assert data["tier"] == "urgent" and data["priority"] == "urgent"
    assert verify_signature(body, "s3cret", sign(body, "s3cret"))
    assert "bilateral" not in body.decode().lower()


def test_the_follow_up_stands_in_for_an_alert_that_would_only_repeat_the_earlier_one():
    retraction = retraction_for(PATIENT, [sent(EMERGENCY)], {"Observation/neuro-note": DELETED},
                                current_assessment(URGENT))
    assert stands_in_for(retraction, alert_input(URGENT))  # less evidence, lower tier: nothing new
    assert not stands_in_for(retraction, None)
    urgent_only = retraction_for(PATIENT, [sent(URGENT)], {"Condition/breast-cancer": DELETED},
                                 current_assessment(EMERGENCY))
    assert not stands_in_for(urgent_only, alert_input(EMERGENCY))  # new evidence and a higher tier: news
