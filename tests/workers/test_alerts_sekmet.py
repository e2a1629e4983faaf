"""Care-team alerts end to end on real parts: the workers' pipeline evaluates a patient on a real FHIR
server (sekmet), stores the assessment and alerts through a real Redis; the Communication lands on
the server once per patient-tier-evidence (re-evaluations, duplicate notifications and retries
included), an upgrade alerts again, the webhook receiver can verify the signature, and an alert
that cannot be delivered ends in the dead-letter list through the Celery task."""

from __future__ import annotations

import json
import threading
import uuid
from functools import partial
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fhir_mappings.cds.alerts import ALERT_ID_SYSTEM, SIGNATURE_HEADER, verify_signature
from service.infra.assessments import AssessmentStore
from service.infra.audit.store import AuditStore
from service.infra.audit.writer import AuditLog
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import WorkQueue, redis_client
from service.core.settings import Settings
from service.infra.redis import redis_client as bytes_redis_client
from tests.support.sekmet_server import create as create_on
from workers import pipeline

pytestmark = pytest.mark.integration

SECRET = "webhook-test-secret"
NOW = datetime.now(timezone.utc)


class Webhook:
    def __init__(self):
        self.requests: list[tuple[dict, bytes]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def iso(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).isoformat()


CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFIED = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


def condition(patient_id, code_system, code, display, onset, status="active", text=None):
    c = {"resourceType": "Condition",
         "clinicalStatus": {"coding": [{"system": CLINICAL, "code": status}]},
         "verificationStatus": {"coding": [{"system": VERIFIED, "code": "confirmed"}]},
         "code": {"coding": [{"system": code_system, "code": code, "display": display}]},
         "subject": {"reference": f"Patient/{patient_id}"}, "onsetDateTime": onset}
    if text:
        c["code"]["text"] = text
    return c


@pytest.fixture
def fhir_server(sekmet_server):
    return sekmet_server


@pytest.fixture
def world(fhir_server, redis_url, tmp_path):
    """A patient with cancer and thoracic back pain (urgent), a CareTeam, and another patient's
    CareTeam that must never be alerted."""
    hook = Webhook()
    store = AuditStore(f"sqlite:///{tmp_path}/audit.sqlite")
    with fhir_server.client() as c:
        create = partial(create_on, c)
        patient = create({"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": uuid.uuid4().hex}],
                          "generalPractitioner": [{"reference": "Practitioner/gp-should-not-be-used"}]})
        pid = patient["id"]
        create(condition(pid, "http://snomed.info/sct", "254837009", "Malignant neoplasm of breast", iso(800),
                         status="remission"))
        create(condition(pid, "http://hl7.org/fhir/sid/icd-10-cm", "M54.6", "Pain in thoracic spine", iso(10)))
        create({"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{pid}"},
                "participant": [{"member": {"reference": "Practitioner/oncologist"}},
                                {"member": {"reference": "Organization/acute-oncology"}}]})
        create({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/other"},
                "participant": [{"member": {"reference": "Practitioner/not-ours"}}]})
    settings = Settings(environment="test", fhir_base_url=fhir_server.base_url, redis_url=redis_url,
                        alert_webhook_url=hook.url, alert_webhook_secret=SECRET, task_max_retries=0)
    conn = redis_client(redis_url, timeout=5)
    d = pipeline.Collaborators(settings, FHIRClient.from_settings(settings), WorkQueue(settings, conn),
                               AssessmentStore(conn), AuditLog(settings, store=store),
                               bytes_redis_client(redis_url, 5.0))
    yield {"pid": pid, "patient": f"Patient/{pid}", "d": d, "hook": hook, "store": store, "create": create,
           "server": fhir_server, "settings": settings}
    d.fhir.close()
    hook.close()
    d.alert_redis.close()
    store.dispose()


def communications(server, patient: str) -> list[dict]:
    with server.client() as c:
        bundle = c.get("/Communication", params={"subject": patient, "_count": "100"}).json()
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def evaluate(world, now=None):
    return pipeline.evaluate_patient(world["d"], world["patient"], [], {"kind": "test"}, now or NOW)


