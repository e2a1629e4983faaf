"""The pure evaluation: scope, tiers, recency, statuses, invalid resources, purity."""

import copy
from datetime import datetime, timezone

import pytest

from fhir_mappings.clinical.evaluate import EvaluationSettings, assess

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
SNOMED = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"


def condition(cid, system, code, onset=None, clinical="active", verification="confirmed", text=None, **extra):
    res = {"resourceType": "Condition", "id": cid, "subject": {"reference": "Patient/p"},
           "code": {"coding": [{"system": system, "code": code}]},
           "clinicalStatus": {"coding": [{"code": clinical}]},
           "verificationStatus": {"coding": [{"code": verification}]}}
    if onset:
        res["onsetDateTime"] = onset
    if text:
        res["code"]["text"] = text
    return res | extra


def note(oid, text, when="2026-05-30T10:00:00Z", status="final"):
    return {"resourceType": "Observation", "id": oid, "status": status, "code": {"text": "Clinical note"},
            "subject": {"reference": "Patient/p"}, "effectiveDateTime": when, "valueString": text}


PATIENT = {"resourceType": "Patient", "id": "p"}
CANCER = condition("ca", SNOMED, "399068003", onset="2018-01-01", clinical="resolved", abatementDateTime="2019-01-01")
BACK_PAIN = condition("lbp", SNOMED, "279039007", onset="2026-05-20")


def test_routine_urgent_emergency_and_none():
    assert assess([PATIENT, CANCER, BACK_PAIN], NOW).urgency == "routine"
    assert assess([PATIENT, CANCER, BACK_PAIN, note("n", "Pain wakes him at night")], NOW).urgency == "urgent"
    emergency = assess([PATIENT, CANCER, BACK_PAIN, note("n", "New urinary retention")], NOW)
    assert emergency.urgency == "emergency" and emergency.red_flags == ["sphincter-dysfunction"]
    assert emergency.evidence[0].quote == "New urinary retention"
    assert assess([PATIENT, BACK_PAIN, note("n", "New urinary retention")], NOW).urgency == "none"  # no cancer


def test_box2_finding_without_back_pain_is_in_scope():
    result = assess([PATIENT, CANCER, note("n", "Bilateral leg weakness")], NOW)
    assert result.urgency == "emergency" and not result.back_pain


def test_lookback_is_a_setting_and_recency_uses_the_latest_date():
    old = condition("lbp", SNOMED, "279039007", onset="2026-01-10")
    assert assess([PATIENT, CANCER, old], NOW).urgency == "none"
    assert assess([PATIENT, CANCER, old], NOW, EvaluationSettings(lookback_days=200)).urgency == "routine"
    recorded_recently = old | {"recordedDate": "2026-05-01"}
    assert assess([PATIENT, CANCER, recorded_recently], NOW).urgency == "routine"


def test_undated_condition_counts_only_while_active():
    undated = condition("lbp", SNOMED, "279039007")
    assert assess([PATIENT, CANCER, undated], NOW).urgency == "routine"
    assert assess([PATIENT, CANCER, condition("lbp", SNOMED, "279039007", clinical="inactive")], NOW).urgency == "none"


def test_resolved_back_pain_abated_before_window_does_not_count():
    closed = condition("lbp", SNOMED, "279039007", onset="2026-04-01", clinical="resolved",
                       abatementDateTime="2026-01-01")
    assert assess([PATIENT, CANCER, closed], NOW).urgency == "none"


@pytest.mark.parametrize("status", ["refuted", "entered-in-error", "provisional", "differential"])
def test_unconfirmed_cancer_does_not_count(status):
    cancer = condition("ca", ICD, "C50.9", onset="2020-01-01", verification=status)
    assert assess([PATIENT, cancer, BACK_PAIN], NOW).urgency == "none"


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_withdrawn_observation_never_counts(status):
    assert assess([PATIENT, CANCER, BACK_PAIN, note("n", "urinary retention", status=status)], NOW).urgency == "routine"


def test_invalid_resource_is_skipped_and_reported_without_its_value():
    bad = note("bad", "Bilateral leg weakness", when="last tuesday")
    result = assess([PATIENT, CANCER, BACK_PAIN, bad], NOW)
    assert result.urgency == "routine"  # the good resources still decide
    assert len(result.problems) == 1
    assert "Observation/bad" in result.problems[0] and "effectiveDateTime" in result.problems[0]
    assert "tuesday" not in result.problems[0]


def test_assess_is_pure():
    resources = [PATIENT, CANCER, BACK_PAIN, note("n", "Pain wakes him at night")]
    before = copy.deepcopy(resources)
    first, second = assess(resources, NOW), assess(resources, NOW)
    assert resources == before
    assert first.to_json() == second.to_json()
    with pytest.raises(ValueError):
        assess(resources, datetime(2026, 6, 1))  # a naive time is refused, never guessed


