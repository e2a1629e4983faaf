"""The MRI clock on real parts: a real `spinewatch worker` process and a Celery beat process of its
own (tests/support/fault_stack.py's Stack, as docker-compose.yml runs them), its own redis-server
(append-only, restarted on the same directory), and sekmet-fhir, reached through a pass-through
proxy (tests/support/fhir_proxy.py) that can hold a written Communication's answer back.

Time is the wall clock, driven through the record's dates: the deadline runs from the first red-flag
evidence (NICE QS56 statement 3: whole-spine MRI within 24 h of suspected MSCC), so a leg-weakness
note dated 24 h less a few seconds ago puts the deadline seconds ahead. The escalation is due
ESCALATE_AFTER after the clock started, and the beat checks the open clocks every second: both
short through their settings (SPINEWATCH_MRI_ESCALATE_EMERGENCY_HOURS,
SPINEWATCH_MRI_CLOCK_CHECK_INTERVAL_SECONDS). Each test has a patient of its own on the shared
sekmet, and asserts the Communications written there and the `mri-clock` audit records.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fhir_mappings.cds.alerts import ALERT_ID_SYSTEM
from fhir_mappings.cds.mri_clock import MRI_CLOCK_ID_SYSTEM, Clock
from service.core.settings import Settings
from service.infra.queue import WorkQueue
from tests.support import cds_hooks as ch
from tests.support.fault_stack import Stack, wait_for
from tests.support.fhir_proxy import FhirProxy, Request
from tests.support.sekmet_server import SekmetServer
from tests.support.sekmet_server import create as create_on
from tests.workers.test_alerts_sekmet import communications
from workers.pipeline.mri_clock import CLOCK_PREFIX, OPEN_CLOCKS

pytestmark = pytest.mark.integration
COORDINATOR = "PractitionerRole/mscc-coordinator"
CARE_TEAM_MEMBER = "Practitioner/oncologist"
ESCALATE_AFTER = timedelta(seconds=6)  # no MRI ordered this long after the clock started: escalate
DAY = timedelta(hours=24)
MRI_CODE = {"coding": [{"system": "http://loinc.org", "code": "36400-0"}], "text": "MR Spine"}
DICOM = "http://dicom.nema.org/resources/ontology/DCM"


class ClockStack(Stack):
    """A worker, a beat and a redis-server of their own, on the session's sekmet through the proxy."""

    def __init__(self, run_dir: Path, sekmet: SekmetServer):
        self.sekmet = sekmet
        env = {"SPINEWATCH_MSCC_COORDINATOR": COORDINATOR, "SPINEWATCH_MRI_CLOCK_CHECK_INTERVAL_SECONDS": "1",
               "SPINEWATCH_MRI_ESCALATE_EMERGENCY_HOURS": str(ESCALATE_AFTER / timedelta(hours=1)),
               "SPINEWATCH_COALESCE_SECONDS": "0",
               # a held answer is waited for well past the time the test takes to kill the worker
               "SPINEWATCH_FHIR_TIMEOUT_SECONDS": "10"}
        super().__init__(run_dir, api=False, concurrency=2, env=env, fhir=FhirProxy(sekmet.root_url), beat=True)


@pytest.fixture(scope="module")
def shared_stack(sekmet_server, tmp_path_factory):
    with ClockStack(tmp_path_factory.mktemp("mri-clock"), sekmet_server) as running:
        yield running


@pytest.fixture
def stack(shared_stack):
    """The module's stack, left whole for the next test even when this one failed midway."""
    yield shared_stack
    shared_stack.fhir.release()
    if shared_stack.redis.proc is None or shared_stack.redis.proc.poll() is not None:
        shared_stack.redis.start()
    if shared_stack.worker is None:
        shared_stack.start_worker()


# ---- the record ------------------------------------------------------------------------------------

def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def create(stack: ClockStack, resource: dict) -> dict:
    with stack.sekmet.client() as fhir:
        return create_on(fhir, resource)


