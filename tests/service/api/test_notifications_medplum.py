"""Medplum 4.5.2's rest-hook conventions through the real app and a real redis-server: the
Subscription named only in X-Medplum-Subscription (trigger, audit record, the watchdog's ledger),
X-Signature (HMAC-SHA256 of the exact body bytes), concurrent deliveries for one patient, and, at
the end, the Medplum stand-in (tests/support/medplum.py) delivering to a real `spinewatch serve`."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.metrics import AUTH_FAILURES
from service.core.settings import Settings
from service.infra.queue import WorkQueue
from tests.support.medplum import SECRET_EXTENSION, medplum_standin  # noqa: F401 fixture
from tests.service.api.test_notifications import (AUTH, TOKEN, app, audits, client, queued, r,  # noqa: F401 fixtures
                                                  settings)

SUB_ID = "8cb7d041-5805-4ed0-9e3a-d81f7d906ada"
SUBSCRIPTION = f"Subscription/{SUB_ID}"
TRACE = "14b9cebc-7a0f-48a6-869f-cfe2fee9858d"
SIGNING_SECRET = "medplum-subscription-secret-0123"


def condition(cid: str = "c1", patient: str = "Patient/p1") -> dict:
    """As Medplum delivers it: the resource at the version written, a UUID versionId."""
    return {"resourceType": "Condition", "id": cid,
            "meta": {"versionId": str(uuid.uuid4()), "lastUpdated": "2026-12-01T10:00:00.000Z",
                     "project": str(uuid.uuid4())},
            "subject": {"reference": patient}, "code": {"text": "low back pain"}}


def medplum(interaction: str = "create", subscription: str = SUB_ID, **extra) -> dict[str, str]:
    return AUTH | {"Content-Type": "application/fhir+json", "X-Medplum-Subscription": subscription,
                   "X-Medplum-Interaction": interaction, "x-trace-id": TRACE} | extra


def compact(resource: dict) -> bytes:
    return json.dumps(resource, separators=(",", ":")).encode()


def recent(instant: str | None) -> bool:
    return instant is not None and \
        abs(datetime.now(timezone.utc) - datetime.fromisoformat(instant)) < timedelta(seconds=30)


# ---------------- the Subscription from the header ----------------

def test_the_subscription_header_reaches_the_trigger_and_the_audit_record(client, r, audits):
    response = client.post("/fhir/notifications", content=compact(condition()), headers=medplum())
    assert response.status_code == 200, response.text
    (task,) = queued(r)
    assert task["kwargs"]["trigger"]["subscription"] == SUBSCRIPTION
    assert "interaction" not in task["kwargs"]["trigger"]  # only deletes say so to the worker
    (record,) = [a for a in audits if a["kind"] == "notification"]
    assert record["actor"] == SUBSCRIPTION and record["patient"] == "Patient/p1"
    assert record["detail"] == {"kind": "rest-hook", "events": [], "focus": ["Condition/c1"], "outcome": "queued",
                                "interaction": "create", "trace": TRACE}


def test_a_bad_subscription_header_is_ignored_with_a_warning_never_refused(client, r, audits):
    response = client.post("/fhir/notifications", content=compact(condition()),
                           headers=medplum(subscription="../../etc"))
    assert response.status_code == 200, response.text
    (task,) = queued(r)
    assert task["kwargs"]["trigger"]["subscription"] is None
    record = audits[-1]
    assert record["actor"] == "rest-hook"
    assert record["detail"]["warnings"] == ["X-Medplum-Subscription header ignored (not a valid value)"]
    assert "../../etc" not in json.dumps(record)


def test_a_tracked_classic_subscription_is_marked_heard_from_as_classic(client, r, settings):
    queue = WorkQueue(settings)
    queue.track_subscription(SUBSCRIPTION, kind="classic", status="active")
    queue.set_subscription_fields(SUBSCRIPTION, last_seen_at="2000-01-01T00:00:00+00:00")
    assert client.post("/fhir/notifications", content=compact(condition()), headers=medplum()).status_code == 200
    state = queue.subscription_state(SUBSCRIPTION)
    assert recent(state.last_seen_at)
    assert (state.kind, state.status, state.highest) == ("classic", "active", None)  # not filed as backport
    assert queue.tracked_subscriptions() == [SUBSCRIPTION]


def test_an_untracked_subscription_leaves_no_ledger_entry(client, r):
    assert client.post("/fhir/notifications", content=compact(condition()), headers=medplum()).status_code == 200
    assert r.exists(f"spinewatch:subscription:{SUBSCRIPTION}") == 0
    assert r.smembers("spinewatch:subscriptions") == set()


class _NoReads:
    """The FHIR server the watchdog would ask about a silent Subscription."""

    def __init__(self):
        self.reads = []

    def read(self, rtype, rid):
        self.reads.append(f"{rtype}/{rid}")
        return {"resourceType": rtype, "id": rid, "status": "active"}


def test_the_watchdog_leaves_a_classic_subscription_alone_once_it_is_heard_from(client, settings):
    from workers.pipeline.collaborators import Collaborators
    from workers.pipeline.sweeps import watchdog

    queue = WorkQueue(settings)
    queue.track_subscription(SUBSCRIPTION, kind="classic", status="active")
    fhir = _NoReads()
    collaborators = Collaborators(settings=settings, fhir=fhir, queue=queue, store=None, audit=None, alert_redis=None)
    in_a_minute = datetime.now(timezone.utc) + timedelta(seconds=60)
    long_ago = "2000-01-01T00:00:00+00:00"
    queue.set_subscription_fields(SUBSCRIPTION, last_seen_at=long_ago)
    watchdog(collaborators, in_a_minute)
    assert fhir.reads == [SUBSCRIPTION]  # silent for longer than the limit: read
    queue.set_subscription_fields(SUBSCRIPTION, last_seen_at=long_ago)  # silent again
    assert client.post("/fhir/notifications", content=compact(condition()), headers=medplum()).status_code == 200
    watchdog(collaborators, in_a_minute)
    assert fhir.reads == [SUBSCRIPTION]  # heard from a minute before: not read again


# ---------------- X-Signature ----------------

@pytest.fixture
def signed(redis_url, tmp_path):
    settings = Settings(environment="test", redis_url=redis_url, notification_token=TOKEN,
                        notification_signature_secret=SIGNING_SECRET, audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")
    with TestClient(create_app(settings)) as client:
        yield client


def signature(body: bytes, secret: str = SIGNING_SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def refusals(reason: str) -> float:
    return AUTH_FAILURES.labels(surface="notifications", reason=reason)._value.get()


def test_a_correctly_signed_notification_and_delete_are_accepted(signed, r):
    body = compact(condition())
    assert signed.post("/fhir/notifications", content=body,
                       headers=medplum() | {"X-Signature": signature(body)}).status_code == 200
    delete = medplum("delete") | {"X-Medplum-Deleted-Resource": "Condition/c1", "X-Signature": signature(b"{}")}
    assert signed.post("/fhir/notifications", content=b"{}", headers=delete).status_code == 200
    assert signed.delete("/fhir/notifications/Condition/c2", headers=AUTH | {"X-Signature": signature(b"")}).status_code == 200
    assert [t["task"] for t in queued(r)] == ["spinewatch.evaluate_patient", "spinewatch.resolve_focus",
                                              "spinewatch.resolve_focus"]


@pytest.mark.parametrize("case, reason", [("missing", "signature-missing"), ("wrong secret", "signature-mismatch"),
                                          ("other bytes", "signature-mismatch"), ("truncated", "signature-mismatch")])
def test_a_missing_or_wrong_signature_is_a_bare_401_and_nothing_happens(signed, r, case, reason):
    body = compact(condition())
    headers = medplum() | {
        "missing": {},
        "wrong secret": {"X-Signature": signature(body, "another-secret")},
        # the same resource serialised with spaces: the signature is over the exact bytes received
        "other bytes": {"X-Signature": signature(json.dumps(condition()).encode())},
        "truncated": {"X-Signature": signature(body)[:32]},
    }[case]
    before = refusals(reason)
    response = signed.post("/fhir/notifications", content=body, headers=headers)
    assert response.status_code == 401 and response.json() == {}
    assert refusals(reason) == before + 1
    assert r.keys("*") == []


def test_the_bearer_secret_is_still_checked_when_the_signature_is_right(signed, r):
    body = compact(condition())
    headers = medplum() | {"Authorization": "Bearer wrong", "X-Signature": signature(body)}
    before = refusals("mismatch")
    assert signed.post("/fhir/notifications", content=body, headers=headers).status_code == 401
    assert refusals("mismatch") == before + 1 and r.keys("*") == []


def test_without_a_signing_secret_no_signature_is_asked_for(client, r):
    assert client.post("/fhir/notifications", content=compact(condition()), headers=medplum()).status_code == 200


# ---------------- concurrent deliveries for one patient ----------------

def test_concurrent_medplum_deliveries_for_one_patient_give_one_evaluation(client, r):
    """Medplum runs each Subscription's delivery as its own job: a Condition and an Observation
    for one patient may arrive within a millisecond. Both are answered 200, one evaluation is
    queued per patient and it carries both references."""
    pairs, statuses = 25, []
    for i in range(pairs):
        patient = f"Patient/p{i}"
        bodies = [compact(condition(f"c{i}", patient)),
                  compact({"resourceType": "Observation", "id": f"o{i}", "meta": {"versionId": str(uuid.uuid4())},
                           "status": "final", "code": {"text": "pain"}, "subject": {"reference": patient}})]
        barrier = threading.Barrier(2)

        def deliver(body: bytes, sub: str):
            barrier.wait()
            statuses.append(client.post("/fhir/notifications", content=body,
                                        headers=medplum(subscription=sub)).status_code)

        threads = [threading.Thread(target=deliver, args=(body, str(uuid.uuid4()))) for body in bodies]
        [t.start() for t in threads]
        [t.join(20) for t in threads]
    assert statuses == [200] * (2 * pairs)
    evaluations = [t["kwargs"]["patient"] for t in queued(r) if t["task"] == "spinewatch.evaluate_patient"]
    assert sorted(evaluations) == sorted(f"Patient/p{i}" for i in range(pairs))
    for i in range(pairs):
        assert r.smembers(f"spinewatch:pending-focus:Patient/p{i}") == {f"Condition/c{i}", f"Observation/o{i}"}


# ---------------- the Medplum stand-in and a real `spinewatch serve` ----------------

@pytest.fixture
def served(redis_url, tmp_path):
    from tests.support.processes import SPINEWATCH, Proc, http_up
    from tests.support.redis_server import free_port

    base = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
        "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": redis_url, "SPINEWATCH_NOTIFICATION_TOKEN": TOKEN,
        "SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET": SIGNING_SECRET, "SPINEWATCH_PUBLIC_BASE_URL": base,
        "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp_path}/audit.sqlite", "PYTHONUNBUFFERED": "1"}
    api = Proc([*SPINEWATCH, "serve", "--port", base.rsplit(":", 1)[1]], env, tmp_path / "api.log",
               lambda: http_up(f"{base}/healthz"), "spinewatch serve")
    try:
        yield base
    finally:
        api.stop()


@pytest.mark.integration
def test_the_medplum_stand_in_delivers_a_create_and_a_delete_each_answered_2xx_once(served, medplum_standin, redis_url):
    medplum_standin.write({
        "resourceType": "Subscription", "status": "active", "reason": "SpineWatch", "criteria": "Condition?",
        "channel": {"type": "rest-hook", "endpoint": f"{served}/fhir/notifications",
                    "payload": "application/fhir+json", "header": [f"Authorization: Bearer {TOKEN}"]},
        "extension": [{"url": SECRET_EXTENSION, "valueString": SIGNING_SECRET}]})
    created = medplum_standin.write({"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
                                     "code": {"text": "low back pain"}})
    medplum_standin.wait_for_deliveries()
    medplum_standin.delete("Condition", created["id"])
    medplum_standin.wait_for_deliveries()
    assert [(d.interaction, d.attempt, d.status) for d in medplum_standin.deliveries] == [
        ("create", 0, 200), ("delete", 0, 200)]  # no retries: each was answered 2xx the first time
    tasks = {t["task"]: t["kwargs"] for t in queued(redis.Redis.from_url(redis_url, decode_responses=True))}
    subscription = f"Subscription/{medplum_standin.deliveries[0].subscription_id}"
    assert tasks["spinewatch.evaluate_patient"]["patient"] == "Patient/p1"
    assert tasks["spinewatch.evaluate_patient"]["trigger"]["subscription"] == subscription
    deleted = tasks["spinewatch.resolve_focus"]
    assert deleted["focus"] == [f"Condition/{created['id']}"]
    assert {k: deleted["trigger"][k] for k in ("subscription", "interaction", "deleted")} == {
        "subscription": subscription, "interaction": "delete", "deleted": [f"Condition/{created['id']}"]}
