"""CDS Hooks with a real Redis: a stored assessment written by the workers' AssessmentStore answers
a patient-view that has neither prefetch nor fhirServer (issue 3, "What to build" 3)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import redis

from fhir_mappings.clinical.evaluate import assess
from service.infra.assessments import AssessmentStore
from service.infra.assessments import default_source
from tests.support.cds_hooks import PATIENT_VIEW, hook_request, make_env, record, reset_audit, validate_cds_response

pytestmark = pytest.mark.integration


def test_stored_assessment_from_redis_answers_patient_view(tmp_path, redis_url):
    now = datetime.now(timezone.utc)
    store = AssessmentStore(redis.Redis.from_url(redis_url))
    store.save(assess(record("emergency", "p7"), now - timedelta(minutes=2)).to_json() | {"patient": "Patient/p7"},
               stored_at=now - timedelta(minutes=2))
    store.save(assess(record("urgent", "p8"), now - timedelta(hours=3)).to_json() | {"patient": "Patient/p8"},
               stored_at=now - timedelta(hours=3))
    env = make_env(tmp_path, redis_url=redis_url, stored_assessment_max_age_seconds=3600)
    # make_env leaves the stored source out; put back what register() builds from SPINEWATCH_REDIS_URL.
    env.app.state.services.hooks.stored = default_source(env.app.state.services.settings)
    try:
        response = env.call(PATIENT_VIEW, hook_request("patient-view", "p7"))
        assert response.status_code == 200, response.text
        [card] = validate_cds_response(response.json())
        assert card["indicator"] == "critical"
        assert card["suggestions"][0]["actions"][0]["resource"]["subject"] == {"reference": "Patient/p7"}
        too_old = env.call(PATIENT_VIEW, hook_request("patient-view", "p8"))
        assert too_old.status_code == 412
        unknown = env.call(PATIENT_VIEW, hook_request("patient-view", "p9"))
        assert unknown.status_code == 412
    finally:
        reset_audit()