def chart(stack: ClockStack, tier: str, evidence_at: datetime) -> str:
    """ch.record's patient on sekmet with a CareTeam, its red-flag evidence dated `evidence_at` (the
    leg-weakness note for an emergency, the thoracic back pain's onset for urgent)."""
    pid = create(stack, {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": uuid.uuid4().hex}]})["id"]
    for resource in ch.record(tier, pid)[1:]:
        resource = {k: v for k, v in resource.items() if k != "id"}
        if tier == "emergency" and resource["resourceType"] == "Observation":
            resource["effectiveDateTime"] = iso(evidence_at)
        if tier == "urgent" and resource["code"]["coding"][0]["code"] == "M54.6":
            resource["onsetDateTime"] = iso(evidence_at)
        create(stack, resource)
    create(stack, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{pid}"},
                   "participant": [{"member": {"reference": CARE_TEAM_MEMBER}}]})
    return f"Patient/{pid}"


def leg_weakness(patient: str, at: datetime) -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "Clinical note"},
            "subject": {"reference": patient}, "effectiveDateTime": iso(at),
            "valueString": "New bilateral leg weakness since yesterday."}


def mri_order(patient: str, at: datetime) -> dict:
    return {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "stat",
            "code": MRI_CODE, "subject": {"reference": patient}, "authoredOn": iso(at)}


def mri_study(patient: str, at: datetime) -> dict:
    return {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": patient},
            "started": iso(at), "modality": [{"system": DICOM, "code": "MR"}],
            "series": [{"uid": "1.2.826.0.1." + str(uuid.uuid4().int)[:20], "modality": {"system": DICOM, "code": "MR"},
                        "bodySite": {"system": "http://snomed.info/sct", "code": "421060004", "display": "Spine"}}]}


# ---- the worker's side -----------------------------------------------------------------------------

def evaluate(stack: ClockStack, patient: str) -> None:
    """Queue an evaluation, as the notification intake does (a queue of its own each time: the
    producer's pooled connection does not outlive a Redis restart)."""
    queue = WorkQueue(Settings(environment="test", redis_url=stack.redis.url, coalesce_seconds=0))
    try:
        assert queue.schedule_evaluation(patient, trigger={"kind": "test"}) == "queued"
    finally:
        queue.redis.close()


def alerts(stack: ClockStack, patient: str) -> list[dict]:
    return [c for c in communications(stack.sekmet, patient) if c["identifier"][0]["system"] == ALERT_ID_SYSTEM]


def clock_comms(stack: ClockStack, patient: str) -> list[dict]:
    return [c for c in communications(stack.sekmet, patient) if c["identifier"][0]["system"] == MRI_CLOCK_ID_SYSTEM]


def events(stack: ClockStack, patient: str) -> list[dict]:
    return [r.detail for r in stack.audit_records("mri-clock", patient)]


def clock(stack: ClockStack, patient: str) -> Clock:
    client = stack.redis_client()
    try:
        return Clock.from_fields(client.hgetall(CLOCK_PREFIX + patient))
    finally:
        client.close()


def due_at(stack: ClockStack, patient: str) -> datetime | None:
    """When the beat's check next looks at the clock (rewritten by every check of an open clock)."""
    client = stack.redis_client()
    try:
        score = client.zscore(OPEN_CLOCKS, patient)
    finally:
        client.close()
    return None if score is None else datetime.fromtimestamp(score / 1000, timezone.utc)


def until(stack: ClockStack, what: str, check, timeout: float = 30.0):
    """fault_stack.wait_for, with the processes' logs in the failure."""
    try:
        return wait_for(check, timeout, what, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()[-4000:]}") from None


def event_names(stack: ClockStack, patient: str) -> list[str]:
    return [e["event"] for e in events(stack, patient)]


def reached(stack: ClockStack, patient: str, *names: str):
    return lambda: event_names(stack, patient)[:len(names)] == list(names)