def test_suppression_by_completed_mri_after_the_evidence():
    mri = {"resourceType": "DiagnosticReport", "id": "mri", "status": "final", "subject": {"reference": "Patient/p"},
           "code": {"coding": [{"system": "http://loinc.org", "code": "36400-0"}]},
           "effectiveDateTime": "2026-05-31T09:00:00Z"}
    result = assess([PATIENT, CANCER, BACK_PAIN, mri], NOW)
    assert result.urgency == "none" and result.suppressed_by == ["DiagnosticReport/mri"]
    earlier = mri | {"effectiveDateTime": "2026-05-01T09:00:00Z"}
    assert assess([PATIENT, CANCER, BACK_PAIN, earlier], NOW).urgency == "routine"


def test_pending_mri_order_keeps_the_tier():
    order = {"resourceType": "ServiceRequest", "id": "sr", "status": "active", "intent": "order",
             "subject": {"reference": "Patient/p"}, "occurrenceDateTime": "2026-06-03",
             "code": {"coding": [{"system": "http://loinc.org", "code": "36400-0"}]}}
    result = assess([PATIENT, CANCER, BACK_PAIN, note("n", "night pain")], NOW)
    with_order = assess([PATIENT, CANCER, BACK_PAIN, note("n", "night pain"), order], NOW)
    assert result.urgency == with_order.urgency == "urgent"
    assert [p.reference for p in with_order.pending_mri] == ["ServiceRequest/sr"]


def test_pain_score_trends():
    def score(oid, when, value):
        return {"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": "Patient/p"},
                "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3"}]},
                "bodySite": {"coding": [{"system": SNOMED, "code": "122496007"}]},
                "effectiveDateTime": when, "valueQuantity": {"value": value}}
    rising = [score("s1", "2026-04-01", 3), score("s2", "2026-04-20", 4), score("s3", "2026-05-20", 6)]
    result = assess([PATIENT, CANCER, *rising], NOW)
    assert result.urgency == "urgent" and "progressive-pain" in result.red_flags
    severe = [score("s1", "2026-05-01", 8), score("s2", "2026-05-09", 7)]
    assert "severe-unremitting-pain" in assess([PATIENT, CANCER, *severe], NOW).red_flags
    too_close = [score("s1", "2026-05-01", 8), score("s2", "2026-05-05", 9)]
    assert "severe-unremitting-pain" not in assess([PATIENT, CANCER, *too_close], NOW).red_flags


# --------------------------------------------------------------------------- clinical language: scope and anchoring

def test_evidence_dated_after_the_evaluation_time_never_counts():
    future = note("n", "New urinary retention", when="2026-06-03T10:00:00Z")
    assert assess([PATIENT, CANCER, BACK_PAIN, future], NOW).urgency == "routine"
    later_cancer = condition("ca2", SNOMED, "254837009", onset="2026-06-05")
    assert assess([PATIENT, later_cancer, BACK_PAIN], NOW).urgency == "none"


def test_a_pain_condition_at_a_spinal_body_site_is_back_pain():
    pain = condition("pain", SNOMED, "22253000", onset="2026-05-20", text="Pain",
                     bodySite=[{"coding": [{"system": SNOMED, "code": "122496007", "display": "Lumbar spine"}]}])
    assert assess([PATIENT, CANCER, pain], NOW).urgency == "routine"
    knee = pain | {"bodySite": [{"coding": [{"system": SNOMED, "code": "72696002", "display": "Knee"}]}]}
    assert assess([PATIENT, CANCER, knee], NOW).urgency == "none"


def test_thoracic_spinal_pain_is_itself_back_pain():
    result = assess([PATIENT, CANCER, note("n", "T-spine pain for 3 weeks")], NOW)
    assert result.urgency == "urgent" and result.red_flags == ["thoracic-or-cervical-pain"] and result.back_pain


def test_a_qualifier_counts_only_when_it_describes_the_spinal_pain():
    # A pain with no site, written beside the patient's recorded back pain, is that pain.
    assert assess([PATIENT, CANCER, BACK_PAIN, note("n", "Pain worse on coughing")], NOW).urgency == "urgent"
    # Another symptom or site is not: NG234 Box 1 is about spinal pain.
    for text in ("Worsening breathlessness", "Hip pain at night", "Progressive disease on CT", "Cough productive of sputum"):
        assert assess([PATIENT, CANCER, BACK_PAIN, note("n", text)], NOW).urgency == "routine", text


def test_uncertain_mscc_raises_with_its_status_in_the_evidence_and_a_suspected_cancer_does_not_count():
    result = assess([PATIENT, CANCER, BACK_PAIN, note("n", "?CES - for MRI tonight")], NOW)
    assert result.urgency == "emergency" and result.evidence[0].status == "uncertain"
    suspected = condition("ca", "http://example.org/local", "X1", onset="2026-05-01", text="?breast ca")
    assert assess([PATIENT, suspected, BACK_PAIN], NOW).urgency == "none"
