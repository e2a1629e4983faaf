"""The demo patients decide as their files say: one per tier, and one that must stay quiet."""

from datetime import datetime, timezone

import pytest

from fhir_mappings.evaluate import EvaluationSettings, assess
from service.demo import load_demo_patients

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=timezone.utc)


def test_one_demo_patient_per_tier_and_one_quiet():
    assert sorted(p.expected_tier for p in load_demo_patients(NOW)) == ["emergency", "none", "routine", "urgent"]


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