def assert_sent(comm: dict, clock_: Clock, event: str, alert: dict) -> None:
    """An emergency's escalation or breach: stat (as its alert: FHIR R4 request-priority has nothing
    higher), to the MSCC coordinator, identified by its episode, in response to the alert."""
    assert comm["priority"] == "stat" and comm["status"] == "completed"
    assert comm["recipient"] == [{"reference": COORDINATOR}]
    assert comm["identifier"] == [{"system": MRI_CLOCK_ID_SYSTEM, "value": f"{clock_.episode}-{event}"}]
    assert comm["inResponseTo"] == [{"reference": f"Communication/{alert['id']}"}]


# ---- the scenarios ---------------------------------------------------------------------------------

def test_an_mri_ordered_and_done_in_time_closes_the_clock_with_nothing_sent(stack):
    evidence = datetime.now(timezone.utc).replace(microsecond=0) - DAY + timedelta(seconds=10)
    patient = chart(stack, "emergency", evidence)
    evaluate(stack, patient)
    (alert,) = until(stack, "the emergency alert", lambda: alerts(stack, patient))
    assert alert["priority"] == "stat" and alert["recipient"] == [{"reference": CARE_TEAM_MEMBER}]

    ordered_at = datetime.now(timezone.utc).replace(microsecond=0)
    order = create(stack, mri_order(patient, ordered_at))  # before the escalation is due
    until(stack, "the order seen by the check", reached(stack, patient, "started", "ordered"))
    study = create(stack, mri_study(patient, ordered_at + timedelta(seconds=1)))
    until(stack, "the clock closed", reached(stack, patient, "started", "ordered", "done", "closed"))

    closed = clock(stack, patient)
    assert (closed.close_reason, closed.order, closed.done_by) == \
        ("done", f"ServiceRequest/{order['id']}", f"ImagingStudy/{study['id']}")
    assert closed.first_evidence_at == evidence and closed.deadline == evidence + DAY
    assert due_at(stack, patient) is None  # no longer checked
    wait_for(lambda: datetime.now(timezone.utc) > closed.deadline + timedelta(seconds=2), 30, "past the deadline")
    assert clock_comms(stack, patient) == [] and alerts(stack, patient) == [alert]
    # nothing escalated or breached past the deadline
    assert event_names(stack, patient) == ["started", "ordered", "done", "closed"]
    started, ordered, done, closing = events(stack, patient)
    assert (started["tier"], started["deadline"], started["first_evidence_at"]) == \
        ("emergency", (evidence + DAY).isoformat(), evidence.isoformat())
    assert (ordered["reason"], ordered["at"]) == (f"ServiceRequest/{order['id']}", ordered_at.isoformat())
    assert (done["reason"], closing["reason"]) == (f"ImagingStudy/{study['id']}", "done")
    assert {e["episode"] for e in (started, ordered, done, closing)} == {closed.episode}


def test_an_order_without_a_scan_breaches_without_escalating(stack):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    evidence = now - DAY + ESCALATE_AFTER + timedelta(seconds=4)  # the deadline after the escalation's time
    patient = chart(stack, "emergency", evidence)
    order = create(stack, mri_order(patient, now - timedelta(minutes=1)))
    evaluate(stack, patient)
    (alert,) = until(stack, "the emergency alert", lambda: alerts(stack, patient))
    until(stack, "the breach", reached(stack, patient, "started", "ordered", "breached"), timeout=40)

    (breach,) = clock_comms(stack, patient)
    breached = clock(stack, patient)
    assert_sent(breach, breached, "breached", alert)
    assert "the deadline" in breach["payload"][0]["contentString"]
    assert (breached.order, breached.escalated_at, breached.breach) == \
        (f"ServiceRequest/{order['id']}", None, f"Communication/{breach['id']}")
    assert breached.open  # still watched for the MRI (SPINEWATCH_MRI_CLOCK_WATCH_DAYS)
    started, _, breached_event = events(stack, patient)
    assert breached_event["communication"] == f"Communication/{breach['id']}"
    assert breached_event["reason"] == "no spine MRI done by the deadline"
    assert datetime.fromisoformat(breached_event["at"]) >= evidence + DAY
    assert started["alerted_at"] == breached.alerted_at.isoformat()