def test_alerted_once_then_again_on_upgrade(world):
    first = evaluate(world)
    assert first.urgency == "urgent"
    again = evaluate(world, NOW + timedelta(minutes=1))  # a duplicate notification: same evidence
    assert again.urgency == "urgent"
    sent = communications(world["server"], world["patient"])
    assert len(sent) == 1
    comm = sent[0]
    assert comm["priority"] == "urgent" and comm["category"][0]["coding"][0]["code"] == "alert"
    assert [r["reference"] for r in comm["recipient"]] == ["Practitioner/oncologist", "Organization/acute-oncology"]
    assert comm["identifier"][0]["system"] == ALERT_ID_SYSTEM

    # The webhook got it once, signed.
    assert len(world["hook"].requests) == 1
    headers, body = world["hook"].requests[0]
    assert verify_signature(body, SECRET, headers[SIGNATURE_HEADER.lower()])
    assert json.loads(body)["communication"] == f"Communication/{comm['id']}"

    # New leg weakness: emergency, a new alert at priority stat.
    with world["server"].client() as c:
        r = c.post("/Observation", json={"resourceType": "Observation", "status": "final",
                                         "code": {"text": "Neurological examination"},
                                         "subject": {"reference": world["patient"]}, "effectiveDateTime": iso(0.1),
                                         "valueString": "New bilateral leg weakness since yesterday."})
        assert r.status_code == 201
    upgraded = evaluate(world, NOW + timedelta(minutes=2))
    assert upgraded.urgency == "emergency"
    sent = communications(world["server"], world["patient"])
    assert sorted(c["priority"] for c in sent) == ["stat", "urgent"]
    assert len(world["hook"].requests) == 2

    alerts, _ = world["store"].query(kinds=["alert"], newest_first=False)
    assert [(a.outcome, a.detail["tier"]) for a in alerts] == [("success", "urgent"), ("success", "emergency")]
    assert world["store"].verify().ok


def test_a_retry_after_the_redis_record_is_lost_writes_no_second_communication(world):
    evaluate(world)
    # Worst case: Redis forgot the alert (flushed). The conditional create still finds the first.
    redis = world["d"].queue.redis
    for key in redis.scan_iter("spinewatch:alert:*"):
        redis.delete(key)
    evaluate(world, NOW + timedelta(minutes=1))
    assert len(communications(world["server"], world["patient"])) == 1


def test_an_undeliverable_alert_is_dead_lettered_through_the_task(world):
    from service.infra.dead_letters import DeadLetters
    from workers import tasks
    from workers.celery_app import create_celery_app

    # No CareTeam, no generalPractitioner, no default: nobody to tell.
    with world["server"].client() as c:
        r = c.post("/Patient", json={"resourceType": "Patient"})
        pid = r.json()["id"]
        for res in (condition(pid, "http://snomed.info/sct", "254837009", "Malignant neoplasm of breast", iso(800),
                              status="remission"),
                    condition(pid, "http://hl7.org/fhir/sid/icd-10-cm", "M54.6", "Pain in thoracic spine", iso(5))):
            assert c.post("/Condition", json=res).status_code == 201
    app = create_celery_app(world["settings"])
    app.use_collaborators(world["d"])
    result = app.tasks[tasks.evaluate_patient.name].apply(kwargs={"patient": f"Patient/{pid}"})
    assert result.failed()
    letters = DeadLetters(world["d"].queue.redis).entries()
    assert [(x["task"], x["error"], x["kwargs"]["patient"]) for x in letters] == [
        (tasks.evaluate_patient.name, "AlertFailed", f"Patient/{pid}")]
    failures, _ = world["store"].query(kinds=["alert"], outcome="failure")
    assert failures and failures[0].patient == f"Patient/{pid}"
    assert communications(world["server"], f"Patient/{pid}") == []
