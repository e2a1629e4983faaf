"""workers/pipeline.py with respx as the FHIR server and a real redis-server for the queue and the
store: what is fetched, evaluated, stored and handed on; catch-up, sweep and watchdog."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import redis
import respx

from service.infra.assessments import AssessmentStore
from service.infra.audit.writer import AuditLog
from service.core.errors import FHIRNotFound
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import QUEUE, WorkQueue
from service.core.settings import Settings
from tests.support import cds_hooks as ch
from workers import pipeline, tasks
from workers.pipeline import evaluate as evaluate_step

BASE = "http://ehr.test/fhir"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def settings(redis_url, tmp_path):
    return Settings(environment="test", redis_url=redis_url, fhir_base_url=BASE, coalesce_seconds=0,
                    heartbeat_watchdog_seconds=60, audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def deps(settings, r):
    fhir = FHIRClient(BASE)
    yield pipeline.Collaborators(settings, fhir, WorkQueue(settings, r), AssessmentStore(r), AuditLog(settings), r)
    fhir.close()


@pytest.fixture
def alerts(monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate_step, "alert", lambda c, assessment: calls.append((assessment, c.settings)))
    return calls


@pytest.fixture
def audits(deps):
    seen = []

    class Recording:
        def event(self, kind, outcome, **kw):
            seen.append({"kind": kind, **kw})

    deps.audit = Recording()
    return seen


def searchset(*resources):
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": x, "search": {"mode": "match"}} for x in resources]}


def queued(r) -> list[tuple[str, dict]]:
    import base64

    out = []
    for raw in reversed(r.lrange(QUEUE, 0, -1)):
        message = json.loads(raw)
        out.append((message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[1]))
    return out


def serve_record(resources: list[dict], versions: dict | None = None):
    """respx routes answering reads and patient searches from `resources`."""
    by_type: dict[str, list[dict]] = {}
    for res in resources:
        res.setdefault("meta", {"versionId": (versions or {}).get(res["id"], "1")})
        by_type.setdefault(res["resourceType"], []).append(res)
    searches = []

    def search(request):
        rtype = request.url.path.rsplit("/", 1)[1]
        searches.append((rtype, dict(request.url.params)))
        return httpx.Response(200, json=searchset(*by_type.get(rtype, [])))

    def read(request):
        rtype, rid = request.url.path.rsplit("/", 2)[1:]
        found = next((x for x in by_type.get(rtype, []) if x["id"] == rid), None)
        return httpx.Response(200, json=found) if found else httpx.Response(404)

    respx.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+$").mock(side_effect=search)
    respx.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+/[^/$]+$").mock(side_effect=read)
    return searches


# ---------------- the record ----------------

@respx.mock
def test_fetch_record_reads_everything_the_rules_need_and_no_more(deps):
    searches = serve_record(ch.record("urgent", "p1"))
    resources = pipeline.fetch_record(deps.fhir, "Patient/p1", NOW, 90)
    assert {x["resourceType"] for x in resources} == {"Patient", "Condition"}
    assert {t for t, _ in searches} == {"Condition", "ServiceRequest", "ImagingStudy", "Observation",
                                        "DiagnosticReport", "Procedure", "DocumentReference", "ClinicalImpression"}
    assert all(p["patient"] == "p1" for _, p in searches)
    window = {(t, k) for t, p in searches for k in ("date", "_lastUpdated") if k in p}
    assert window == {(t, k) for t in ("Observation", "DiagnosticReport", "Procedure", "DocumentReference",
                                       "ClinicalImpression") for k in ("date", "_lastUpdated")}
    assert dict(searches[3][1])["date"] == "ge2025-12-01T12:00:00.000Z"  # 90 days before NOW


@respx.mock
def test_focus_resources_are_re_read_at_their_current_version(deps):
    record = ch.record("routine", "p1")
    newer = dict(next(x for x in record if x["id"] == "back-pain"), meta={"versionId": "3"})
    respx.get(f"{BASE}/Condition/back-pain").respond(200, json=newer)  # search index lags behind the write
    respx.get(f"{BASE}/Condition/gone").respond(410)
    serve_record(record, versions={"back-pain": "1"})
    resources = pipeline.fetch_record(deps.fhir, "Patient/p1", NOW, 90, ["Condition/back-pain", "Condition/gone"])
    assert next(x for x in resources if x["id"] == "back-pain")["meta"]["versionId"] == "3"
    assert not any(x["id"] == "gone" for x in resources)


@respx.mock
def test_a_patient_that_does_not_exist_is_a_permanent_error(deps):
    respx.get(f"{BASE}/Patient/p404").respond(404)
    with pytest.raises(FHIRNotFound) as caught:
        pipeline.fetch_record(deps.fhir, "Patient/p404", NOW, 90)
    assert not tasks.is_transient(caught.value)


# ---------------- evaluate ----------------

@respx.mock
def test_evaluate_stores_the_assessment_with_versions_and_hands_it_to_alerting(deps, alerts, audits):
    now = datetime.now(timezone.utc)
    serve_record(ch.record("emergency", "p1"))
    deps.queue.schedule_evaluation("Patient/p1", ["Observation/neuro"], {})
    assessment = pipeline.evaluate_patient(deps, "Patient/p1", ["Condition/back-pain"], {"kind": "rest-hook"}, now)
    assert assessment.urgency == "emergency"
    stored = deps.store.get("Patient/p1")
    assert stored["urgency"] == "emergency" and stored["revision"] == 1
    assert stored["seen"]["Condition/cancer"] == "1" and "stored_at" in stored
    assert stored["evaluated_at"] == now.isoformat()
    (alerted, alert_settings), = alerts
    assert alerted is assessment and alert_settings is deps.settings
    (audit,) = [a for a in audits if a["kind"] == "evaluation"]  # the MRI clock audits its start too
    assert audit["kind"] == "evaluation" and audit["patient"] == "Patient/p1"
    assert audit["detail"]["tier"] == "emergency" and audit["detail"]["flags"] == assessment.red_flags
    assert audit["detail"]["inputs"] == assessment.seen and audit["detail"]["rule_versions"]
    # the evaluation cleared the coalescing marker as it started: the next event queues anew
    assert deps.queue.schedule_evaluation("Patient/p1", [], {}) == "queued"


@respx.mock
def test_an_older_evaluation_never_replaces_a_newer_one(deps, alerts):
    serve_record(ch.record("urgent", "p1"))  # dated from the real clock: evaluate at it too
    now = datetime.now(timezone.utc)
    pipeline.evaluate_patient(deps, "Patient/p1", [], {}, now)
    late = pipeline.evaluate_patient(deps, "Patient/p1", [], {}, now - timedelta(minutes=1))
    assert late.urgency == "urgent"
    assert deps.store.get("Patient/p1")["evaluated_at"] == now.isoformat()
    assert len(alerts) == 1  # the stale one is not alerted either


@respx.mock
def test_resolve_focus_reads_the_resource_to_find_its_patient(deps, r):
    serve_record(ch.record("routine", "p1"))
    respx.get(f"{BASE}/Condition/missing/_history").respond(404)  # gone, and no history: unresolved
    assert pipeline.resolve_focus(deps, ["Condition/back-pain", "Condition/missing", "Patient/p2"], {}) == \
        ["Patient/p1", "Patient/p2"]
    assert queued(r)[0][1]["patient"] == "Patient/p1"


# ---------------- catch-up ----------------

def events_bundle(sub: str, *events):
    parts = [{"name": "notification-event", "part": [
        {"name": "event-number", "valueString": str(n)},
        {"name": "focus", "valueReference": {"reference": f"{BASE}/{focus}"}},
        {"name": "additional-context", "valueReference": {"reference": f"{BASE}/{patient}"}}]}
        for n, focus, patient in events]
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": f"{BASE}/{sub}"}},
        {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": "query-event"}, *parts]}
    return {"resourceType": "Bundle", "type": "history", "entry": [{"resource": params, "request": {"method": "GET",
            "url": f"{sub}/$events"}, "response": {"status": "200"}}]}


@respx.mock
def test_catch_up_asks_events_operation_for_the_missing_numbers(deps, r):
    route = respx.get(f"{BASE}/Subscription/s1/$events").respond(
        200, json=events_bundle("Subscription/s1", (2, "Condition/c2", "Patient/p2"), (3, "Observation/o3", "Patient/p3")))
    sweep = respx.get(f"{BASE}/Condition")
    result = pipeline.catch_up(deps, "Subscription/s1", [2, 3], None, True, NOW)
    assert result == {"events": 2, "via_events": 2, "swept": False}
    assert dict(route.calls[0].request.url.params) == {"eventsSinceNumber": "2", "eventsUntilNumber": "3",
                                                       "content": "id-only"}
    assert [k["patient"] for _, k in queued(r)] == ["Patient/p2", "Patient/p3"]
    assert not sweep.called
    assert deps.queue.seen("event:Subscription/s1:2") and deps.queue.seen("event:Subscription/s1:3")


@respx.mock
def test_catch_up_skips_numbers_that_arrived_meanwhile(deps, r):
    deps.queue.mark_seen(["event:Subscription/s1:2"])
    route = respx.get(f"{BASE}/Subscription/s1/$events")
    assert pipeline.catch_up(deps, "Subscription/s1", [2], None, True, NOW) == {"events": 0, "swept": False}
    assert not route.called


@respx.mock
def test_without_events_operation_catch_up_sweeps_by_last_updated(deps, r):
    respx.get(f"{BASE}/Subscription/s1/$events").respond(404)  # sekmet 0.1.1 has no $events
    cond = respx.get(f"{BASE}/Condition").respond(200, json=searchset(
        {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}}))
    obs = respx.get(f"{BASE}/Observation").respond(200, json=searchset(
        {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p2"}},
        {"resourceType": "Observation", "id": "o2", "subject": {"reference": "Patient/p1"}}))
    since = "2026-03-01T11:00:00+00:00"
    assert pipeline.catch_up(deps, "Subscription/s1", [4], since, False, NOW)["swept"] is True
    assert cond.calls[0].request.url.params["_lastUpdated"] == "ge2026-03-01T10:55:00.000Z"  # minus the margin
    assert obs.called
    assert sorted(k["patient"] for _, k in queued(r)) == ["Patient/p1", "Patient/p2"]


@respx.mock
def test_reconcile_sweeps_from_where_the_last_sweep_ended(deps):
    cond = respx.get(f"{BASE}/Condition").respond(200, json=searchset())
    respx.get(f"{BASE}/Observation").respond(200, json=searchset())
    pipeline.reconcile(deps, NOW, "test")
    pipeline.reconcile(deps, NOW + timedelta(minutes=15), "test")
    first, second = (c.request.url.params["_lastUpdated"] for c in cond.calls)
    assert first == "ge2026-03-01T11:40:00.000Z"  # no previous sweep: one interval (15 min) back, minus the margin
    assert second == "ge2026-03-01T11:55:00.000Z"  # the first sweep's time, minus the margin


@respx.mock
def test_the_sweep_covers_every_subscribed_type(deps, r):
    deps.settings = deps.settings.model_copy(update={"subscription_types": "Condition,Observation,DocumentReference"})
    respx.get(f"{BASE}/Condition").respond(200, json=searchset())
    respx.get(f"{BASE}/Observation").respond(200, json=searchset())
    notes = respx.get(f"{BASE}/DocumentReference").respond(200, json=searchset(
        {"resourceType": "DocumentReference", "id": "d1", "subject": {"reference": "Patient/p3"}}))
    assert pipeline.sweep(deps, NOW, {"kind": "test"}) == ["Patient/p3"]
    assert notes.calls.last.request.url.params["_elements"] == "subject"


# ---------------- watchdog ----------------

def status_bundle(sub: str, count: int, status: str = "active") -> dict:
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": sub}}, {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": "query-status"},
        {"name": "events-since-subscription-start", "valueString": str(count)}]}
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": params, "search": {"mode": "match"}}]}


@respx.mock
def test_watchdog_asks_status_of_a_silent_backport_subscription_and_recovers_missed_events(deps, r):
    deps.queue.track_subscription("Subscription/b1", kind="backport", reset=True)
    deps.queue.advance_subscription("Subscription/b1", kind="event-notification", status="active", top=3, event=True)
    r.hset("spinewatch:subscription:Subscription/b1", "last_seen_at", (NOW - timedelta(minutes=5)).isoformat())
    respx.get(f"{BASE}/Subscription/b1").respond(200, json={"resourceType": "Subscription", "id": "b1", "status": "active"})
    respx.get(f"{BASE}/Subscription/b1/$status").respond(200, json=status_bundle("Subscription/b1", 5))
    (report,) = pipeline.watchdog(deps, NOW)
    assert report["missing"] == 2
    ((task, kwargs),) = queued(r)
    assert task == "spinewatch.catch_up" and kwargs["numbers"] == [4, 5] and kwargs["only_missing"]


@respx.mock
def test_watchdog_re_requests_a_subscription_in_error(deps, r):
    deps.queue.track_subscription("Subscription/c1", kind="classic")
    r.hset("spinewatch:subscription:Subscription/c1", "last_seen_at", (NOW - timedelta(hours=1)).isoformat())
    respx.get(f"{BASE}/Subscription/c1").respond(200, json={"resourceType": "Subscription", "id": "c1",
                                                            "status": "error", "error": "HTTP 503"})
    put = respx.put(f"{BASE}/Subscription/c1").respond(200, json={"resourceType": "Subscription", "id": "c1"})
    (report,) = pipeline.watchdog(deps, NOW)
    assert report["action"] == "re-requested"
    assert json.loads(put.calls[0].request.content)["status"] == "requested"


@respx.mock
def test_watchdog_leaves_recently_heard_subscriptions_alone_and_forgets_deleted_ones(deps):
    deps.queue.track_subscription("Subscription/fresh", kind="backport")
    deps.queue.track_subscription("Subscription/gone", kind="classic")
    deps.queue.set_subscription_fields("Subscription/fresh", last_seen_at=NOW.isoformat())
    deps.queue.set_subscription_fields("Subscription/gone", last_seen_at=(NOW - timedelta(days=1)).isoformat())
    respx.get(f"{BASE}/Subscription/gone").respond(404)
    assert [x["subscription"] for x in pipeline.watchdog(deps, NOW)] == ["Subscription/gone"]
    assert deps.queue.tracked_subscriptions() == ["Subscription/fresh"]


# ---------------- task policy ----------------

def test_backoff_is_exponential_with_jitter_and_capped():
    for retries in range(8):
        delays = [tasks.backoff(retries, 2.0) for _ in range(50)]
        full = min(tasks.BACKOFF_CAP_SECONDS, 2.0 * 2 ** retries)
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 1


def test_only_transient_errors_are_retried():
    from service.core.errors import FHIRBadRequest, FHIRServerError, FHIRTransportError
    from service.infra.queue import QueueUnavailable

    assert tasks.is_transient(FHIRServerError("x", 503)) and tasks.is_transient(FHIRTransportError("x"))
    assert tasks.is_transient(QueueUnavailable("x"))
    assert not tasks.is_transient(FHIRBadRequest("x", 400)) and not tasks.is_transient(KeyError("x"))


def test_celery_is_configured_for_at_least_once_delivery():
    from workers.celery_app import create_celery_app

    conf = create_celery_app(Settings()).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit < conf.task_time_limit < conf.broker_transport_options["visibility_timeout"]
    assert tasks.BACKOFF_CAP_SECONDS < conf.broker_transport_options["visibility_timeout"]
    assert {"heartbeat-watchdog", "reconciliation-sweep"} <= set(conf.beat_schedule)
    with pytest.raises(ValueError, match="below"):
        create_celery_app(Settings(task_time_limit_seconds=4000, broker_visibility_timeout_seconds=3600))
    off = create_celery_app(Settings(reconciliation_interval_seconds=0))
    assert "reconciliation-sweep" not in off.conf.beat_schedule


def test_the_store_reads_back_with_a_client_that_does_not_decode(redis_url):
    """The CDS Hooks side opens its own client (service/infra/assessments.py, bytes replies)."""
    from fhir_mappings.clinical.evaluate import assess

    assessment = assess(ch.record("urgent", "p5"), datetime.now(timezone.utc))  # the record is dated from the clock
    AssessmentStore(redis.Redis.from_url(redis_url, decode_responses=True)).save(assessment.to_json(),
                                                                               seen=assessment.seen)
    record = AssessmentStore(redis.Redis.from_url(redis_url)).get("p5")
    assert record["urgency"] == "urgent" and record["revision"] == 1 and record["seen"] == assessment.seen
    with pytest.raises(ValueError, match="without a patient"):
        AssessmentStore(redis.Redis.from_url(redis_url)).save(assessment.to_json() | {"patient": None})
