"""The watchdog's Subscription lifecycle, with respx as the FHIR server and a real redis-server for the
ledger and the queue: `error` re-requested, `requested` past the grace period asked for `active`
(and a refusal reported), and the fallback sweep for a Subscription that sends no heartbeats."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import redis
import respx

from service.core.settings import Settings
from service.infra.assessments import AssessmentStore
from service.infra.fhir.subscriptions import HEARTBEAT_PERIOD, TAG_SYSTEM
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import WorkQueue
from tests.workers.test_pipeline import queued
from workers import pipeline

BASE = "http://ehr.test/fhir"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
WATCHDOG = timedelta(seconds=600)
GRACE = timedelta(seconds=900)


@pytest.fixture
def settings(redis_url, tmp_path):
    return Settings(environment="test", redis_url=redis_url, fhir_base_url=BASE, coalesce_seconds=0,
                    heartbeat_watchdog_seconds=int(WATCHDOG.total_seconds()),
                    subscription_activation_grace_seconds=int(GRACE.total_seconds()),
                    audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


class Audits:
    def __init__(self):
        self.events = []

    def event(self, kind, outcome, **kw):
        self.events.append({"kind": kind, "outcome": outcome, **kw})


@pytest.fixture
def deps(settings, r):
    fhir = FHIRClient(BASE)
    yield pipeline.Collaborators(settings, fhir, WorkQueue(settings, r), AssessmentStore(r), Audits(), r)
    fhir.close()


def subscription(sid: str, rtype: str = "Condition", status: str = "active", written: datetime | None = None,
                 heartbeat: int | None = None) -> dict:
    sub = {"resourceType": "Subscription", "id": sid, "status": status, "criteria": f"{rtype}?",
           "meta": {"tag": [{"system": TAG_SYSTEM, "code": rtype.lower()}]},
           "channel": {"type": "rest-hook", "endpoint": "https://spinewatch.test/fhir/notifications",
                       "header": ["Authorization: Bearer old"]}}
    if written:
        sub["meta"]["lastUpdated"] = written.isoformat()
    if heartbeat is not None:
        sub["criteria"] = f"http://ehr.test/topic/{rtype.lower()}"
        sub["channel"]["extension"] = [{"url": HEARTBEAT_PERIOD, "valueUnsignedInt": heartbeat}]
    return sub


def searchset(*resources):
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": x, "search": {"mode": "match"}} for x in resources]}


def silent(deps, ref: str, kind: str = "classic", since: datetime = NOW - WATCHDOG) -> None:
    deps.queue.track_subscription(ref, kind=kind)
    deps.queue.set_subscription_fields(ref, last_seen_at=since.isoformat())


def no_changes():
    """Every type's _lastUpdated search answers nothing (the common case for a quiet classic one)."""
    return {t: respx.get(f"{BASE}/{t}").respond(200, json=searchset()) for t in ("Condition", "Observation")}


# ---------------- status ----------------

@respx.mock
def test_a_subscription_in_error_is_re_requested_with_our_secret(deps, r):
    silent(deps, "Subscription/c1")
    respx.get(f"{BASE}/Subscription/c1").respond(200, json=subscription("c1", status="error") | {"error": "HTTP 503"})
    put = respx.put(f"{BASE}/Subscription/c1").mock(side_effect=lambda req: httpx.Response(200, content=req.content))
    no_changes()
    (entry,) = pipeline.watchdog(deps, NOW)
    assert entry["action"] == "re-requested" and entry["status"] == "requested"
    sent = json.loads(put.calls[0].request.content)
    assert sent["status"] == "requested" and "error" not in sent
    assert sent["channel"]["header"] == ["Authorization: Bearer dev-only-change-me"]  # ours, not the stale one
    stored = r.hgetall("spinewatch:subscription:Subscription/c1")
    assert stored["status"] == "requested" and stored["requested_since"] == NOW.isoformat()  # the grace period starts
    assert "problem" not in entry  # the server may still activate it


