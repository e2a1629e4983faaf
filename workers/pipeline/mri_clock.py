"""The MRI clock's store and I/O (the decisions: fhir_mappings/cds/mri_clock.py; docs/alerts.md,
"The MRI clock").

    after_evaluation   every evaluation: start / upgrade / close the patient's clock, and watch it
                       with the spine MRI orders and studies the evaluation read
    check_open_clocks  the scheduled check (SPINEWATCH_MRI_CLOCK_CHECK_INTERVAL_SECONDS): each open
                       clock that is due re-reads its patient's orders and imaging, then escalates
                       or breaches when its time has come
    record_declined    CDS Hooks feedback that the patient declined the MRI a card recommended:
                       the card's `card` audit record names the patient and tier; that episode closes

Redis (the queue's Redis: appendonly, checked at worker start by check_redis_durability, so a
clock survives a Redis restart as well as a worker's):
    spinewatch:mri-clock:<Patient/id>      hash: the clock (Clock.to_fields), kept
                                           SPINEWATCH_ALERT_DEDUP_DAYS after its last change
    spinewatch:mri-clocks                  zset: open clocks' patients by next due time (ms)
    spinewatch:mri-clock-send:<id>         hash: an escalation's / breach's progress (communication,
                                           recipients, webhook), so a retry never sends a channel twice

Each clock is changed under a per-patient lock. An escalation or breach Communication is a
conditional create on its identifier (`<episode>-escalated`), written before the clock records it:
a worker that dies in between finds it on the retry instead of writing a second one. The audit
records (kind `mri-clock`) follow the clock's write.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta

import structlog

from fhir_mappings.cds.alerts import alert_id, alert_input, if_none_exist
from fhir_mappings.cds.wording import DEADLINE
from fhir_mappings.cds.mri_clock import (CLOCK_TIERS, IMAGING_TYPES, MRI_CLOCK_ID_SYSTEM, Assessed, Clock,
                                         ClockSettings, Event, clock_communication, communication_id, decline,
                                         escalation_found, escalation_recipients, evidence_dates, mri_facts, next_due,
                                         on_evaluation, sent, unrecorded_escalation, watch, webhook_body)
from fhir_mappings.fhir.bundle import patient_key
from service.core.errors import AlertError
from service.infra.audit.records import utc_iso
from workers.alerts import (ACTOR, KEY_PREFIX, ClientAdapter, created_ref, fhir_call, hgetall, acquire_lock,
                            post_signed, redis_call, release_lock)
from workers.pipeline.collaborators import Collaborators
from workers.pipeline.record import fhir_instant

log = structlog.get_logger("spinewatch.mri_clock")
CLOCK_PREFIX = "spinewatch:mri-clock:"
OPEN_CLOCKS = "spinewatch:mri-clocks"
SEND_PREFIX = "spinewatch:mri-clock-send:"
MAX_CHECKS_PER_RUN = 200  # one run's FHIR reads stay bounded; the rest stay due for the next run


def clock_settings(settings) -> ClockSettings:
    return ClockSettings(
        escalate_after={"emergency": timedelta(hours=settings.mri_escalate_emergency_hours),
                        "urgent": timedelta(hours=settings.mri_escalate_urgent_hours)},
        watch_after_deadline=timedelta(days=settings.mri_clock_watch_days),
        recheck=timedelta(seconds=settings.mri_clock_check_interval_seconds))


def after_evaluation(c: Collaborators, assessment, resources: list[dict], retracted: bool,
                     now: datetime) -> list[Event]:
    """The clock after one evaluation (its tier, its evidence dates, the MRI records it read)."""
    patient = assessment.patient
    if assessment.urgency not in CLOCK_TIERS and load(c, patient) is None:
        return []  # most evaluations: no clock, none to start (no lock taken, no imaging parsed)
    assessed = Assessed(assessment.urgency, evidence_dates(assessment), retracted, *_alert_sent(c, assessment))
    facts = mri_facts(resources)
    with _patient_lock(c, patient):
        stored = load(c, patient)
        clock, events = on_evaluation(stored, patient, assessed, facts, now, clock_settings(c.settings))
        return _commit(c, clock, events, now) if events or clock != stored else []


def check_open_clocks(c: Collaborators, now: datetime) -> list[str]:
    """The scheduled check: each open clock due by now, its patient's MRI records re-read. A clock
    that cannot be checked now (FHIR or Redis unavailable, its lock held) stays due for the next run."""
    due = redis_call(c.alert_redis.zrangebyscore, OPEN_CLOCKS, "-inf", _ms(now), start=0, num=MAX_CHECKS_PER_RUN)
    checked = []
    for raw in due:
        patient = raw.decode() if isinstance(raw, bytes) else raw
        try:
            check_clock(c, patient, now)
        except AlertError as exc:
            log.warning("mri_clock.check_failed", error=type(exc).__name__)
            continue
        checked.append(patient)
    return checked


def check_clock(c: Collaborators, patient: str, now: datetime) -> list[Event]:
    with _patient_lock(c, patient):
        clock = load(c, patient)
        if clock is None or not clock.open:
            redis_call(c.alert_redis.zrem, OPEN_CLOCKS, patient)
            return []
        clock, events = watch(clock, mri_facts(read_imaging(c, clock)), now, clock_settings(c.settings))
        return _commit(c, clock, events, now)


def record_declined(c: Collaborators, card: str, declined_at: datetime, now: datetime) -> list[Event]:
    """The patient declined the MRI the card `card` (its uuid) recommended: close the open episode it
    was served for. The card is found by its `card` audit record (CDS Hooks feedback names only the
    card); one that is not there (not ours, or the audit log is off) changes nothing."""
    # An episode lasts at most its deadline and the watch after it: an older card was about no open one.
    since = utc_iso(now - DEADLINE["urgent"] - timedelta(days=c.settings.mri_clock_watch_days))
    served = c.audit.store.find_card(card, since) if c.audit.enabled else None
    if served is None or not served.patient:
        log.warning("mri_clock.declined_card_unknown", audit_enabled=c.audit.enabled)
        return []
    with _patient_lock(c, served.patient):
        clock, events = decline(load(c, served.patient), (served.detail or {}).get("tier"),
                                datetime.fromisoformat(served.recorded), declined_at, now)
        return _commit(c, clock, events, now) if events else []


def read_imaging(c: Collaborators, clock: Clock) -> list[dict]:
    """The patient's spine MRI candidates: every ServiceRequest (an order placed before the
    evidence may still be open), and the studies, reports and procedures changed since the
    episode's first evidence (one done since must have been written since)."""
    patient_id = clock.patient.split("/", 1)[1]
    since = "ge" + fhir_instant(clock.first_evidence_at)
    found: list[dict] = []
    for rtype in IMAGING_TYPES:
        params = {"patient": patient_id} | ({} if rtype == "ServiceRequest" else {"_lastUpdated": since})
        found += fhir_call(c.fhir.search_all, rtype, params)
    # A server may ignore `patient` (FHIR R4 §3.1.1.4): another patient's MRI never closes this clock.
    return [r for r in found if patient_key(r) == clock.patient]


