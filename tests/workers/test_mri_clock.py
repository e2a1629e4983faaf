"""The MRI clock through the workers: a real redis-server (clocks, alert records), the stateful respx
FHIR server of test_retractions (conditional create of Communications), a real audit store, and
the time injected (NICE QS56 statement 3: 24 h; CG75/NG234: 1 week). Each "worker" is a new set of
collaborators (new FHIR and Redis clients) on the same Redis: what one started the next carries on,
across a Redis restart too, and nothing is sent twice."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import redis
import respx
from fhir.resources.R4B.auditevent import AuditEvent

from fhir_mappings.cds.alerts import SIGNATURE_HEADER, verify_signature
from fhir_mappings.cds.mri_clock import MRI_CLOCK_ID_SYSTEM
from fhir_mappings.fhir.audit_events import audit_event
from service.core.errors import AlertRetry
from service.core.settings import Settings
from service.infra.assessments import AssessmentStore
from service.infra.audit.store import AuditStore
from service.infra.audit.writer import AuditLog
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import WorkQueue
from service.infra.queue.keys import TASK_MRI_CLOCK
from tests.support import cds_hooks as ch
from tests.workers.test_retractions import BASE, CARE_TEAM, Ehr, audit_store  # noqa: F401 fixture
from workers import pipeline
from workers.celery_app import beat_schedule
from workers.pipeline import mri_clock

HOOK = "https://hooks.example.org/spinewatch"
SECRET = "mri-clock-test-secret"
PATIENT = "Patient/p1"
COORDINATOR = "PractitionerRole/mscc-coordinator"
H = timedelta(hours=1)
MRI_CODE = {"coding": [{"system": "http://loinc.org", "code": "36400-0"}], "text": "MR Spine"}


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
def worker(redis_url, audit_store):
    """A new worker process each call: its own FHIR and Redis clients, the same Redis and audit log."""
    made = []

    def make(**settings_kw):
        settings_kw = {"mscc_coordinator": COORDINATOR} | settings_kw
        settings = Settings(environment="test", redis_url=redis_url, fhir_base_url=BASE, coalesce_seconds=0,
                            **settings_kw)
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        fhir = FHIRClient(BASE)
        made.append((fhir, r))
        return pipeline.Collaborators(settings, fhir, WorkQueue(settings, r), AssessmentStore(r),
                                      AuditLog(settings, store=audit_store), r)

    yield make
    for fhir, r in made:
        fhir.close()
        r.close()


def record(tier: str, evidence_at: datetime) -> list[dict]:
    """ch.record's patient, its red-flag evidence dated `evidence_at` (a fresh suspicion)."""
    resources = ch.record(tier, "p1") + [CARE_TEAM]
    for resource in resources:
        if resource["id"] == "neuro":
            resource["effectiveDateTime"] = iso(evidence_at)
        if tier == "urgent" and resource["id"] == "back-pain":
            resource["onsetDateTime"] = iso(evidence_at)
    return resources


def mri_order(at: datetime) -> dict:
    return {"resourceType": "ServiceRequest", "id": "mri-order", "status": "active", "intent": "order",
            "priority": "stat", "code": MRI_CODE, "subject": {"reference": PATIENT}, "authoredOn": iso(at)}


def mri_report(at: datetime) -> dict:
    return {"resourceType": "DiagnosticReport", "id": "mri-report", "status": "final", "code": MRI_CODE,
            "subject": {"reference": PATIENT}, "effectiveDateTime": iso(at)}


def clock_events(store: AuditStore) -> list[dict]:
    return [a.detail for a in store.query(kinds=["mri-clock"], newest_first=False)[0]]


def clock_comms(ehr: Ehr) -> list[dict]:
    return [c for c in ehr.communications() if c["identifier"][0]["system"] == MRI_CLOCK_ID_SYSTEM]


