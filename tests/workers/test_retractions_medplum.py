"""A retraction end to end through the Medplum 4.5.2 stand-in (tests/support/medplum.py): Medplum
delivers a delete as `{}` with X-Medplum-Interaction: delete and X-Medplum-Deleted-Resource to a
real `spinewatch serve`, whose intake queues the resolve task; the worker's steps then run here, as
a worker would run them, against the stand-in as the FHIR server (410 Gone for the deleted
resource, its history kept, conditional create of Communications)."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest
import redis

from service.core.settings import Settings
from service.infra.assessments import AssessmentStore
from service.infra.audit.store import AuditStore
from service.infra.audit.writer import AuditLog
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import QUEUE, WorkQueue
from tests.service.api.test_notifications_medplum import SIGNING_SECRET, TOKEN, served  # noqa: F401 fixture
from tests.support import cds_hooks as ch
from tests.support.medplum import SECRET_EXTENSION, medplum_standin  # noqa: F401 fixture
from workers import pipeline

pytestmark = pytest.mark.integration


def take_queued(r) -> list[tuple[str, dict]]:
    out = [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[1])
           for m in (json.loads(raw) for raw in reversed(r.lrange(QUEUE, 0, -1)))]
    r.delete(QUEUE)
    return out


@pytest.fixture
def world(served, medplum_standin, redis_url, tmp_path):
    """An emergency patient preloaded on the stand-in (nobody notified), an active `Observation?`
    Subscription to the served intake, and the worker's collaborators on the stand-in."""
    medplum_standin.preload(*ch.record("emergency", "p1"),
                            {"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/p1"},
                             "participant": [{"member": {"reference": "Practitioner/oncologist"}}]})
    medplum_standin.write({
        "resourceType": "Subscription", "status": "active", "reason": "SpineWatch", "criteria": "Observation?",
        "channel": {"type": "rest-hook", "endpoint": f"{served}/fhir/notifications",
                    "payload": "application/fhir+json", "header": [f"Authorization: Bearer {TOKEN}"]},
        "extension": [{"url": SECRET_EXTENSION, "valueString": SIGNING_SECRET}]})
    settings = Settings(environment="test", redis_url=redis_url, fhir_base_url=medplum_standin.base_url,
                        coalesce_seconds=0)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    store = AuditStore(f"sqlite:///{tmp_path}/worker-audit.sqlite")
    fhir = FHIRClient(medplum_standin.base_url)
    yield {"medplum": medplum_standin, "r": r, "store": store, "fhir": fhir,
           "d": pipeline.Collaborators(settings, fhir, WorkQueue(settings, r), AssessmentStore(r),
                                       AuditLog(settings, store=store), r)}
    fhir.close()
    store.dispose()
    r.close()


def deliver_delete(world, rtype: str, rid: str) -> dict:
    """Delete on the stand-in; Medplum's delivery reaches the intake, which queues the resolve task."""
    world["medplum"].delete(rtype, rid)
    world["medplum"].wait_for_deliveries()
    delivery = world["medplum"].deliveries[-1]
    assert delivery.headers["x-medplum-deleted-resource"] == f"{rtype}/{rid}" and delivery.status == 200
    (task, kwargs), = take_queued(world["r"])
    assert task == "spinewatch.resolve_focus"
    return kwargs


def test_a_delete_medplum_delivers_is_attributed_by_its_history(world):
    # Never evaluated: no stored assessment cites it, so only Medplum's history can say whose it was.
    kwargs = deliver_delete(world, "Observation", "neuro")
    assert pipeline.resolve_focus(world["d"], kwargs["focus"], kwargs["trigger"]) == ["Patient/p1"]
    (task, evaluation), = take_queued(world["r"])
    assert task == "spinewatch.evaluate_patient" and evaluation["patient"] == "Patient/p1"
    assert evaluation["trigger"]["interaction"] == "delete" and evaluation["trigger"]["deleted"] == ["Observation/neuro"]


def test_a_delete_medplum_delivers_drops_the_tier_and_follows_up_the_alert(world):
    d, fhir = world["d"], world["fhir"]
    assert pipeline.evaluate_patient(d, "Patient/p1", [], {"kind": "test"}, datetime.now(timezone.utc)).urgency == \
        "emergency"
    (alert,) = fhir.search_all("Communication", {"subject": "Patient/p1"})
    kwargs = deliver_delete(world, "Observation", "neuro")
    assert pipeline.resolve_focus(d, kwargs["focus"], kwargs["trigger"]) == ["Patient/p1"]
    (_, evaluation), = take_queued(world["r"])
    after = pipeline.evaluate_patient(d, evaluation["patient"], evaluation["focus"], evaluation["trigger"],
                                      datetime.now(timezone.utc))
    assert after.urgency == "routine"
    (follow_up,) = [c for c in fhir.search_all("Communication", {"subject": "Patient/p1"}) if c["id"] != alert["id"]]
    assert follow_up["inResponseTo"] == [{"reference": f"Communication/{alert['id']}"}]
    assert "since deleted on the server (Observation/neuro)" in follow_up["payload"][0]["contentString"]
    record = world["store"].query(kinds=["evaluation"])[0][0]
    assert record.detail["retracted"] == [{"reference": "Observation/neuro", "reason": "deleted on the server"}]