def test_an_upgrade_closes_the_urgent_episode_and_counts_24_hours_from_the_emergency_evidence(stack):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    back_pain_at, weakness_at = now - timedelta(days=2), now - timedelta(hours=3)
    patient = chart(stack, "urgent", back_pain_at)
    evaluate(stack, patient)
    until(stack, "the urgent clock", reached(stack, patient, "started"))
    create(stack, leg_weakness(patient, weakness_at))
    evaluate(stack, patient)
    until(stack, "the upgrade", reached(stack, patient, "started", "closed", "upgraded"))

    urgent, closed, upgraded = events(stack, patient)[:3]
    assert (urgent["tier"], closed["tier"], closed["episode"]) == ("urgent", "urgent", urgent["episode"])
    assert closed["reason"] == "upgraded" and urgent["deadline"] == (back_pain_at + timedelta(days=7)).isoformat()
    assert upgraded["tier"] == "emergency" and upgraded["episode"] != urgent["episode"]
    assert upgraded["first_evidence_at"] == weakness_at.isoformat()
    assert upgraded["deadline"] == (weakness_at + DAY).isoformat()
    urgent_alert, emergency_alert = sorted(alerts(stack, patient), key=lambda a: a["sent"])
    assert (urgent_alert["priority"], emergency_alert["priority"]) == ("urgent", "stat")
    # The new episode runs: its escalation comes ESCALATE_AFTER later, under its own identifier.
    (escalation,) = until(stack, "the emergency escalation", lambda: clock_comms(stack, patient))
    running = clock(stack, patient)
    assert running.episode == upgraded["episode"] and running.deadline == weakness_at + DAY
    assert_sent(escalation, running, "escalated", emergency_alert)


def test_nothing_ordered_escalates_once_then_breaches_once_across_worker_and_redis_restarts(stack):
    evidence = datetime.now(timezone.utc).replace(microsecond=0) - DAY + timedelta(seconds=28)
    patient = chart(stack, "emergency", evidence)
    evaluate(stack, patient)
    (alert,) = until(stack, "the emergency alert", lambda: alerts(stack, patient))
    until(stack, "the clock", reached(stack, patient, "started"))
    stack.redis.restart()  # SIGTERM; the append-only file keeps the clock and its due time

    (escalation,) = until(stack, "the escalation", lambda: clock_comms(stack, patient))
    until(stack, "the escalation recorded", reached(stack, patient, "started", "escalated"))
    stack.stop_worker()  # warm shutdown
    stack.redis.proc.send_signal(signal.SIGKILL)  # and a Redis crash while it is down (appendfsync always)
    stack.redis.proc.wait(5)
    stack.redis.start()
    back = datetime.now(timezone.utc)
    stack.start_worker()
    checked = until(stack, "a check by the restarted worker", lambda: (d := due_at(stack, patient)) and
                    d > back + timedelta(seconds=1) and d)
    assert checked - timedelta(seconds=1) < evidence + DAY, "the restarted worker first checked after the deadline"
    assert event_names(stack, patient) == ["started", "escalated"] and len(clock_comms(stack, patient)) == 1

    until(stack, "the breach", reached(stack, patient, "started", "escalated", "breached"), timeout=60)
    comms = clock_comms(stack, patient)
    assert len(comms) == 2 and len(alerts(stack, patient)) == 1
    (breach,) = [c for c in comms if c["id"] != escalation["id"]]
    final = clock(stack, patient)
    assert_sent(escalation, final, "escalated", alert)
    assert_sent(breach, final, "breached", alert)
    assert "no spine MRI ordered" in escalation["payload"][0]["contentString"]
    assert (final.escalation, final.breach) == (f"Communication/{escalation['id']}", f"Communication/{breach['id']}")
    started, escalated, breached = events(stack, patient)
    assert escalated["communication"] == final.escalation and breached["communication"] == final.breach
    assert datetime.fromisoformat(escalated["at"]) >= datetime.fromisoformat(started["at"]) + ESCALATE_AFTER
    assert stack.dead_letters() == []


