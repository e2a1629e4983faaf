"""POST /fhir/notifications and PUT|POST /fhir/notifications/{type}/{id} through the real app and a
real redis-server (no worker here: what the endpoint queued is read back from the Celery list)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.metrics import AUTH_FAILURES
from service.infra.queue import GAP_GRACE_SECONDS, QUEUE, QueueUnavailable
from service.core.settings import Settings
from tests.support.paths import SHARED

SUBS = SHARED / "data" / "subscriptions"
TOKEN = "test-notification-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(redis_url, tmp_path) -> Settings:
    return Settings(environment="test", redis_url=redis_url, notification_token=TOKEN, coalesce_seconds=0.5,
                    audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def audits(app, monkeypatch):
    seen = []
    monkeypatch.setattr(app.state.services.audit, "event",
                        lambda kind, outcome, **kw: seen.append({"kind": kind, "outcome": outcome, **kw}))
    return seen


def queued(r) -> list[dict]:
    """Tasks on the Celery queue, oldest first: name, kwargs and whether it waits (eta)."""
    out = []
    for raw in reversed(r.lrange(QUEUE, 0, -1)):  # kombu LPUSHes, the worker BRPOPs
        message = json.loads(raw)
        headers = message["headers"]
        out.append({"task": headers["task"], "eta": headers.get("eta"), "kwargs": _kwargs(message)})
    return out


def _kwargs(message: dict) -> dict:
    import base64

    body = json.loads(base64.b64decode(message["body"]))
    return body[1]


def shared(name: str) -> str:
    path = SUBS / name
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path.read_text()


def params(kind: str, sub: str = "Subscription/s1", since: int | None = None, events=(), status="active") -> dict:
    p = [{"name": "subscription", "valueReference": {"reference": f"http://ehr/fhir/{sub}"}},
         {"name": "status", "valueCode": status}, {"name": "type", "valueCode": kind}]
    if since is not None:
        p.append({"name": "events-since-subscription-start", "valueString": str(since)})
    for number, focus, patient in events:
        parts = [{"name": "event-number", "valueString": str(number)}]
        if focus:
            parts.append({"name": "focus", "valueReference": {"reference": f"http://ehr/fhir/{focus}"}})
        if patient:
            parts.append({"name": "additional-context", "valueReference": {"reference": f"http://ehr/fhir/{patient}"}})
        p.append({"name": "notification-event", "part": parts})
    return {"resourceType": "Bundle", "type": "history",
            "entry": [{"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": p},
                       "request": {"method": "GET", "url": f"{sub}/$status"}, "response": {"status": "200"}}]}


def event(number: int, focus: str | None = "Condition/c1", patient: str | None = "Patient/p1", sub="Subscription/s1"):
    return params("event-notification", sub, number, [(number, focus, patient)])


def post(client, body, headers=AUTH):
    return client.post("/fhir/notifications", content=json.dumps(body) if not isinstance(body, str) else body,
                       headers=headers | {"Content-Type": "application/fhir+json"})


# ---------------- authentication ----------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_notifier_without_the_secret_gets_a_bare_401_and_nothing_happens(client, r, headers):
    before = AUTH_FAILURES.labels(surface="notifications", reason="mismatch")._value.get() + \
        AUTH_FAILURES.labels(surface="notifications", reason="missing")._value.get()
    response = post(client, event(1), headers=headers)
    assert response.status_code == 401 and response.json() == {}
    assert r.keys("*") == []  # authenticated before anything else
    after = AUTH_FAILURES.labels(surface="notifications", reason="mismatch")._value.get() + \
        AUTH_FAILURES.labels(surface="notifications", reason="missing")._value.get()
    assert after == before + 1


def test_rest_hook_route_is_authenticated_too(client, r):
    assert client.put("/fhir/notifications/Condition/c1", json={"resourceType": "Condition", "id": "c1"}).status_code == 401
    assert r.keys("*") == []


def test_bearer_scheme_is_case_insensitive(client):
    assert post(client, event(1), headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


# ---------------- control traffic ----------------

def test_handshake_and_heartbeat_are_recorded_not_evaluated(client, r, audits):
    response = post(client, params("handshake", since=0, status="requested"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json()["issue"][0]["severity"] == "information"
    assert post(client, params("heartbeat", since=0)).status_code == 200
    assert queued(r) == []
    state = r.hgetall("spinewatch:subscription:Subscription/s1")
    assert state["highest"] == "0" and state["status"] == "active" and "last_heartbeat_at" in state
    assert "Subscription/s1" in r.smembers("spinewatch:subscriptions")
    assert [a["detail"]["kind"] for a in audits] == ["handshake", "heartbeat"]


def test_heartbeat_reporting_more_events_than_we_saw_starts_recovery(client, r):
    post(client, params("handshake", since=0))
    post(client, event(1))
    post(client, params("heartbeat", since=3))
    recovery = [t for t in queued(r) if t["task"] == "spinewatch.catch_up"]
    assert [t["kwargs"]["numbers"] for t in recovery] == [[2, 3]]
    assert recovery[0]["kwargs"]["only_missing"] is True and recovery[0]["eta"]


# ---------------- events ----------------

def test_event_is_queued_for_its_patient_after_the_coalescing_delay(client, r, audits):
    response = post(client, event(1))
    assert response.status_code == 200
    (task,) = queued(r)
    assert task["task"] == "spinewatch.evaluate_patient" and task["eta"]
    assert task["kwargs"]["patient"] == "Patient/p1" and task["kwargs"]["focus"] == ["Condition/c1"]
    assert task["kwargs"]["trigger"]["subscription"] == "Subscription/s1"
    assert audits[-1]["kind"] == "notification" and audits[-1]["patient"] == "Patient/p1"
    assert audits[-1]["detail"] == {"kind": "event-notification", "events": [1], "focus": ["Condition/c1"],
                                    "outcome": "queued"}


def test_the_same_event_twice_is_queued_once(client, r):
    assert post(client, event(1)).json()["issue"][0]["diagnostics"].startswith("1 event")
    second = post(client, event(1))
    assert second.status_code == 200 and second.json()["issue"][0]["diagnostics"].startswith("duplicate")
    assert len(queued(r)) == 1


def test_the_same_resource_version_is_recognised_across_routes(client, r):
    cond = {"resourceType": "Condition", "id": "c1", "meta": {"versionId": "2"}, "subject": {"reference": "Patient/p1"}}
    assert client.put("/fhir/notifications/Condition/c1", json=cond, headers=AUTH).status_code == 200
    assert client.post("/fhir/notifications", json=cond, headers=AUTH).json()["issue"][0]["diagnostics"].startswith("duplicate")
    assert len(queued(r)) == 1


def test_events_for_one_patient_close_together_are_evaluated_once(client, r):
    for number, focus in ((1, "Condition/c1"), (2, "Observation/o1"), (3, "Observation/o2")):
        assert post(client, event(number, focus)).status_code == 200
    (task,) = queued(r)
    assert task["kwargs"]["focus"] == ["Condition/c1"]
    # the later events' references wait for the queued evaluation, which takes them when it starts
    assert r.smembers("spinewatch:pending-focus:Patient/p1") == {"Condition/c1", "Observation/o1", "Observation/o2"}
    post(client, event(4, "Condition/c9", "Patient/p2"))  # another patient: a task of its own
    assert [t["kwargs"]["patient"] for t in queued(r)] == ["Patient/p1", "Patient/p2"]


def test_a_started_evaluation_lets_the_next_event_queue_a_new_one(client, r, settings):
    from service.infra.queue import WorkQueue

    post(client, event(1))
    WorkQueue(settings).take_pending("Patient/p1")  # what the worker does first
    post(client, event(2, "Observation/o1"))
    assert len(queued(r)) == 2


def test_id_only_event_without_patient_is_resolved_by_the_worker(client, r):
    post(client, event(1, "Condition/c7", None))
    (task,) = queued(r)
    assert task["task"] == "spinewatch.resolve_focus" and task["kwargs"]["focus"] == ["Condition/c7"]


def test_empty_event_asks_the_server_what_happened(client, r):
    post(client, event(5, None, None))
    (task,) = queued(r)
    assert task["task"] == "spinewatch.catch_up"
    assert task["kwargs"]["numbers"] == [5] and task["kwargs"]["only_missing"] is False


def test_a_gap_in_event_numbers_is_recovered_after_a_grace_period(client, r):
    post(client, params("handshake", since=0))
    post(client, event(1))
    post(client, event(4, "Condition/c4", "Patient/p4"))
    catch_up = [t for t in queued(r) if t["task"] == "spinewatch.catch_up"]
    assert [t["kwargs"]["numbers"] for t in catch_up] == [[2, 3]]
    assert catch_up[0]["kwargs"]["only_missing"] is True and catch_up[0]["eta"]
    assert GAP_GRACE_SECONDS > 0
    # the late arrival of event 2 is simply processed; the recovery task will skip it
    post(client, event(2, "Condition/c2", "Patient/p2"))
    assert r.get("spinewatch:dedup:event:Subscription/s1:2") == "queued"
    assert r.hget("spinewatch:subscription:Subscription/s1", "highest") == "4"


def test_first_contact_with_an_unknown_subscription_sets_a_baseline(client, r):
    post(client, event(7, sub="Subscription/new"))
    assert [t["task"] for t in queued(r)] == ["spinewatch.evaluate_patient"]
    assert r.hget("spinewatch:subscription:Subscription/new", "highest") == "7"


def test_empty_post_is_a_rest_hook_ping_that_triggers_one_sweep(client, r):
    assert client.post("/fhir/notifications", headers=AUTH).status_code == 200
    assert client.post("/fhir/notifications", headers=AUTH).status_code == 200
    assert [t["task"] for t in queued(r)] == ["spinewatch.reconcile"]


def test_classic_rest_hook_with_an_empty_body_reads_the_named_resource(client, r):
    assert client.put("/fhir/notifications/Observation/o1", headers=AUTH).status_code == 200
    (task,) = queued(r)
    assert task["task"] == "spinewatch.resolve_focus" and task["kwargs"]["focus"] == ["Observation/o1"]


NOTE = {"resourceType": "DocumentReference", "id": "d1", "meta": {"versionId": "1"}, "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/b1"}}]}


@pytest.mark.parametrize("deliver", ["rest-hook put", "medplum post", "backport id-only", "id-only without patient"])
def test_a_note_is_routed_to_its_patient_like_a_condition(client, r, deliver):
    """Clinical notes: a DocumentReference focus evaluates its patient (subject), however
    it is delivered; a focus that names no patient is read first to find whose it is."""
    if deliver == "rest-hook put":
        response = client.put("/fhir/notifications/DocumentReference/d1", content=json.dumps(NOTE), headers=AUTH)
    elif deliver == "medplum post":  # Medplum rest-hook: the resource POSTed to the endpoint itself
        response = post(client, NOTE)
    elif deliver == "backport id-only":
        response = post(client, event(1, focus="DocumentReference/d1", patient="Patient/p1"))
    else:
        response = post(client, event(1, focus="DocumentReference/d1", patient=None))
    assert response.status_code == 200, response.text
    (task,) = queued(r)
    if deliver == "id-only without patient":
        assert task["task"] == "spinewatch.resolve_focus" and task["kwargs"]["focus"] == ["DocumentReference/d1"]
    else:
        assert task["task"] == "spinewatch.evaluate_patient" and task["kwargs"]["patient"] == "Patient/p1"


@pytest.mark.parametrize("name, task", [
    ("inferno/handshake_bundle_example.json", None),
    ("inferno/heartbeat_bundle_example.json", None),
    ("backport-ig/Bundle-r4-notification-error.json", None),
    ("inferno/full_resource_notification_bundle_example.json", "spinewatch.evaluate_patient"),
    ("backport-ig/Bundle-r4-notification-multi-resource.json", "spinewatch.evaluate_patient"),
    ("inferno/id_only_notification_bundle_example.json", "spinewatch.resolve_focus"),
    ("backport-ig/Bundle-r4-notification-id-only-with-auth.json", "spinewatch.resolve_focus"),
    ("inferno/empty_notification_bundle_example.json", "spinewatch.catch_up"),
    ("backport-ig/Bundle-r4-notification-empty.json", "spinewatch.catch_up"),
    # non-conformant (no entry.request/response): handled, see tests/fhir_mappings/fhir/test_notifications.py
    ("inferno/empty_notification_bundle_non_conformant_example.json", "spinewatch.catch_up"),
])
def test_shared_examples_through_the_endpoint(client, r, audits, name, task):
    response = post(client, shared(name))
    assert response.status_code == 200
    assert [t["task"] for t in queued(r)] == ([task] if task else [])
    if "non_conformant" in name:
        assert audits[-1]["detail"]["warnings"] == [
            "Bundle.entry[0] lacks request/response (R4 bdl-3/bdl-4, history Bundle)"]


# ---------------- refusals ----------------

@pytest.mark.parametrize("body, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "no resourceType"),
    (json.dumps({"resourceType": "Bundle", "type": "history", "entry": []}), "no entries"),
    (json.dumps(params("gossip")), "type must be one of"),
])
def test_malformed_input_gets_400_with_an_operation_outcome(client, r, body, fragment):
    response = post(client, body)
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and fragment in outcome["issue"][0]["diagnostics"]
    assert queued(r) == []


def test_rest_hook_body_that_contradicts_the_path_is_refused(client):
    response = client.put("/fhir/notifications/Condition/c1", headers=AUTH,
                          json={"resourceType": "Observation", "id": "c1"})
    assert response.status_code == 400 and "differs from the path" in response.text


def test_oversized_notification_gets_413(app, client):
    app.state.services.settings = app.state.services.settings.model_copy(update={"notification_max_bytes": 2048})
    response = post(client, {"resourceType": "Bundle", "pad": "x" * 5000})
    assert response.status_code == 413 and response.json()["resourceType"] == "OperationOutcome"


# ---------------- Redis unavailable ----------------

def test_redis_down_is_503_so_that_the_server_retries(tmp_path):
    from tests.support.redis_server import free_port

    settings = Settings(environment="test", redis_url=f"redis://127.0.0.1:{free_port()}/0", notification_token=TOKEN,
                        audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")
    with TestClient(create_app(settings)) as client:
        for body in (event(1), params("heartbeat", since=0)):
            response = post(client, body)
            assert response.status_code == 503
            assert response.json()["issue"][0]["code"] == "transient"


def test_a_failed_enqueue_releases_its_claim_so_the_retry_is_not_a_duplicate(client, app, r, monkeypatch):
    from service.infra.queue import WorkQueue

    post(client, params("handshake", since=0))
    queue = app.state.services.queue

    def refuse(*a, **kw):
        raise QueueUnavailable("cannot queue: ConnectionError")

    monkeypatch.setattr(queue, "send", refuse)
    assert post(client, event(1)).status_code == 503
    assert r.get("spinewatch:dedup:event:Subscription/s1:1") is None
    assert r.get("spinewatch:pending:Patient/p1") is None
    monkeypatch.setattr(queue, "send", WorkQueue.send.__get__(queue))
    retry = post(client, event(1))
    assert retry.status_code == 200 and retry.json()["issue"][0]["diagnostics"].startswith("1 event")
    assert len(queued(r)) == 1


def test_a_concurrent_delivery_of_the_same_event_is_told_to_retry(client, r):
    r.set("spinewatch:dedup:event:Subscription/s1:1", "claimed", ex=30)  # another request is queueing it
    assert post(client, event(1)).status_code == 503
    r.set("spinewatch:dedup:event:Subscription/s1:1", "queued")
    assert post(client, event(1)).status_code == 200
    assert queued(r) == []


def test_a_batched_notification_naming_one_patient_twice_queues_one_evaluation(client, r):
    body = params("event-notification", "Subscription/s1", 2, [(1, "Condition/c1", "Patient/p1"),
                                                               (2, "Observation/o1", "Patient/p1")])
    assert post(client, body).json()["issue"][0]["diagnostics"] == "2 event(s) queued"
    (task,) = queued(r)
    assert task["kwargs"]["focus"] == ["Condition/c1", "Observation/o1"]
    assert r.get("spinewatch:pending:Patient/p1") == "queued"
    assert {r.get(f"spinewatch:dedup:event:Subscription/s1:{n}") for n in (1, 2)} == {"queued"}