def load(c: Collaborators, patient: str) -> Clock | None:
    fields = hgetall(c.alert_redis, CLOCK_PREFIX + patient)
    return Clock.from_fields(fields) if fields else None


def _commit(c: Collaborators, clock: Clock | None, events: list[Event], now: datetime) -> list[Event]:
    """Send what the events need, store the clock (and its due time), then audit the events."""
    made = []
    for event in events:
        if event.event == "breached":
            escalated, event = _recover_escalation(c, event)
            made += escalated
        if event.event in ("escalated", "breached"):
            clock, event = sent(event, _send(c, event, now) if event.send else None, now)
        made.append(event)
    if clock is not None:
        _save(c, clock, now)
    for event in made:
        c.audit.event("mri-clock", "success", actor=ACTOR, patient=event.clock.patient, detail=event.audit_detail())
        log.info("mri_clock.event", mri_event=event.event, episode=event.clock.episode, tier=event.clock.tier)
    return made


def _recover_escalation(c: Collaborators, breach: Event) -> tuple[list[Event], Event]:
    """A worker lost after writing an escalation and before recording it, whose retry comes only
    after the deadline: the escalation is on the EHR (its identifier says so) and recorded now,
    before the breach, so the audit and the report count it. One search, and only at such a breach."""
    ident = unrecorded_escalation(breach.clock, clock_settings(c.settings))
    if ident is None:
        return [], breach
    found = fhir_call(c.fhir.search_all, "Communication", {"identifier": f"{MRI_CLOCK_ID_SYSTEM}|{ident}"})
    written = next((r for r in found if r.get("id") and patient_key(r) == breach.clock.patient), None)
    if written is None:
        return [], breach
    sent_at = datetime.fromisoformat(written["sent"].replace("Z", "+00:00")) if written.get("sent") else breach.at
    clock, escalated = escalation_found(breach.clock, f"Communication/{written['id']}", sent_at)
    return [escalated], replace(breach, clock=clock)


