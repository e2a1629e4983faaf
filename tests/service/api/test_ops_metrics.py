"""/metrics counts a notification that really went through POST /fhir/notifications (real Redis)."""

import re

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.settings import Settings

pytestmark = pytest.mark.integration
TOKEN = "metrics-test-secret"


def counts(text: str) -> dict[tuple[str, str], float]:
    pattern = r'^spinewatch_notifications_total\{kind="([^"]+)",outcome="([^"]+)"\} (\S+)$'
    return {(k, o): float(v) for k, o, v in re.findall(pattern, text, re.M)}


def test_metrics_counts_a_notification_by_kind_and_outcome(redis_url, tmp_path):
    settings = Settings(environment="test", redis_url=redis_url, notification_token=TOKEN,
                        audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")
    with TestClient(create_app(settings)) as client:
        before = counts(client.get("/metrics").text)
        condition = {"resourceType": "Condition", "id": "c-metrics", "subject": {"reference": "Patient/p-metrics"},
                     "code": {"text": "Low back pain"}, "meta": {"versionId": "1"}}
        r = client.put("/fhir/notifications/Condition/c-metrics", json=condition,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"})
        assert r.status_code == 200, r.text
        refused = client.post("/fhir/notifications", headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401
        after_text = client.get("/metrics").text
    after = counts(after_text)
    changed = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    assert changed == {("rest-hook", "queued"): 1.0, ("unknown", "unauthorized"): 1.0}
    # read from Redis at scrape time: the queued evaluation waits there (no worker in this test)
    depth = re.search(r'^spinewatch_queue_depth\{queue="celery"\} (\S+)$', after_text, re.M)
    assert depth and float(depth.group(1)) >= 1