@respx.mock
def test_a_subscription_left_requested_past_the_grace_period_is_updated_to_active(deps, r):
    silent(deps, "Subscription/c1")
    respx.get(f"{BASE}/Subscription/c1").respond(
        200, json=subscription("c1", status="requested", written=NOW - GRACE - timedelta(seconds=1)))
    put = respx.put(f"{BASE}/Subscription/c1").mock(side_effect=lambda req: httpx.Response(200, content=req.content))
    no_changes()
    (entry,) = pipeline.watchdog(deps, NOW)
    assert entry["action"] == "activated" and entry["status"] == "active" and "problem" not in entry
    assert json.loads(put.calls[0].request.content)["status"] == "active"
    stored = r.hgetall("spinewatch:subscription:Subscription/c1")
    assert stored["status"] == "active" and "requested_since" not in stored


@respx.mock
def test_a_refused_activation_is_reported_and_the_state_kept(deps, r):
    silent(deps, "Subscription/c1")
    written = NOW - timedelta(hours=2)
    respx.get(f"{BASE}/Subscription/c1").respond(200, json=subscription("c1", status="requested", written=written))
    put = respx.put(f"{BASE}/Subscription/c1").respond(422, json={"resourceType": "OperationOutcome", "issue": []})
    no_changes()
    (entry,) = pipeline.watchdog(deps, NOW)
    assert entry["action"] == "activation refused" and len(put.calls) == 1  # once, not in a loop
    assert entry["problem"].startswith("the server has left it `requested` for 120 min: no notifications will arrive")
    stored = r.hgetall("spinewatch:subscription:Subscription/c1")
    assert stored["status"] == "requested" and stored["requested_since"] == written.isoformat()


@respx.mock
def test_a_requested_subscription_within_the_grace_period_is_left_alone(deps):
    silent(deps, "Subscription/c1")
    respx.get(f"{BASE}/Subscription/c1").respond(
        200, json=subscription("c1", status="requested", written=NOW - GRACE + timedelta(seconds=30)))
    put = respx.put(f"{BASE}/Subscription/c1").respond(200, json={})
    no_changes()
    (entry,) = pipeline.watchdog(deps, NOW)
    assert entry["action"] == "checked" and not put.called


@respx.mock
def test_without_meta_last_updated_the_grace_period_runs_from_when_we_first_saw_it_requested(deps, r):
    silent(deps, "Subscription/c1")
    respx.get(f"{BASE}/Subscription/c1").respond(200, json=subscription("c1", status="requested"))
    put = respx.put(f"{BASE}/Subscription/c1").mock(side_effect=lambda req: httpx.Response(200, content=req.content))
    no_changes()
    first_seen = NOW - GRACE - timedelta(minutes=1)
    r.hset("spinewatch:subscription:Subscription/c1", mapping={"status": "requested",
                                                               "requested_since": first_seen.isoformat()})
    (entry,) = pipeline.watchdog(deps, NOW)
    assert entry["action"] == "activated" and json.loads(put.calls[0].request.content)["status"] == "active"


# ---------------- the fallback sweep ----------------

