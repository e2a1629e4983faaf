"""Finding the patients to evaluate when a notification does not name them: an id-only focus, a
missed event, the reconciliation sweep, and the heartbeat watchdog (FHIR R4 Subscriptions Backport
IG, "Handling Errors": $events, $status, and a query by _lastUpdated)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import structlog

from fhir_mappings.fhir.bundle import patient_key
from fhir_mappings.fhir.notifications import (NotificationError, event_key, missing_event_numbers, parse_notification,
                                              parse_status_bundle)
from service.core.errors import FHIRBadRequest, FHIRNotFound, FHIRNotSupported
from service.infra.fhir.subscriptions import re_request
from service.infra.queue import TASK_CATCH_UP, SubscriptionState
from workers.pipeline.collaborators import Collaborators
from workers.pipeline.record import PAGE_SIZE, fhir_instant

log = structlog.get_logger("spinewatch.pipeline")

# _lastUpdated sweeps start this much before the last event seen: the server's clock and ours
# differ, and an event is delivered some time after the write it reports.
SWEEP_MARGIN = timedelta(minutes=5)
MAX_CATCH_UP_NUMBERS = 500


def resolve_focus(c: Collaborators, focus: list[str], trigger: dict) -> list[str]:
    """id-only payload without the patient: read each focus resource to learn whose it is."""
    patients = []
    for ref in focus:
        rtype, _, rid = ref.partition("/")
        if rtype == "Patient":
            patients.append(ref)
            continue
        try:
            resource = c.fhir.read(rtype, rid)
        except FHIRNotFound:
            log.info("resolve.gone", focus=ref)
            continue
        patient = patient_key(resource)
        if patient is None:
            log.info("resolve.no_patient", focus=ref)
            continue
        c.queue.schedule_evaluation(patient, [ref], trigger)
        patients.append(patient)
    return patients


def catch_up(c: Collaborators, subscription: str, numbers: list[int], since: str | None, only_missing: bool,
             now: datetime) -> dict:
    """Find out what events `numbers` of `subscription` were about and evaluate those patients.
    only_missing: a gap; numbers that arrived meanwhile (out of order) are skipped."""
    wanted = [n for n in numbers if not (only_missing and c.queue.seen(event_key(subscription, n)))]
    if numbers and not wanted:
        log.info("catch_up.nothing_missing", subscription=subscription)
        return {"events": 0, "swept": False}
    trigger = {"kind": "catch-up", "subscription": subscription}
    handled: set[int] = set()
    if wanted:
        handled = _events_operation(c, subscription, wanted, trigger)
    swept = False
    if not wanted or set(wanted) - handled:
        # The server lacks $events (sekmet answers 404) or left events out: ask instead for what
        # changed since the last event seen (IG "Handling Errors": query by _lastUpdated).
        start = _parse_instant(since) or now - timedelta(seconds=max(c.settings.heartbeat_watchdog_seconds, 3600))
        sweep(c, start - SWEEP_MARGIN, trigger)
        swept = True
    c.queue.mark_seen([event_key(subscription, n) for n in wanted])
    log.info("catch_up", subscription=subscription, events=len(wanted), via_events=len(handled), swept=swept)
    return {"events": len(wanted), "via_events": len(handled), "swept": swept}


def _events_operation(c: Collaborators, subscription: str, wanted: list[int], trigger: dict) -> set[int]:
    """Subscription/$events (IG OperationDefinition backport-subscription-events): the notifications
    of event numbers eventsSinceNumber..eventsUntilNumber, id-only, as a history Bundle."""
    params = {"eventsSinceNumber": str(min(wanted)), "eventsUntilNumber": str(max(wanted)), "content": "id-only"}
    try:
        bundle = c.fhir.get(f"{subscription}/$events", params=params, what="$events")
        note = parse_notification(bundle)
    except (FHIRNotFound, FHIRNotSupported, FHIRBadRequest):
        return set()
    except NotificationError as exc:
        log.warning("catch_up.events_unreadable", subscription=subscription, reason=str(exc))
        return set()
    handled = set()
    for item in note.work():
        if item.event_number not in wanted or item.catch_up:
            continue
        if item.patient:
            c.queue.schedule_evaluation(item.patient, item.focus, trigger | {"event": item.event_number})
        elif item.resolve:
            resolve_focus(c, list(item.focus), trigger | {"event": item.event_number})
        handled.add(item.event_number)
    return handled


def sweep(c: Collaborators, since: datetime, trigger: dict) -> list[str]:
    """Every patient with a resource of a subscribed type (SPINEWATCH_SUBSCRIPTION_TYPES) written
    since `since`: queue an evaluation."""
    patients: set[str] = set()
    for rtype in c.settings.subscribed_types:
        params = [("_lastUpdated", "ge" + fhir_instant(since)), ("_count", PAGE_SIZE), ("_elements", "subject")]
        for resource in c.fhir.search(rtype, params):
            found = patient_key(resource)
            if found:
                patients.add(found)
    for patient in sorted(patients):
        c.queue.schedule_evaluation(patient, [], trigger | {"source": "sweep"})
    log.info("sweep", since=fhir_instant(since), patients=len(patients))
    return sorted(patients)


def reconcile(c: Collaborators, now: datetime, reason: str) -> list[str]:
    """The safety net: whatever changed since the last sweep, however its notification fared."""
    c.queue.reconcile_started()
    previous = _parse_instant(c.queue.reconcile_since())
    interval = c.settings.reconciliation_interval_seconds or 3600
    start = previous or now - timedelta(seconds=interval)
    patients = sweep(c, start - SWEEP_MARGIN, {"kind": "reconcile", "source": reason})
    c.queue.set_reconcile_since(now.isoformat())  # only after the sweep succeeded
    return patients


def watchdog(c: Collaborators, now: datetime) -> list[dict]:
    """Subscriptions we have not heard from for heartbeat_watchdog_seconds: ask the server.
    A backport Subscription has heartbeats, so silence means trouble: $status tells its state and
    its event count (a count above ours means missed events: catch up). A classic Subscription has
    no heartbeats; its status is read. Either one in `error` is re-requested."""
    report = []
    # Evaluations queued long ago and never started: their message was lost (queue.recover_pending).
    for patient in c.queue.recover_pending():
        report.append({"patient": patient, "action": "evaluation sent again (queued, never started)"})
    limit = timedelta(seconds=c.settings.heartbeat_watchdog_seconds)
    for subscription in c.queue.tracked_subscriptions():
        state = c.queue.subscription_state(subscription)
        last = _parse_instant(state.last_seen_at)
        if last is not None and now - last < limit:
            continue
        rid = subscription.split("/", 1)[1]
        try:
            resource = c.fhir.read("Subscription", rid)
        except FHIRNotFound:
            c.queue.untrack_subscription(subscription)
            report.append({"subscription": subscription, "action": "untracked (deleted on the server)"})
            continue
        status = resource.get("status")
        entry = {"subscription": subscription, "status": status, "action": "checked"}
        if state.kind == "backport":
            entry |= _status_check(c, subscription, state)
        if status == "error":
            re_request(c.fhir, resource)
            entry["action"] = "re-requested"
        c.queue.set_subscription_fields(subscription, last_seen_at=now.isoformat(), status=status or "")
        log.warning("watchdog", subscription=subscription, status=status, action=entry["action"])
        report.append(entry)
    return report


def _status_check(c: Collaborators, subscription: str, state: SubscriptionState) -> dict:
    try:
        statuses = parse_status_bundle(c.fhir.get(f"{subscription}/$status", what="$status"))
    except (FHIRNotFound, FHIRNotSupported, FHIRBadRequest, NotificationError):
        return {"status_operation": "unavailable"}
    if not statuses:
        return {"status_operation": "empty"}
    server_count = statuses[0].events_since_start
    missing = missing_event_numbers(state.highest, [], server_count)
    if missing:
        c.queue.send(TASK_CATCH_UP, kwargs={"subscription": subscription, "numbers": missing[:MAX_CATCH_UP_NUMBERS],
                                            "since": state.last_event_at, "only_missing": True})
    if server_count is not None:
        c.queue.advance_subscription(subscription, kind="query-status", status=statuses[0].status,
                                     top=server_count, event=False)
    return {"events_since_start": server_count, "missing": len(missing)}


def _parse_instant(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
