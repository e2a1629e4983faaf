"""The MRI clock's pure state machine (fhir_mappings/cds/mri_clock.py): every transition, with an
injected `now` (NICE QS56 statement 3: 24 h for suspected MSCC; CG75/NG234: 1 week otherwise)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fhir_mappings.cds import mri_clock as mc
from fhir_mappings.cds.mri_clock import Assessed, Clock, ClockSettings, MriFact
from fhir_mappings.clinical.evaluate import assess
from tests.support import cds_hooks as ch

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)  # the evaluation that flags the patient
EVIDENCE = T0 - timedelta(hours=2)  # the note that raised the Box 2 flag
PATIENT = "Patient/p1"
SETTINGS = ClockSettings({"emergency": timedelta(hours=4), "urgent": timedelta(hours=48)}, timedelta(days=30),
                         timedelta(minutes=5))
H = timedelta(hours=1)


def assessed(tier="emergency", dates=None, **kw) -> Assessed:
    kw.setdefault("alerted_at", T0)
    kw.setdefault("alert_communication", "Communication/alert-1")
    kw.setdefault("alert_recipients", ("Practitioner/onc",))
    return Assessed(tier, {tier: [EVIDENCE]} if dates is None else dates, **kw)


def started(tier="emergency", **kw) -> Clock:
    clock, events = mc.on_evaluation(None, PATIENT, assessed(tier, **kw), [], T0, SETTINGS)
    assert [e.event for e in events] == ["started"]
    return clock


def names(events) -> list[str]:
    return [e.event for e in events]


def test_an_emergency_starts_a_24_hour_clock_from_its_first_evidence():
    clock = started()
    assert clock.first_evidence_at == EVIDENCE and clock.started_at == T0
    assert clock.deadline == EVIDENCE + timedelta(hours=24)
    assert clock.alerted_at == T0 and clock.alert_communication == "Communication/alert-1"


def test_an_urgent_clock_runs_one_week_and_undated_evidence_starts_it_now():
    assert started("urgent").deadline == EVIDENCE + timedelta(days=7)
    undated = started("urgent", dates={"urgent": [None]})
    assert undated.first_evidence_at == T0 and undated.deadline == T0 + timedelta(days=7)


def test_routine_and_none_start_nothing():
    for tier in ("routine", "none"):
        assert mc.on_evaluation(None, PATIENT, assessed(tier, dates={}), [], T0, SETTINGS) == (None, [])


def test_the_same_episode_is_not_started_twice():
    clock = started()
    again, events = mc.on_evaluation(clock, PATIENT, assessed(), [], T0 + H, SETTINGS)
    assert events == [] and again == clock


def test_no_order_escalates_once_at_the_set_time_and_not_before():
    clock = started()
    _, events = mc.watch(clock, [], T0 + 4 * H - timedelta(seconds=1), SETTINGS)
    assert events == []
    _, (event,) = mc.watch(clock, [], T0 + 4 * H, SETTINGS)
    assert event.event == "escalated" and event.send and event.reason == "no spine MRI ordered"
    escalated, event = mc.sent(event, "Communication/esc", T0 + 4 * H)
    assert escalated.escalated_at == T0 + 4 * H and event.communication == "Communication/esc"
    _, later = mc.watch(escalated, [], T0 + 5 * H, SETTINGS)
    assert later == []


def test_an_order_in_time_means_no_escalation_and_is_dated_by_the_order():
    order = MriFact("ServiceRequest/mri", "ordered", T0 + H, open_order=True)
    clock, (event,) = mc.watch(started(), [order], T0 + 2 * H, SETTINGS)
    assert event.event == "ordered" and event.at == T0 + H and event.reason == "ServiceRequest/mri"
    assert clock.ordered_at == T0 + H
    _, events = mc.watch(clock, [order], T0 + 6 * H, SETTINGS)
    assert events == []  # ordered once; no escalation past 4 h


def test_an_old_closed_order_is_not_this_episodes_order_but_an_open_one_is():
    old = MriFact("ServiceRequest/old", "ordered", EVIDENCE - timedelta(days=40), open_order=False)
    assert mc.watch(started(), [old], T0 + H, SETTINGS)[1] == []
    still_open = MriFact("ServiceRequest/old", "ordered", EVIDENCE - timedelta(days=40), open_order=True)
    assert names(mc.watch(started(), [still_open], T0 + H, SETTINGS)[1]) == ["ordered"]


def test_an_mri_done_closes_the_clock_and_one_done_before_the_evidence_does_not():
    before = MriFact("ImagingStudy/old", "done", EVIDENCE - H)
    assert mc.watch(started(), [before], T0 + H, SETTINGS)[1] == []
    assert mc.watch(started(), [MriFact("ImagingStudy/next", "done", T0 + 2 * H)], T0 + H, SETTINGS)[1] == []
    done = MriFact("ImagingStudy/mri", "done", T0 + 3 * H)
    clock, events = mc.watch(started(), [done], T0 + 5 * H, SETTINGS)
    assert names(events) == ["done", "closed"]
    assert events[0].at == T0 + 3 * H and events[1].reason == "done"
    assert not clock.open and clock.close_reason == "done" and clock.done_at == T0 + 3 * H


def test_the_deadline_passing_breaches_once_then_expires_after_the_watch():
    clock = started()
    deadline = clock.deadline
    clock, (event,) = mc.watch(clock, [], deadline, SETTINGS)
    assert event.event == "breached" and event.send and event.reason == "no spine MRI done by the deadline"
    clock, _ = mc.sent(event, "Communication/breach", deadline)
    assert clock.breached_at == deadline and clock.escalated_at is None
    assert mc.watch(clock, [], deadline + H, SETTINGS)[1] == []  # no escalation after a breach, no second breach
    done_late = MriFact("DiagnosticReport/mri", "done", deadline + 2 * H)
    assert names(mc.watch(clock, [done_late], deadline + 3 * H, SETTINGS)[1]) == ["done", "closed"]
    expired, (closing,) = mc.watch(clock, [], deadline + timedelta(days=30), SETTINGS)
    assert closing.event == "closed" and closing.reason == "expired" and not expired.open


def test_an_order_without_a_scan_still_breaches():
    order = MriFact("ServiceRequest/mri", "ordered", T0 + H, open_order=True)
    clock, _ = mc.watch(started(), [order], T0 + 2 * H, SETTINGS)
    _, (event,) = mc.watch(clock, [order], clock.deadline, SETTINGS)
    assert event.event == "breached"


def test_a_deadline_already_past_when_alerted_is_recorded_without_a_second_message():
    old = T0 - timedelta(days=3)
    clock, (start, event) = mc.on_evaluation(None, PATIENT, assessed(dates={"emergency": [old]}), [], T0, SETTINGS)
    assert start.event == "started" and clock.deadline == old + timedelta(hours=24) < T0
    assert event.event == "breached" and not event.send
    assert event.reason == "no spine MRI done by the deadline; deadline passed before the alert"


def test_an_upgrade_closes_the_urgent_episode_and_starts_a_24_hour_one():
    urgent = started("urgent")
    box2 = T0 + 10 * H
    now = T0 + 11 * H
    both = {"urgent": [EVIDENCE], "emergency": [box2]}
    clock, events = mc.on_evaluation(urgent, PATIENT, assessed("emergency", both), [], now, SETTINGS)
    assert names(events) == ["closed", "upgraded"]
    assert events[0].clock.episode == urgent.episode and events[0].reason == "upgraded"
    assert clock.tier == "emergency" and clock.episode != urgent.episode
    assert clock.deadline == box2 + timedelta(hours=24) < urgent.deadline
    assert events[1].reason == f"upgraded from urgent (episode {urgent.episode})"
    assert mc.escalation_due(clock, SETTINGS) == now + 4 * H


def test_a_retraction_dropping_the_tier_closes_it_and_a_drop_without_one_does_not():
    clock = started()
    closed, (event,) = mc.on_evaluation(clock, PATIENT, assessed("routine", {}, retracted=True), [], T0 + H, SETTINGS)
    assert event.event == "closed" and event.reason == "retracted" and not closed.open
    kept, events = mc.on_evaluation(clock, PATIENT, assessed("routine", {}), [], T0 + H, SETTINGS)
    assert kept.open and events == []


def test_a_retraction_from_emergency_to_urgent_closes_and_starts_an_urgent_episode():
    clock = started()
    now = T0 + H
    after, events = mc.on_evaluation(clock, PATIENT, assessed("urgent", retracted=True), [], now, SETTINGS)
    assert names(events) == ["closed", "started"] and after.tier == "urgent"


def test_after_a_done_mri_the_same_evidence_starts_nothing_and_new_evidence_a_new_episode():
    done = MriFact("ImagingStudy/mri", "done", T0 + 3 * H)
    clock, _ = mc.watch(started(), [done], T0 + 4 * H, SETTINGS)
    same, events = mc.on_evaluation(clock, PATIENT, assessed(), [done], T0 + 5 * H, SETTINGS)
    assert events == [] and same == clock
    new = T0 + 20 * H
    now = T0 + 21 * H
    fresh, events = mc.on_evaluation(clock, PATIENT, assessed(dates={"emergency": [EVIDENCE, new]}), [done], now,
                                     SETTINGS)
    assert names(events) == ["started"] and fresh.first_evidence_at == new and fresh.episode != clock.episode


def test_a_declined_mri_closes_the_episode_its_card_was_served_for():
    clock = started()
    closed, events = mc.decline(clock, "emergency", T0 + H, T0 + 2 * H, T0 + 3 * H)
    assert names(events) == ["closed"] and events[0].reason == "patient-declined"
    assert closed.close_reason == "patient-declined" and closed.closed_at == T0 + 2 * H
    assert mc.decline(closed, "emergency", T0 + H, T0 + 2 * H, T0 + 3 * H) == (closed, [])  # once


def test_a_decline_on_another_tiers_card_or_an_older_card_closes_nothing():
    clock = started()
    assert mc.decline(clock, "urgent", T0 + H, T0 + 2 * H, T0 + 3 * H) == (clock, [])
    assert mc.decline(clock, None, T0 + H, T0 + 2 * H, T0 + 3 * H) == (clock, [])
    # a card served before this episode's first evidence was about an earlier suspicion
    assert mc.decline(clock, "emergency", EVIDENCE - H, T0 + 2 * H, T0 + 3 * H) == (clock, [])
    assert mc.decline(None, "emergency", T0, T0, T0) == (None, [])


def test_a_decline_dated_in_the_future_closes_at_now():
    closed, events = mc.decline(started(), "emergency", T0, T0 + 5 * H, T0 + 3 * H)
    assert closed.closed_at == T0 + 3 * H and events[0].at == T0 + 3 * H


def test_after_a_decline_the_same_evidence_starts_nothing_new_evidence_or_a_graver_tier_does():
    closed, _ = mc.decline(started("urgent"), "urgent", T0, T0 + H, T0 + H)
    same, events = mc.on_evaluation(closed, PATIENT, assessed("urgent"), [], T0 + 2 * H, SETTINGS)
    assert events == [] and same == closed
    later = T0 + 30 * H
    fresh, events = mc.on_evaluation(closed, PATIENT, assessed("urgent", dates={"urgent": [EVIDENCE, later]}), [],
                                     later + H, SETTINGS)
    assert names(events) == ["started"] and fresh.first_evidence_at == later
    # cord compression signs dated before the decline: the patient declined an MRI within a week,
    # not one within 24 h for a suspected compression
    graver, events = mc.on_evaluation(closed, PATIENT, assessed("emergency"), [], T0 + 2 * H, SETTINGS)
    assert names(events) == ["started"] and graver.tier == "emergency" and graver.first_evidence_at == EVIDENCE


def test_the_alert_time_is_filled_in_when_the_alert_went_after_the_start():
    clock = started(alerted_at=None, alert_communication=None, alert_recipients=())
    later, events = mc.on_evaluation(clock, PATIENT, assessed(), [], T0 + H, SETTINGS)
    assert events == [] and later.alerted_at == T0 and later.alert_recipients == ("Practitioner/onc",)


def test_next_due_is_the_escalation_the_deadline_or_the_recheck():
    clock = started()
    assert mc.next_due(clock, T0, SETTINGS) == T0 + timedelta(minutes=5)
    assert mc.next_due(clock, T0 + 4 * H - timedelta(minutes=1), SETTINGS) == T0 + 4 * H
    escalated = mc.sent(mc.watch(clock, [], T0 + 4 * H, SETTINGS)[1][0], None, T0 + 4 * H)[0]
    just_before = clock.deadline - timedelta(minutes=2)
    assert mc.next_due(escalated, just_before, SETTINGS) == clock.deadline


def test_the_clock_round_trips_through_its_redis_fields():
    clock = mc.sent(mc.watch(started(), [], T0 + 4 * H, SETTINGS)[1][0], "Communication/esc", T0 + 4 * H)[0]
    fields = clock.to_fields()
    assert all(isinstance(v, str) for v in fields.values()) and "breached_at" not in fields
    assert Clock.from_fields(fields) == clock


def test_the_escalation_communication_is_more_pressing_and_answers_the_alert():
    clock = started()
    event = mc.watch(clock, [], T0 + 4 * H, SETTINGS)[1][0]
    resource = mc.clock_communication(event, ["PractitionerRole/mscc"], T0 + 4 * H)
    assert resource["priority"] == "stat"
    assert resource["identifier"] == [{"system": mc.MRI_CLOCK_ID_SYSTEM, "value": f"{clock.episode}-escalated"}]
    assert resource["inResponseTo"] == [{"reference": "Communication/alert-1"}]
    assert resource["recipient"] == [{"reference": "PractitionerRole/mscc"}]
    assert "QS56 statement 3" in resource["payload"][0]["contentString"]
    urgent = mc.watch(started("urgent"), [], T0 + 48 * H, SETTINGS)[1][0]
    assert mc.clock_communication(urgent, ["Organization/x"], T0)["priority"] == "asap"


def test_escalation_recipients_coordinator_then_default_then_the_alerts():
    clock = started()
    assert mc.escalation_recipients("PractitionerRole/mscc", "Organization/ao", clock) == ["PractitionerRole/mscc"]
    assert mc.escalation_recipients(None, "Organization/ao", clock) == ["Organization/ao"]
    assert mc.escalation_recipients(None, None, clock) == ["Practitioner/onc"]


def _mri(rtype: str, rid: str, status: str, **extra) -> dict:
    code = {"coding": [{"system": "http://loinc.org", "code": "36400-0"}], "text": "MR Spine"}
    out = {"resourceType": rtype, "id": rid, "status": status, "subject": {"reference": PATIENT}}
    if rtype == "ServiceRequest":
        return out | {"intent": "order", "code": code, "authoredOn": "2026-03-02T10:00:00Z"} | extra
    if rtype == "DiagnosticReport":
        return out | {"code": code, "effectiveDateTime": "2026-03-02T15:00:00Z"} | extra
    return out | {"code": code, "performedDateTime": "2026-03-02T15:00:00Z"} | extra


def test_mri_facts_reads_orders_studies_reports_and_procedures():
    study = {"resourceType": "ImagingStudy", "id": "st", "status": "available", "subject": {"reference": PATIENT},
             "started": "2026-03-02T14:00:00Z", "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                                                             "code": "MR"}],
             "series": [{"uid": "1.2.3", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                                      "code": "MR"},
                         "bodySite": {"system": "http://snomed.info/sct", "code": "421060004", "display": "Spine"}}]}
    resources = [
        _mri("ServiceRequest", "active", "active"), _mri("ServiceRequest", "completed", "completed"),
        _mri("ServiceRequest", "revoked", "revoked"), _mri("ServiceRequest", "draft", "draft"),
        _mri("DiagnosticReport", "final", "final"), _mri("DiagnosticReport", "prelim", "preliminary"),
        _mri("Procedure", "proc", "completed"), _mri("Procedure", "planned", "preparation"), study,
        {"resourceType": "Patient", "id": "p1"}]
    facts = {f.reference: f for f in mc.mri_facts(resources)}
    assert set(facts) == {"ServiceRequest/active", "ServiceRequest/completed", "DiagnosticReport/final",
                          "Procedure/proc", "ImagingStudy/st"}
    assert facts["ServiceRequest/active"] == MriFact("ServiceRequest/active", "ordered",
                                                     datetime(2026, 3, 2, 10, tzinfo=timezone.utc), True)
    assert not facts["ServiceRequest/completed"].open_order
    assert facts["ImagingStudy/st"].state == "done" and facts["ImagingStudy/st"].at.hour == 14


def test_evidence_dates_by_the_tier_each_flag_raises():
    now = datetime.now(timezone.utc)
    assessment = assess(ch.record("emergency"), now)
    dates = mc.evidence_dates(assessment)
    assert set(dates) == {"emergency"} and len(dates["emergency"]) >= 1
    assert all(abs((now - d) - timedelta(days=1)) < timedelta(minutes=5) for d in dates["emergency"])
    assert set(mc.evidence_dates(assess(ch.record("urgent"), now))) == {"urgent"}


def test_an_unrecorded_escalation_is_looked_for_only_where_one_can_have_been_written():
    clock = started()  # escalation due T0 + 4 h, deadline EVIDENCE + 24 h
    assert mc.unrecorded_escalation(clock, SETTINGS) == f"{clock.episode}-escalated"
    late = started(dates={"emergency": [T0 - 22 * H]})  # found late: the escalation falls after the deadline
    assert mc.unrecorded_escalation(late, SETTINGS) is None
    escalated, _ = mc.sent(mc.Event("escalated", clock, T0 + 4 * H, send=True), "Communication/e", T0 + 4 * H)
    assert mc.unrecorded_escalation(escalated, SETTINGS) is None