@respx.mock
def test_a_silent_classic_subscription_sweeps_its_own_type_since_it_was_last_heard_from(deps, r):
    last_heard = NOW - timedelta(minutes=20)
    silent(deps, "Subscription/c1", since=last_heard)
    respx.get(f"{BASE}/Subscription/c1").respond(200, json=subscription("c1"))
    conditions = respx.get(f"{BASE}/Condition").respond(200, json=searchset(
        {"resourceType": "Condition", "id": "x1", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Condition", "id": "x2", "subject": {"reference": "Patient/p2"}}))
    observations = respx.get(f"{BASE}/Observation").respond(200, json=searchset())
    (entry,) = pipeline.watchdog(deps, NOW)

    assert (entry["swept"], entry["patients"]) == ("Condition", 2)
    assert conditions.calls.last.request.url.params["_lastUpdated"] == "ge2026-12-01T11:35:00.000Z"  # 20 + 5 min back
    assert not observations.called  # that type has a Subscription of its own
    evaluations = [(task, kw["patient"], kw["trigger"]) for task, kw in queued(r)]
    assert evaluations == [
        ("spinewatch.evaluate_patient", "Patient/p1", {"kind": "watchdog", "subscription": "Subscription/c1",
                                                       "source": "sweep"}),
        ("spinewatch.evaluate_patient", "Patient/p2", {"kind": "watchdog", "subscription": "Subscription/c1",
                                                       "source": "sweep"})]
    (audit,) = deps.audit.events
    assert audit["kind"] == "subscription-sweep" and audit["detail"] == {
        "subscription": "Subscription/c1", "type": "Condition", "since": "2026-12-01T11:35:00.000Z", "patients": 2}

    # Swept up to now: the next look is a watchdog period on, and starts where this one ended.
    assert pipeline.watchdog(deps, NOW + timedelta(minutes=1)) == []
    (entry,) = pipeline.watchdog(deps, NOW + WATCHDOG)
    assert conditions.calls.last.request.url.params["_lastUpdated"] == "ge2026-12-01T11:55:00.000Z"


@respx.mock
def test_a_backport_subscription_with_heartbeats_is_not_swept_and_one_without_is(deps):
    silent(deps, "Subscription/b1", kind="backport")
    silent(deps, "Subscription/b2", kind="backport")
    respx.get(f"{BASE}/Subscription/b1").respond(200, json=subscription("b1", heartbeat=300))
    respx.get(f"{BASE}/Subscription/b2").respond(200, json=subscription("b2", rtype="Observation", heartbeat=0))
    respx.get(url__regex=rf"{BASE}/Subscription/b[12]/\$status").respond(404)
    searches = no_changes()
    by_ref = {e["subscription"]: e for e in pipeline.watchdog(deps, NOW)}
    assert "swept" not in by_ref["Subscription/b1"] and by_ref["Subscription/b2"]["swept"] == "Observation"
    assert not searches["Condition"].called and searches["Observation"].call_count == 1


@respx.mock
def test_a_subscription_heard_from_recently_is_neither_read_nor_swept(deps):
    silent(deps, "Subscription/c1", since=NOW - WATCHDOG + timedelta(seconds=1))
    read = respx.get(f"{BASE}/Subscription/c1").respond(200, json=subscription("c1"))
    assert pipeline.watchdog(deps, NOW) == [] and not read.called


# ---------------- the ledger ----------------

def test_requested_since_follows_the_status_whoever_records_it(deps, r):
    key = "spinewatch:subscription:Subscription/s1"
    deps.queue.track_subscription("Subscription/s1", kind="backport", status="requested",
                                  requested_since="2026-12-01T11:00:00+00:00")
    assert r.hget(key, "requested_since") == "2026-12-01T11:00:00+00:00"
    # a handshake (sekmet sends it with status requested) keeps the earlier time
    deps.queue.advance_subscription("Subscription/s1", kind="handshake", status="requested", top=0, event=False)
    assert r.hget(key, "requested_since") == "2026-12-01T11:00:00+00:00"
    deps.queue.advance_subscription("Subscription/s1", kind="heartbeat", status="active", top=0, event=False)
    assert r.hget(key, "status") == "active" and r.hget(key, "requested_since") is None
    deps.queue.record_subscription_status("Subscription/s1", "requested")
    assert r.hget(key, "requested_since") is not None  # first seen so: now
    assert deps.queue.subscription_state("Subscription/s1").requested_since == r.hget(key, "requested_since")


def test_registering_again_does_not_move_last_seen_on(deps, r):
    key = "spinewatch:subscription:Subscription/s1"
    deps.queue.track_subscription("Subscription/s1", kind="classic", status="active")
    r.hset(key, "last_seen_at", "2026-12-01T10:00:00+00:00")
    deps.queue.track_subscription("Subscription/s1", kind="classic", status="active")
    assert r.hget(key, "last_seen_at") == "2026-12-01T10:00:00+00:00"  # the fallback sweep starts there