@respx.mock
def test_an_mri_ordered_and_done_in_time_closes_the_clock_without_escalation(worker, audit_store):
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H))
    assert pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now).urgency == "emergency"
    (alert,) = ehr.communications()

    ehr.put(mri_order(now + H))
    assert pipeline.check_open_clocks(worker(), now + 2 * H) == [PATIENT]
    ehr.put(mri_report(now + 5 * H))
    assert pipeline.check_open_clocks(worker(), now + 6 * H) == [PATIENT]
    assert pipeline.check_open_clocks(worker(), now + 30 * H) == []  # closed: no longer checked

    assert ehr.communications() == [alert]  # no escalation, no breach
    events = clock_events(audit_store)
    assert [e["event"] for e in events] == ["started", "ordered", "done", "closed"]
    started, ordered, done, closed = events
    assert started == {"event": "started", "episode": started["episode"], "tier": "emergency",
                       "first_evidence_at": (now - H).isoformat(),
                       "alerted_at": alert["sent"], "deadline": (now + 23 * H).isoformat(),
                       "at": now.isoformat(), "reason": None, "communication": None}
    assert ordered["at"] == (now + H).isoformat() and ordered["reason"] == "ServiceRequest/mri-order"
    assert done["at"] == (now + 5 * H).isoformat() and done["reason"] == "DiagnosticReport/mri-report"
    assert closed["reason"] == "done" and {e["episode"] for e in events} == {started["episode"]}
    # The report's evaluation sees the MRI: suppressed, and the closed clock starts nothing new.
    assert pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now + 7 * H).urgency == "none"
    assert len(clock_events(audit_store)) == 4


@respx.mock
def test_nothing_ordered_escalates_once_then_breaches_once_across_worker_and_redis_restarts(
        worker, audit_store, redis_server):
    hook = respx.post(HOOK).respond(204)
    settings = {"alert_webhook_url": HOOK, "alert_webhook_secret": SECRET}
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H))
    pipeline.evaluate_patient(worker(**settings), PATIENT, [], {"kind": "test"}, now)
    (alert,) = ehr.communications()

    assert pipeline.check_open_clocks(worker(**settings), now + 3 * H) == [PATIENT]
    assert clock_comms(ehr) == []  # 3 h: not yet
    redis_server.restart()  # appendonly: the clock and its due time survive
    pipeline.check_open_clocks(worker(**settings), now + 4 * H)
    pipeline.check_open_clocks(worker(**settings), now + 5 * H)
    (escalation,) = clock_comms(ehr)
    assert escalation["priority"] == "stat" and escalation["recipient"] == [{"reference": COORDINATOR}]
    assert escalation["inResponseTo"] == [{"reference": f"Communication/{alert['id']}"}]
    assert "no spine MRI ordered" in escalation["payload"][0]["contentString"]

    redis_server.restart()
    pipeline.check_open_clocks(worker(**settings), now + 23 * H)  # the deadline: 24 h after the evidence
    pipeline.check_open_clocks(worker(**settings), now + 24 * H)
    breach = next(c for c in clock_comms(ehr) if c["id"] != escalation["id"])
    assert breach["identifier"][0]["value"].endswith("-breached") and breach["priority"] == "stat"
    assert len(clock_comms(ehr)) == 2

    events = clock_events(audit_store)
    assert [e["event"] for e in events] == ["started", "escalated", "breached"]
    assert events[1]["communication"] == f"Communication/{escalation['id']}"
    assert events[2]["communication"] == f"Communication/{breach['id']}"
    assert events[2]["reason"] == "no spine MRI done by the deadline"
    alert_post, escalation_post, breach_post = [c.request for c in hook.calls]
    body = json.loads(escalation_post.content)
    assert body["type"] == "spinewatch.mri-clock.escalated" and body["communication"] == events[1]["communication"]
    assert verify_signature(escalation_post.content, SECRET, escalation_post.headers[SIGNATURE_HEADER])
    assert json.loads(breach_post.content)["type"] == "spinewatch.mri-clock.breached"
    # The audit export (FHIR AuditEvent) names the patient and the escalation's Communication.
    escalated = audit_store.query(kinds=["mri-clock"], newest_first=False)[0][1]
    exported = AuditEvent.model_validate(audit_event(escalated.to_json())).model_dump(mode="json")
    whats = [e["what"].get("reference") for e in exported["entity"]]
    assert PATIENT in whats and f"Communication/{escalation['id']}" in whats


