"""The demo patients decide as their files say: one per tier, one that must stay quiet, and one whose
emergency is written only in a clinical note."""

import base64

from datetime import datetime, timezone

import pytest

from fhir_mappings.clinical.evaluate import EvaluationSettings, assess
from service.cli.demo.ehr import load_demo_patients

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=timezone.utc)


def test_one_demo_patient_per_tier_one_quiet_and_one_note_only():
    assert sorted(p.expected_tier for p in load_demo_patients(NOW)) == \
        ["emergency", "emergency", "none", "routine", "urgent"]


def test_the_note_patient_s_emergency_is_written_only_in_a_note():
    """Its new report is one DocumentReference with base64 text/plain content and nothing else: no
    coded finding, no Observation text. Until the core reads notes it evaluates as `none`."""
    (patient,) = [p for p in load_demo_patients(NOW) if p.key == "5-note-only"]
    (note,) = [e["resource"] for e in patient.report["entry"]]
    # written 24 h less 20 s before the demo loads it: its MRI clock's deadline falls within the run
    assert note["resourceType"] == "DocumentReference" and note["date"] == "2030-01-14T12:00:20Z"
    (content,) = note["content"]
    assert content["attachment"]["contentType"].startswith("text/plain")
    assert "BLE weakness" in base64.b64decode(content["attachment"]["data"]).decode()
    chart = [e["resource"]["resourceType"] for e in patient.chart["entry"]]
    assert chart == ["Patient", "Condition"]  # the cancer; no back pain, no neurology anywhere else


@pytest.mark.parametrize("patient", load_demo_patients(NOW), ids=lambda p: p.key)
def test_demo_patient_reaches_its_tier_only_with_its_new_report(patient):
    settings = EvaluationSettings(lookback_days=90)
    assert assess(patient.resources(), NOW, settings).urgency == patient.expected_tier
    chart_only = [e["resource"] for e in patient.chart["entry"]]
    assert assess(chart_only, NOW, settings).urgency == "none"  # the report is what changes the tier


def test_dates_are_relative_to_today():
    (emergency, *_) = load_demo_patients(NOW)
    report = [e["resource"] for e in emergency.report["entry"]]
    assert report[0]["onsetDateTime"] == "2030-01-05"
    assert "$DAYS_AGO" not in str(emergency.chart) + str(emergency.report)


def test_every_demo_patient_has_someone_to_alert():
    for p in load_demo_patients(NOW):
        patient = next(e["resource"] for e in p.chart["entry"] if e["resource"]["resourceType"] == "Patient")
        assert patient["generalPractitioner"], p.key


def test_the_mri_clocks_one_deadline_far_ahead_one_within_the_run():
    """The emergency patient's first Box 2 evidence is 2 h old (24 h deadline: 22 h left, the demo's
    MRI is in time); the note patient's is 20 s short of 24 h (it breaches during the run)."""
    from datetime import timedelta

    from fhir_mappings.cds.mri_clock import evidence_dates

    settings = EvaluationSettings(lookback_days=90)
    by_key = {p.key: p for p in load_demo_patients(NOW)}
    first = {key: min(evidence_dates(assess(by_key[key].resources(), NOW, settings))["emergency"])
             for key in ("1-emergency", "5-note-only")}
    assert first["1-emergency"] == NOW - timedelta(hours=2)
    assert first["5-note-only"] + timedelta(hours=24) == NOW + timedelta(seconds=20)