def _save(c: Collaborators, clock: Clock, now: datetime) -> None:
    key = CLOCK_PREFIX + clock.patient
    pipe = c.alert_redis.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping=clock.to_fields())
    pipe.expire(key, c.settings.alert_dedup_days * 86400)
    if clock.open:
        pipe.zadd(OPEN_CLOCKS, {clock.patient: _ms(next_due(clock, now, clock_settings(c.settings)))})
    else:
        pipe.zrem(OPEN_CLOCKS, clock.patient)
    redis_call(pipe.execute)


def _send(c: Collaborators, event: Event, now: datetime) -> str | None:
    """The escalation's or breach's Communication (and webhook), once: its reference, or None when
    there is no one to tell (no coordinator, no default recipient, an alert that named no one)."""
    ident = communication_id(event)
    key, r = SEND_PREFIX + ident, c.alert_redis
    state = hgetall(r, key)
    if not state.get("communication"):
        recipients = escalation_recipients(c.settings.mscc_coordinator, c.settings.alert_default_recipient,
                                           event.clock)
        if not recipients:
            log.warning("mri_clock.no_recipient", episode=event.clock.episode, mri_event=event.event)
            return None
        created = fhir_call(ClientAdapter(c.fhir).create, clock_communication(event, recipients, now),
                             if_none_exist=if_none_exist(ident, MRI_CLOCK_ID_SYSTEM))
        state |= {"communication": created_ref(created), "recipients": json.dumps(recipients)}
        redis_call(r.hset, key, mapping=state)
        redis_call(r.expire, key, c.settings.alert_dedup_days * 86400)
    if c.settings.alert_webhook_url and not state.get("webhook"):
        body = webhook_body(event, state["communication"], json.loads(state["recipients"]), now)
        post_signed(c.settings, body, ident, None)
        redis_call(r.hset, key, "webhook", now.isoformat())
    return state["communication"]


def _alert_sent(c: Collaborators, assessment) -> tuple[datetime | None, str | None, tuple[str, ...]]:
    """When the assessment's alert went, as Communication, to whom (workers/alerts.py's record)."""
    alert = alert_input(assessment)
    if alert is None:
        return None, None, ()
    state = hgetall(c.alert_redis, KEY_PREFIX + alert_id(alert))
    if not state.get("sent"):
        return None, None, ()
    return (datetime.fromisoformat(state["sent"]), state.get("communication"),
            tuple(json.loads(state.get("recipients") or "[]")))


class _patient_lock:
    """The clock's lock (AlertRetry when another worker holds it: it is changing this clock now)."""

    def __init__(self, c: Collaborators, patient: str):
        self.r, self.key = c.alert_redis, CLOCK_PREFIX + patient

    def __enter__(self):
        self.lock_key, self.token = acquire_lock(self.r, self.key, "MRI clock")

    def __exit__(self, *exc):
        release_lock(self.r, self.lock_key, self.token)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)
