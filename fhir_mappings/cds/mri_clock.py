"""The MRI clock: after an emergency or urgent assessment, is the whole-spine MRI ordered and done in
time? Pure: state and decisions as functions of (clock, facts, now); no I/O, no clock reads
(workers/pipeline/mri_clock.py keeps the clock in Redis and does the sending).

Deadlines: NICE quality standard QS56, statement 3 (suspected MSCC, NG234 Box 2): whole-spine MRI
within 24 hours; NICE CG75, carried into NG234 (suspected spinal metastasis without MSCC, Box 1):
within 1 week. QS56 measures from the suspicion, so the deadline runs from the first red-flag
evidence of the tier (its own clinical date), not from when SpineWatch saw it; evidence without a
date starts it at the evaluation that found it.

Events (each once per episode, audited as kind `mri-clock`): started, upgraded (urgent -> emergency:
a new episode with the shorter deadline; the urgent one is closed "upgraded"), ordered, done,
escalated (no MRI ordered a set time after the start), breached (the deadline passed without an MRI
done), closed (done, retracted, upgraded, declined, expired).

A patient who declines the MRI (CDS Hooks feedback: the card overridden with reason
`patient-declined`, fhir_mappings/cds/wording.py) closes the episode the card was served for. The
same suspicion on the same evidence then starts nothing; new evidence, or a graver tier, does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta

from fhir_mappings.cds.alerts import communication_base
from fhir_mappings.cds.wording import DEADLINE, PATIENT_DECLINED
from fhir_mappings.clinical.evaluate import completed_mri, is_spine_mri
from fhir_mappings.clinical.extract import read_record
from fhir_mappings.clinical.terminology import Terminology, load_terminology

CLOCK_TIERS = ("emergency", "urgent")
_TIER_OF_BOX = {2: "emergency", 1: "urgent"}  # NG234 Box 2: suspected MSCC; Box 1: suspected metastasis
MRI_CLOCK_ID_SYSTEM = "https://spinewatch.example.org/fhir/NamingSystem/mri-clock"
IMAGING_TYPES = ("ServiceRequest", "ImagingStudy", "DiagnosticReport", "Procedure")
# FHIR R4 request-status: `draft` is not yet actionable, `revoked` and `entered-in-error` never were
# (or no longer are) an order; every other status means someone asked for the MRI.
_NOT_AN_ORDER = {"draft", "revoked", "entered-in-error"}
_OPEN_ORDER = {"active", "on-hold"}
# An escalation or breach is one step more pressing than the alert (FHIR R4 request-priority:
# routine < urgent < asap < stat); the emergency alert is already `stat`.
ESCALATION_PRIORITY = {"emergency": "stat", "urgent": "asap"}
TIER_RANK = {"none": 0, "routine": 1, "urgent": 2, "emergency": 3}
_SENT_FIELDS = {"escalated": ("escalated_at", "escalation"), "breached": ("breached_at", "breach")}


@dataclass(frozen=True)
class ClockSettings:
    escalate_after: dict[str, timedelta]  # tier -> no MRI ordered this long after the start: escalate
    watch_after_deadline: timedelta  # a breached clock is watched for the MRI this long, then expires
    recheck: timedelta  # every open clock re-reads its patient's imaging at least this often


@dataclass(frozen=True)
class MriFact:
    """A spine MRI in the record: `ordered` (a ServiceRequest) or `done` (a study, a final report, a
    completed procedure), dated by the resource itself."""
    reference: str
    state: str
    at: datetime | None
    open_order: bool = False


@dataclass(frozen=True)
class Clock:
    patient: str
    episode: str
    tier: str
    first_evidence_at: datetime
    started_at: datetime
    deadline: datetime
    alerted_at: datetime | None = None
    alert_communication: str | None = None
    alert_recipients: tuple[str, ...] = ()
    ordered_at: datetime | None = None
    order: str | None = None
    done_at: datetime | None = None
    done_by: str | None = None
    escalated_at: datetime | None = None
    escalation: str | None = None  # Communication/<id>
    breached_at: datetime | None = None
    breach: str | None = None  # Communication/<id>, or None: breached before anyone was alerted
    closed_at: datetime | None = None
    close_reason: str | None = None

    @property
    def open(self) -> bool:
        return self.closed_at is None

    def to_fields(self) -> dict[str, str]:
        """The Redis hash: ISO 8601 instants, recipients as JSON, empty fields left out."""
        out = {}
        for name, value in asdict(self).items():
            if value is None or value == ():
                continue
            out[name] = value.isoformat() if isinstance(value, datetime) else \
                json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "Clock":
        kw: dict = {}
        for name, kind in cls.__annotations__.items():
            raw = fields.get(name)
            if raw is None:
                continue
            if "datetime" in kind:
                kw[name] = datetime.fromisoformat(raw)
            elif "tuple" in kind:
                kw[name] = tuple(json.loads(raw))
            else:
                kw[name] = raw
        return cls(**kw)


@dataclass(frozen=True)
class Event:
    """One thing that happened to a clock: what the audit records (kind `mri-clock`). `send`: the
    Communication it needs first (escalated, breached once someone was alerted)."""
    event: str
    clock: Clock
    at: datetime
    reason: str | None = None
    send: bool = False
    communication: str | None = None

    def audit_detail(self) -> dict:
        c = self.clock
        return {"event": self.event, "episode": c.episode, "tier": c.tier,
                "first_evidence_at": c.first_evidence_at.isoformat(),
                "alerted_at": c.alerted_at.isoformat() if c.alerted_at else None,
                "deadline": c.deadline.isoformat(), "at": self.at.isoformat(), "reason": self.reason,
                "communication": self.communication}


@dataclass(frozen=True)
class Assessed:
    """What the clock needs from one evaluation."""
    tier: str
    evidence_dates: dict[str, list[datetime | None]] = field(default_factory=dict)  # tier -> its flags' dates
    retracted: bool = False  # a record an earlier decision rested on was retracted (deleted, entered-in-error)
    alerted_at: datetime | None = None
    alert_communication: str | None = None
    alert_recipients: tuple[str, ...] = ()


# -- facts -------------------------------------------------------------------------------------------

def evidence_dates(assessment, term: Terminology | None = None) -> dict[str, list[datetime | None]]:
    """The dates of the red-flag evidence, by the tier it raises: Box 2 flags -> emergency, Box 1 -> urgent."""
    term = term or load_terminology()
    out: dict[str, list[datetime | None]] = {}
    for e in assessment.evidence:
        box = term.rule(e.concept).box if e.concept in assessment.red_flags else None
        tier = _TIER_OF_BOX.get(box)
        if tier:
            out.setdefault(tier, []).append(e.date)
    return out


def mri_facts(resources: list[dict], term: Terminology | None = None) -> list[MriFact]:
    """The spine MRIs among the resources (value set mri-spine, or an MR ImagingStudy of a spinal
    site, as the suppression rule reads them: fhir_mappings/clinical/evaluate.py)."""
    term = term or load_terminology()
    imaging = [r for r in resources if isinstance(r, dict) and r.get("resourceType") in IMAGING_TYPES]
    out = []
    for item in read_record(imaging, term).items:
        if item.resource_type not in IMAGING_TYPES or not is_spine_mri(term, item):
            continue
        reference = f"{item.resource_type}/{item.resource_id}"
        if item.resource_type == "ServiceRequest":
            if item.status not in _NOT_AN_ORDER:
                out.append(MriFact(reference, "ordered", item.date, item.status in _OPEN_ORDER))
        elif completed_mri(item):
            out.append(MriFact(reference, "done", item.date))
    return out


# -- decisions ---------------------------------------------------------------------------------------

def episode_id(patient: str, tier: str, first_evidence_at: datetime, started_at: datetime) -> str:
    material = json.dumps([patient, tier, first_evidence_at.isoformat(), started_at.isoformat()])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:24]


def first_evidence(dates: list[datetime | None], after: datetime | None, now: datetime) -> datetime:
    """The earliest dated evidence (after `after`, the MRI that answered an earlier episode); none
    dated: now, the evaluation that found it."""
    dated = [d for d in dates if d is not None and d <= now and (after is None or d > after)]
    return min(dated) if dated else now


def start(patient: str, tier: str, assessed: Assessed, previous: Clock | None, now: datetime) -> Clock:
    first = first_evidence(assessed.evidence_dates.get(tier, []), _floor(previous, tier), now)
    return Clock(patient, episode_id(patient, tier, first, now), tier, first, now, first + DEADLINE[tier],
                 assessed.alerted_at, assessed.alert_communication, assessed.alert_recipients)


def _floor(previous: Clock | None, tier: str) -> datetime | None:
    """What a closed episode already covered: evidence up to its MRI (done), or up to its closing
    (expired: watched long enough; declined, for its own tier or a lesser one: the patient has not
    declined an MRI for a graver suspicion); a new episode needs evidence after it. A retraction
    covers nothing."""
    if previous is None:
        return None
    if previous.close_reason == PATIENT_DECLINED:
        return previous.closed_at if TIER_RANK[tier] <= TIER_RANK[previous.tier] else None
    return {"done": previous.done_at, "expired": previous.closed_at}.get(previous.close_reason or "")


def on_evaluation(clock: Clock | None, patient: str, assessed: Assessed, facts: list[MriFact], now: datetime,
                  settings: ClockSettings) -> tuple[Clock | None, list[Event]]:
    """The clock after an evaluation: started, upgraded, closed on a retraction, then watched."""
    events: list[Event] = []
    if clock and clock.open and assessed.retracted and TIER_RANK[assessed.tier] < TIER_RANK[clock.tier]:
        clock = close(clock, "retracted", now)
        events.append(Event("closed", clock, now, "retracted"))
    if assessed.tier in CLOCK_TIERS:
        if clock is None or not clock.open:
            if not _answered(clock, assessed):
                clock = start(patient, assessed.tier, assessed, clock, now)
                events.append(Event("started", clock, now))
        elif TIER_RANK[assessed.tier] > TIER_RANK[clock.tier]:
            old = close(clock, "upgraded", now)
            events.append(Event("closed", old, now, "upgraded"))
            clock = start(patient, assessed.tier, assessed, None, now)
            events.append(Event("upgraded", clock, now, f"upgraded from {old.tier} (episode {old.episode})"))
        elif clock.alerted_at is None and assessed.alerted_at is not None:
            clock = replace(clock, alerted_at=assessed.alerted_at, alert_communication=assessed.alert_communication,
                            alert_recipients=assessed.alert_recipients)
    if clock is None or not clock.open:
        return clock, events
    clock, watched = watch(clock, facts, now, settings)
    return clock, events + watched


def _answered(previous: Clock | None, assessed: Assessed) -> bool:
    """A closed episode already covers all of this evidence: no new episode on it."""
    floor = _floor(previous, assessed.tier)
    if floor is None:
        return False
    return not any(d is not None and d > floor for d in assessed.evidence_dates.get(assessed.tier, []))


def decline(clock: Clock | None, card_tier: str | None, card_served_at: datetime, declined_at: datetime,
            now: datetime) -> tuple[Clock | None, list[Event]]:
    """The patient declined the MRI a card recommended: the open episode that card was about (same
    tier, served since the episode's first evidence) closes `patient-declined` at the decline."""
    if clock is None or not clock.open or card_tier != clock.tier or card_served_at < clock.first_evidence_at:
        return clock, []
    at = min(declined_at, now)  # a client's clock ahead of ours does not close it in the future
    clock = close(clock, PATIENT_DECLINED, at)
    return clock, [Event("closed", clock, at, PATIENT_DECLINED)]


def watch(clock: Clock, facts: list[MriFact], now: datetime, settings: ClockSettings) -> tuple[Clock, list[Event]]:
    """What the MRI facts and the time say: ordered, done (closes it), escalated, breached, expired."""
    events: list[Event] = []
    order = _order(clock, facts)
    if order and clock.ordered_at is None:
        clock = replace(clock, ordered_at=order.at or now, order=order.reference)
        events.append(Event("ordered", clock, order.at or now, order.reference))
    done = _done(clock, facts, now)
    if done:
        clock = replace(clock, done_at=done.at, done_by=done.reference)
        events.append(Event("done", clock, done.at, done.reference))
        clock = close(clock, "done", now)
        events.append(Event("closed", clock, now, "done"))
        return clock, events
    if clock.breached_at is None and now >= clock.deadline:
        # Breached before SpineWatch could alert anyone (evidence older than the window): the
        # alert itself says what to do; the breach is recorded, no second message sent.
        alerted_in_time = clock.alerted_at is not None and clock.alerted_at < clock.deadline
        reason = "no spine MRI done by the deadline" + ("" if alerted_in_time else "; deadline passed before the alert")
        events.append(Event("breached", clock, now, reason, send=alerted_in_time))
    elif clock.breached_at is None and clock.escalated_at is None and clock.ordered_at is None \
            and now >= escalation_due(clock, settings):
        events.append(Event("escalated", clock, now, "no spine MRI ordered", send=True))
    elif clock.breached_at is not None and now >= clock.deadline + settings.watch_after_deadline:
        clock = close(clock, "expired", now)
        events.append(Event("closed", clock, now, "expired"))
    return clock, events


def sent(event: Event, communication: str | None, now: datetime) -> tuple[Clock, Event]:
    """The clock once an escalation or breach was made (its Communication, if any, written)."""
    at, ref = _SENT_FIELDS[event.event]
    clock = replace(event.clock, **{at: now, ref: communication})
    return clock, replace(event, clock=clock, communication=communication)


def unrecorded_escalation(clock: Clock, settings: ClockSettings) -> str | None:
    """At a breach with no escalation recorded though one fell due before the deadline: the
    identifier value an escalation written by a worker lost before it could record it would carry
    (its Communication may be on the EHR); None when none can have been written."""
    if clock.escalated_at is None and escalation_due(clock, settings) < clock.deadline:
        return f"{clock.episode}-escalated"
    return None


def escalation_found(clock: Clock, communication: str, sent_at: datetime) -> tuple[Clock, Event]:
    """The clock and its `escalated` event, for an escalation found written but never recorded."""
    return sent(Event("escalated", clock, sent_at, "no spine MRI ordered", send=True), communication, sent_at)


def close(clock: Clock, reason: str, now: datetime) -> Clock:
    return replace(clock, closed_at=now, close_reason=reason)


def _order(clock: Clock, facts: list[MriFact]) -> MriFact | None:
    """The earliest order for this episode: placed since its first evidence, or still open."""
    mine = [f for f in facts if f.state == "ordered"
            and (f.open_order or (f.at is not None and f.at >= clock.first_evidence_at))]
    return min(mine, key=lambda f: (f.at is None, f.at or clock.started_at, f.reference), default=None)


def _done(clock: Clock, facts: list[MriFact], now: datetime) -> MriFact | None:
    """The earliest MRI done after the episode's first evidence and by now (undated ones cannot be
    placed; one dated later than now is not done yet, as evaluate.py ignores evidence from the future)."""
    mine = [f for f in facts if f.state == "done" and f.at is not None and clock.first_evidence_at < f.at <= now]
    return min(mine, key=lambda f: (f.at, f.reference), default=None)


def escalation_due(clock: Clock, settings: ClockSettings) -> datetime:
    return clock.started_at + settings.escalate_after[clock.tier]


def next_due(clock: Clock, now: datetime, settings: ClockSettings) -> datetime:
    """When the scheduled check should next look at the clock: its next escalation or deadline, and
    at least every `recheck` (to see the MRI ordered or done when no notification says so)."""
    due = [now + settings.recheck]
    if clock.breached_at is None:
        due.append(clock.deadline)
    else:
        due.append(clock.deadline + settings.watch_after_deadline)
    if clock.escalated_at is None and clock.ordered_at is None:
        due.append(escalation_due(clock, settings))
    return max(now, min(due))


# -- the messages --------------------------------------------------------------------------------------

def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M %Z").strip()


def message_text(event: Event) -> str:
    c = event.clock
    what = "suspected spinal cord compression (emergency)" if c.tier == "emergency" else \
        "suspected spinal metastasis (urgent)"
    standard = "NICE QS56 statement 3: within 24 h" if c.tier == "emergency" else "NICE NG234/CG75: within 1 week"
    if event.event == "escalated":
        state = f"no spine MRI ordered since SpineWatch flagged {what} at {_when(c.started_at)}"
    else:
        state = f"no spine MRI done for {what}: the deadline {_when(c.deadline)} has passed"
    return (f"SpineWatch MRI clock: {state}. Whole-spine MRI due by {_when(c.deadline)} ({standard}). "
            "Contact the MSCC coordinator / acute oncology team.")


def communication_id(event: Event) -> str:
    return f"{event.clock.episode}-{event.event}"


def clock_communication(event: Event, recipients: list[str], now: datetime) -> dict:
    """FHIR R4 Communication (category alert), one step more pressing than the alert, inResponseTo it."""
    c = event.clock
    resource = communication_base(MRI_CLOCK_ID_SYSTEM, communication_id(event), ESCALATION_PRIORITY[c.tier], c.patient,
                        recipients, now, [{"contentString": message_text(event)}])
    if c.alert_communication:
        resource["inResponseTo"] = [{"reference": c.alert_communication}]
    return resource


def webhook_body(event: Event, communication_ref: str | None, recipients: list[str], now: datetime) -> bytes:
    """The webhook's escalation or breach: ids, tier, times and references; no free text about the patient."""
    body = {"id": communication_id(event), "type": f"spinewatch.mri-clock.{event.event}"} | event.audit_detail() | {
        "patient": event.clock.patient, "priority": ESCALATION_PRIORITY[event.clock.tier],
        "communication": communication_ref, "recipients": recipients, "sent": now.isoformat()}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")


def escalation_recipients(coordinator: str | None, default: str | None, clock: Clock) -> list[str]:
    """The MSCC coordinator, else the default recipient, else whoever the alert went to."""
    if coordinator:
        return [coordinator]
    if default:
        return [default]
    return list(clock.alert_recipients)