def escalation_create(request: Request) -> bool:
    if request.method != "POST" or not request.path.startswith("/fhir/Communication"):
        return False
    (ident,) = json.loads(request.body)["identifier"]
    return ident["system"] == MRI_CLOCK_ID_SYSTEM and ident["value"].endswith("-escalated")


def test_a_worker_killed_after_writing_the_escalation_writes_it_once(stack):
    proxy: FhirProxy = stack.fhir
    patient = chart(stack, "emergency", datetime.now(timezone.utc) - timedelta(hours=1))
    proxy.hold_answer(escalation_create)
    evaluate(stack, patient)
    (alert,) = until(stack, "the emergency alert", lambda: alerts(stack, patient))
    until(stack, "the escalation written on sekmet", proxy.held.is_set)
    stack.kill_worker()  # SIGKILL, its answer still held: the clock never learns it was sent
    (written,) = clock_comms(stack, patient)
    assert clock(stack, patient).escalated_at is None and event_names(stack, patient) == ["started"]

    proxy.release()
    client = stack.redis_client()
    try:  # the dead worker's clock lock lapses (after workers/alerts.py LOCK_SECONDS, 120 s): now
        assert client.expire(CLOCK_PREFIX + patient + ":lock", 1)
    finally:
        client.close()
    stack.start_worker()
    until(stack, "the retried escalation recorded", reached(stack, patient, "started", "escalated"), timeout=40)
    assert clock_comms(stack, patient) == [written]
    recorded = clock(stack, patient)
    assert_sent(written, recorded, "escalated", alert)
    assert recorded.escalation == f"Communication/{written['id']}" == events(stack, patient)[1]["communication"]


def test_a_patient_who_declined_the_mri_closes_the_clock_through_the_real_task(stack):
    """CDS Hooks feedback 'patient-declined' reaches the worker as the task the feedback route sends
    (by name, through Redis); the worker finds the card's audit record and closes the episode."""
    from service.infra.audit.store import store_for
    from service.infra.queue.keys import TASK_MRI_DECLINED

    patient = chart(stack, "emergency", datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1))
    evaluate(stack, patient)
    (alert,) = until(stack, "the emergency alert", lambda: alerts(stack, patient))
    until(stack, "the clock started", reached(stack, patient, "started"))
    card = str(uuid.uuid4())
    store = store_for(stack.env["SPINEWATCH_AUDIT_DB_URL"])
    try:  # the record the hook writes when it serves the emergency card (service/usecases/hook.py)
        store.append("card", "success", actor="https://ehr.example.org", patient=patient,
                     detail={"hook": "patient-view", "cards": [card], "suggestions": [], "tier": "emergency"})
    finally:
        store.dispose()
    queue = WorkQueue(Settings(environment="test", redis_url=stack.redis.url))
    try:
        queue.send(TASK_MRI_DECLINED, (card, datetime.now(timezone.utc).isoformat()))
    finally:
        queue.redis.close()
    until(stack, "the clock closed as declined", reached(stack, patient, "started", "closed"))
    assert events(stack, patient)[1]["reason"] == "patient-declined" and clock(stack, patient).open is False
    assert due_at(stack, patient) is None
    # past the escalation's time (the beat checks every second): nothing more is sent or recorded
    time.sleep(max(0.0, (clock(stack, patient).started_at + ESCALATE_AFTER + timedelta(seconds=3)
                         - datetime.now(timezone.utc)).total_seconds()))
    assert clock_comms(stack, patient) == [] and alerts(stack, patient) == [alert]
    assert event_names(stack, patient) == ["started", "closed"]
