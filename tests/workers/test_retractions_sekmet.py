"""Retractions on real parts: sekmet-fhir 0.1.1 deletes (200; a read after answers 410) and keeps
instance history with the delete as its newest entry (FHIR R4 §3.1.0.10), and a real Redis. sekmet
notifies no deletes (docs/sekmet.md), so the test hands the delete to resolve_focus as the intake
does for Medplum's delete notification, then runs the evaluation that was queued.

Shown: the patient of a deleted Condition is learnt from sekmet's history (the stored-assessment
index emptied first), the tier drops, and the follow-up Communication lands on sekmet once,
inResponseTo the alert; a cancer marked entered-in-error on sekmet does the same."""

from __future__ import annotations

import base64
import json
import uuid
from functools import partial
from datetime import datetime, timedelta, timezone

import pytest

from service.core.settings import Settings
from service.infra.assessments import CITES_PREFIX, AssessmentStore
from service.infra.audit.store import AuditStore
from service.infra.audit.writer import AuditLog
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import QUEUE, WorkQueue, redis_client
from service.infra.redis import redis_client as bytes_redis_client
from tests.support.sekmet_server import create as create_on
from workers import pipeline

pytestmark = pytest.mark.integration

CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFIED = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


def iso(days_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days_ago)).isoformat()


def condition(pid: str, system: str, code: str, display: str, onset: str, status: str = "active") -> dict:
    return {"resourceType": "Condition", "clinicalStatus": {"coding": [{"system": CLINICAL, "code": status}]},
            "verificationStatus": {"coding": [{"system": VERIFIED, "code": "confirmed"}]},
            "code": {"coding": [{"system": system, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{pid}"}, "onsetDateTime": onset}


@pytest.fixture
def world(sekmet_server, redis_url, tmp_path):
    """An urgent patient on sekmet (breast cancer in remission, thoracic back pain) with a CareTeam."""
    store = AuditStore(f"sqlite:///{tmp_path}/audit.sqlite")
    with sekmet_server.client() as c:
        create = partial(create_on, c)
        pid = create({"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": uuid.uuid4().hex}]})["id"]
        cancer = create(condition(pid, "http://snomed.info/sct", "254837009", "Malignant neoplasm of breast", iso(800),
                                  status="remission"))
        pain = create(condition(pid, "http://hl7.org/fhir/sid/icd-10-cm", "M54.6", "Pain in thoracic spine", iso(10)))
        create({"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{pid}"},
                "participant": [{"member": {"reference": "Practitioner/oncologist"}}]})
    settings = Settings(environment="test", fhir_base_url=sekmet_server.base_url, redis_url=redis_url,
                        coalesce_seconds=0)
    conn = redis_client(redis_url, timeout=5)
    d = pipeline.Collaborators(settings, FHIRClient.from_settings(settings), WorkQueue(settings, conn),
                               AssessmentStore(conn), AuditLog(settings, store=store), bytes_redis_client(redis_url, 5.0))
    yield {"patient": f"Patient/{pid}", "d": d, "store": store, "server": sekmet_server, "conn": conn,
           "cancer": cancer, "pain": pain}
    d.fhir.close()
    d.alert_redis.close()
    store.dispose()


def communications(world) -> list[dict]:
    with world["server"].client() as c:
        bundle = c.get("/Communication", params={"subject": world["patient"], "_count": "100"}).json()
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def run_queued(world) -> list:
    conn, d = world["conn"], world["d"]
    kwargs = [json.loads(base64.b64decode(json.loads(raw)["body"]))[1] for raw in reversed(conn.lrange(QUEUE, 0, -1))]
    conn.delete(QUEUE)
    return [pipeline.evaluate_patient(d, k["patient"], k["focus"], k["trigger"], datetime.now(timezone.utc))
            for k in kwargs]


def test_a_condition_deleted_on_sekmet_is_attributed_by_its_history_and_followed_up_once(world):
    d, patient = world["d"], world["patient"]
    assert pipeline.evaluate_patient(d, patient, [], {"kind": "test"}, datetime.now(timezone.utc)).urgency == "urgent"
    (alert,) = communications(world)
    pain = f"Condition/{world['pain']['id']}"
    with world["server"].client() as c:
        assert c.delete(f"/{pain}").status_code in (200, 204)
        assert c.get(f"/{pain}").status_code == 410
    assert world["conn"].delete(CITES_PREFIX + pain) == 1  # only the server's history can say whose it was now

    trigger = {"kind": "rest-hook", "interaction": "delete", "deleted": [pain]}
    assert pipeline.resolve_focus(d, [pain], trigger) == [patient]
    (after,) = run_queued(world)
    assert after.urgency == "none"

    follow_up = next(c for c in communications(world) if c["id"] != alert["id"])
    assert follow_up["inResponseTo"] == [{"reference": f"Communication/{alert['id']}"}]
    assert follow_up["priority"] == "routine"
    assert f"since deleted on the server ({pain})" in follow_up["payload"][0]["contentString"]
    evaluation = world["store"].query(kinds=["evaluation"])[0][0]
    assert evaluation.detail["retracted"] == [{"reference": pain, "reason": "deleted on the server"}]
    assert evaluation.detail["previous_tier"] == "urgent"

    # Delivered again (Medplum retries a delivery it thinks failed): still one follow-up.
    assert pipeline.resolve_focus(d, [pain], trigger) == [patient]
    run_queued(world)
    assert len(communications(world)) == 2
    assert world["store"].verify().ok


def test_a_cancer_marked_entered_in_error_on_sekmet_is_followed_up(world):
    d, patient = world["d"], world["patient"]
    pipeline.evaluate_patient(d, patient, [], {"kind": "test"}, datetime.now(timezone.utc))
    cancer = dict(world["cancer"])
    cancer["verificationStatus"] = {"coding": [{"system": VERIFIED, "code": "entered-in-error"}]}
    with world["server"].client() as c:
        assert c.put(f"/Condition/{cancer['id']}", json=cancer).status_code == 200
    ref = f"Condition/{cancer['id']}"
    after = pipeline.evaluate_patient(d, patient, [ref], {"kind": "rest-hook"}, datetime.now(timezone.utc))
    assert after.urgency == "none"  # no known cancer: not in scope
    follow_up = next(c for c in communications(world) if "inResponseTo" in c)
    assert f"since marked entered-in-error ({ref})" in follow_up["payload"][0]["contentString"]
    (retraction,) = world["store"].query(kinds=["alert-retraction"])[0]
    assert retraction.detail["retracted"] == [{"reference": ref, "reason": "entered-in-error"}]