@respx.mock
def test_a_webhook_failure_after_the_communication_resumes_without_writing_it_twice(worker, audit_store):
    hook = respx.post(HOOK)
    hook.side_effect = [respx.MockResponse(204), respx.MockResponse(503), respx.MockResponse(204)]
    settings = {"alert_webhook_url": HOOK, "alert_webhook_secret": SECRET}
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H))
    pipeline.evaluate_patient(worker(**settings), PATIENT, [], {"kind": "test"}, now)
    assert pipeline.check_open_clocks(worker(**settings), now + 4 * H) == []  # the webhook failed: still due
    assert len(clock_comms(ehr)) == 1 and [e["event"] for e in clock_events(audit_store)] == ["started"]
    assert pipeline.check_open_clocks(worker(**settings), now + 4 * H + timedelta(minutes=5)) == [PATIENT]
    assert len(clock_comms(ehr)) == 1 and len(hook.calls) == 3
    assert [e["event"] for e in clock_events(audit_store)] == ["started", "escalated"]


@respx.mock
def test_a_worker_lost_after_sending_but_before_recording_sends_nothing_twice(worker, audit_store, monkeypatch):
    hook = respx.post(HOOK).respond(204)
    settings = {"alert_webhook_url": HOOK, "alert_webhook_secret": SECRET}
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H))
    pipeline.evaluate_patient(worker(**settings), PATIENT, [], {"kind": "test"}, now)
    save = mri_clock._save

    def lost(c, clock, when):  # the escalation was written and posted; the clock's write is lost
        monkeypatch.setattr(mri_clock, "_save", save)
        raise AlertRetry("redis unavailable (ConnectionError)")

    monkeypatch.setattr(mri_clock, "_save", lost)
    assert pipeline.check_open_clocks(worker(**settings), now + 4 * H) == []
    assert len(clock_comms(ehr)) == 1 and len(hook.calls) == 2  # the alert and the escalation
    assert pipeline.check_open_clocks(worker(**settings), now + 4 * H + timedelta(minutes=5)) == [PATIENT]
    assert len(clock_comms(ehr)) == 1 and len(hook.calls) == 2
    assert [e["event"] for e in clock_events(audit_store)] == ["started", "escalated"]


@respx.mock
def test_an_order_without_a_scan_breaches_without_escalating(worker, audit_store):
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H) + [mri_order(now)])
    pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now)
    for hours in (4, 8, 23, 30):
        pipeline.check_open_clocks(worker(), now + hours * H)
    assert [e["event"] for e in clock_events(audit_store)] == ["started", "ordered", "breached"]
    (breach,) = clock_comms(ehr)
    assert breach["identifier"][0]["value"].endswith("-breached")
    assert breach["recipient"] == [{"reference": COORDINATOR}]


@respx.mock
def test_an_upgrade_restarts_the_clock_with_the_shorter_deadline(worker, audit_store):
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("urgent", now - 2 * H))
    assert pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now).urgency == "urgent"
    neuro = ch.record("emergency", "p1")[-1]
    neuro["effectiveDateTime"] = iso(now + H)
    ehr.put(neuro)
    assert pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now + 2 * H).urgency == "emergency"

    events = clock_events(audit_store)
    assert [(e["event"], e["tier"]) for e in events] == [("started", "urgent"), ("closed", "urgent"),
                                                         ("upgraded", "emergency")]
    assert events[0]["deadline"] == (now - 2 * H + timedelta(days=7)).isoformat()
    assert events[2]["deadline"] == (now + 25 * H).isoformat()
    assert events[1]["reason"] == "upgraded" and events[2]["episode"] != events[0]["episode"]
    # The emergency escalation is due 4 h after the upgrade, to the coordinator.
    pipeline.check_open_clocks(worker(), now + 6 * H)
    (escalation,) = clock_comms(ehr)
    assert escalation["identifier"][0]["value"] == f"{events[2]['episode']}-escalated"


@respx.mock
def test_an_escalation_written_but_never_recorded_is_recorded_before_a_breach_that_comes_first(
        worker, audit_store, monkeypatch, redis_url):
    """The worker is lost after writing the escalation and before any record of it (the clock, its
    send progress); its retry comes only after the deadline: the breach branch finds the escalation
    on the EHR by its identifier and records it first, sending nothing twice."""
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H))
    pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now)
    save = mri_clock._save

    def lost(c, clock, when):
        monkeypatch.setattr(mri_clock, "_save", save)
        raise AlertRetry("redis unavailable (ConnectionError)")

    monkeypatch.setattr(mri_clock, "_save", lost)
    assert pipeline.check_open_clocks(worker(), now + 4 * H) == []
    r = redis.Redis.from_url(redis_url)
    r.delete(*r.keys(mri_clock.SEND_PREFIX + "*"))  # lost before its send progress was kept, too
    r.close()
    (escalation,) = clock_comms(ehr)

    assert pipeline.check_open_clocks(worker(), now + 24 * H) == [PATIENT]  # the deadline: 23 h from now
    events = clock_events(audit_store)
    assert [e["event"] for e in events] == ["started", "escalated", "breached"]
    assert events[1]["communication"] == f"Communication/{escalation['id']}"
    assert events[1]["at"] == escalation["sent"].replace("Z", "+00:00")
    assert len(clock_comms(ehr)) == 2  # the escalation once, and the breach
    assert mri_clock.load(worker(), PATIENT).escalation == f"Communication/{escalation['id']}"


