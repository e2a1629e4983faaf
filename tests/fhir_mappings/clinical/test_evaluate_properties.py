"""Properties of the evaluation that must hold for any record (hypothesis)."""

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_mappings.clinical.evaluate import TIERS, assess

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
RANK = {tier: i for i, tier in enumerate(reversed(TIERS))}  # none < routine < urgent < emergency

codes = st.sampled_from([
    ("http://snomed.info/sct", "254837009"), ("http://snomed.info/sct", "279039007"),
    ("http://hl7.org/fhir/sid/icd-10-cm", "M54.16"), ("http://hl7.org/fhir/sid/icd-10-cm", "C79.51"),
    ("http://hl7.org/fhir/sid/icd-10-cm", "R33.9"), ("http://hl7.org/fhir/sid/icd-10-cm", "C44.91"),
    ("http://snomed.info/sct", "126906006"), ("http://loinc.org", "72514-3"), ("urn:other", "x"),
])
statuses = st.sampled_from(["active", "resolved", "inactive", "remission", "recurrence"])
verifications = st.sampled_from(["confirmed", "unconfirmed", "provisional", "refuted", "entered-in-error"])
texts = st.sampled_from(["", "night pain", "denies night pain", "leg weakness", "no leg weakness",
                         "lung cancer", "suspected cancer", "low back pain", "band-like pain"])
days = st.integers(min_value=-2000, max_value=5)


@st.composite
def condition(draw, index):
    system, code = draw(codes)
    res = {"resourceType": "Condition", "id": f"c{index}", "subject": {"reference": "Patient/p"},
           "code": {"coding": [{"system": system, "code": code}]},
           "clinicalStatus": {"coding": [{"code": draw(statuses)}]},
           "verificationStatus": {"coding": [{"code": draw(verifications)}]}}
    if draw(st.booleans()):
        res["onsetDateTime"] = (NOW + timedelta(days=draw(days))).date().isoformat()
    text = draw(texts)
    if text:
        res["code"]["text"] = text
    return res


@st.composite
def record(draw):
    n = draw(st.integers(min_value=0, max_value=6))
    return [{"resourceType": "Patient", "id": "p"}] + [draw(condition(i)) for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(record())
def test_any_record_gets_a_tier_and_never_raises(resources):
    result = assess(resources, NOW)
    assert result.urgency in TIERS
    assert (result.urgency == "none") or (result.cancers and result.in_scope)


@settings(max_examples=150, deadline=None)
@given(record())
def test_a_new_cord_compression_finding_never_lowers_the_tier(resources):
    before = assess(resources, NOW).urgency
    finding = {"resourceType": "Condition", "id": "mscc", "subject": {"reference": "Patient/p"},
               "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G95.20"}]},
               "clinicalStatus": {"coding": [{"code": "active"}]}, "onsetDateTime": "2026-05-31"}
    after = assess(resources + [finding], NOW)
    assert RANK[after.urgency] >= RANK[before]
    if after.cancers:
        assert after.urgency == "emergency"