@respx.mock
def test_a_breach_with_no_escalation_ever_written_records_none(worker, audit_store):
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H))
    pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now)
    assert pipeline.check_open_clocks(worker(), now + 24 * H) == [PATIENT]  # no check ran for 24 h
    assert [e["event"] for e in clock_events(audit_store)] == ["started", "breached"]
    (breach,) = clock_comms(ehr)
    assert breach["identifier"][0]["value"].endswith("-breached")


@respx.mock
def test_a_retraction_that_drops_the_tier_closes_the_clock(worker, audit_store):
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H))
    pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now)
    ehr.delete("Observation/neuro")
    assert pipeline.evaluate_patient(worker(), PATIENT, ["Observation/neuro"], {"kind": "test"},
                                     now + H).urgency == "routine"
    assert [(e["event"], e["reason"]) for e in clock_events(audit_store)] == [("started", None),
                                                                             ("closed", "retracted")]
    assert pipeline.check_open_clocks(worker(), now + 5 * H) == [] and clock_comms(ehr) == []


def test_the_beat_checks_open_clocks_at_the_set_interval():
    schedule = beat_schedule(Settings(environment="test", mri_clock_check_interval_seconds=120))
    assert schedule["mri-clock-check"]["task"] == TASK_MRI_CLOCK == "spinewatch.check_mri_clocks"
    assert schedule["mri-clock-check"]["schedule"] == 120.0
    assert "mri-clock-check" not in beat_schedule(Settings(environment="test", mri_clock_check_interval_seconds=0))


def test_the_check_is_a_registered_task():
    from workers import tasks

    assert tasks.check_mri_clocks.name == TASK_MRI_CLOCK
    assert mri_clock.clock_settings(Settings(environment="test")).escalate_after == {
        "emergency": timedelta(hours=4), "urgent": timedelta(hours=48)}


def served_card(store: AuditStore, tier: str, card: str, patient: str = PATIENT, at: datetime | None = None) -> None:
    """The `card` audit record the hook writes when it serves a card (service/usecases/hook.py)."""
    store.append("card", "success", actor="https://ehr.example.org", patient=patient,
                 detail={"service": "spinewatch-patient-view", "hook": "patient-view", "cards": [card],
                         "suggestions": [], "tier": tier, "source": "prefetch"}, at=at)


@respx.mock
def test_a_patient_who_declined_the_mri_closes_the_clock_and_nothing_escalates(worker, audit_store):
    now = datetime.now(timezone.utc)
    ehr = Ehr(record("emergency", now - H))
    pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now)
    (alert,) = ehr.communications()
    card = "0b6f5e3c-2f0a-4c1e-9a57-3c2d7f1e8a90"
    served_card(audit_store, "urgent", "11111111-2222-4333-8444-555555555555")  # another tier's card
    served_card(audit_store, "emergency", card)

    assert pipeline.record_declined(worker(), "11111111-2222-4333-8444-555555555555", now + H, now + H) == []
    assert pipeline.record_declined(worker(), "not-a-card-of-ours", now + H, now + H) == []
    (closed,) = pipeline.record_declined(worker(), card, now + H, now + H)
    assert closed.event == "closed" and closed.reason == "patient-declined"
    assert pipeline.record_declined(worker(), card, now + H, now + 2 * H) == []  # the EHR resent it: once

    assert pipeline.check_open_clocks(worker(), now + 5 * H) == []  # no longer open: never escalates
    pipeline.evaluate_patient(worker(), PATIENT, [], {"kind": "test"}, now + 6 * H)  # same evidence
    assert ehr.communications() == [alert]
    assert [(e["event"], e["reason"]) for e in clock_events(audit_store)] == [
        ("started", None), ("closed", "patient-declined")]

