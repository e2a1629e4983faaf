"""Finding the patients to evaluate when a notification does not name them: an id-only focus, a
missed event, the reconciliation sweep, and the heartbeat watchdog (FHIR R4 Subscriptions Backport
IG, "Handling Errors": $events, $status, and a query by _lastUpdated)."""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog

from fhir_mappings.fhir.bundle import patient_key
from fhir_mappings.fhir.notifications import (NotificationError, event_key, missing_event_numbers, parse_notification,
                                              parse_status_bundle)
from service.core.errors import FHIRBadRequest, FHIRNotFound, FHIRNotSupported
from service.infra.fhir.subscriptions import (activate, delivery_problem, parse_instant, re_request, requested_since,
                                              sends_heartbeats, stuck_requested, watched_type)
from service.infra.queue import TASK_CATCH_UP, SubscriptionState
from workers.pipeline.collaborators import Collaborators
from workers.pipeline.evaluate import trigger_summary
from workers.pipeline.record import PAGE_SIZE, fhir_instant, patient_from_history

log = structlog.get_logger("spinewatch.pipeline")

# _lastUpdated sweeps start this much before the last event seen: the server's clock and ours
# differ, and an event is delivered some time after the write it reports.
SWEEP_MARGIN = timedelta(minutes=5)
MAX_CATCH_UP_NUMBERS = 500


def resolve_focus(c: Collaborators, focus: list[str], trigger: dict) -> list[str]:
    """id-only payload without the patient: read each focus resource to learn whose it is. One that
    is gone (a delete: the read answers 404, or 410 as Medplum and sekmet do) is evaluated as a
    retraction, with its patient found by whose_deleted."""
    patients = []
    for ref in focus:
        rtype, _, rid = ref.partition("/")
        if rtype == "Patient":
            patients.append(ref)
            continue
        try:
            resource = c.fhir.read(rtype, rid)
        except FHIRNotFound:
            patient = whose_deleted(c, ref, trigger)
            if patient:
                c.queue.schedule_evaluation(patient, [ref], deleted_trigger(trigger, ref))
                patients.append(patient)
            continue
        patient = patient_key(resource)
        if patient is None:
            log.info("resolve.no_patient", focus=ref)
            continue
        c.queue.schedule_evaluation(patient, [ref], trigger)
        patients.append(patient)
    return patients


def whose_deleted(c: Collaborators, ref: str, trigger: dict) -> str | None:
    """The patient a deleted resource was about: from its history (the version before the delete
    names the subject), else from the stored assessment that cited it. Neither: logged and audited
    `retraction-unresolved` (ids only): it is no task failure, and it is not dropped silently."""
    patient = patient_from_history(c.fhir, ref)
    via = "history"
    if patient is None:
        patient, via = c.store.patient_citing(ref), "stored-assessment"
    if patient is None:
        log.warning("resolve.retraction_unresolved", focus=ref)
        c.audit.event("retraction-unresolved", "failure", actor="worker",
                      detail={"focus": ref, "trigger": trigger_summary(trigger)})
        return None
    log.info("resolve.deleted", focus=ref, via=via)
    return patient


def deleted_trigger(trigger: dict, ref: str) -> dict:
    """The evaluation's trigger, naming `ref` among the deleted references."""
    return trigger | {"interaction": trigger.get("interaction") or "delete",
                      "deleted": sorted(set(trigger.get("deleted") or []) | {ref})}


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
        start = parse_instant(since) or now - timedelta(seconds=max(c.settings.heartbeat_watchdog_seconds, 3600))
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


def sweep(c: Collaborators, since: datetime, trigger: dict, types: tuple[str, ...] | None = None) -> list[str]:
    """Every patient with a resource of `types` (default: the subscribed types,
    SPINEWATCH_SUBSCRIPTION_TYPES) written since `since`: queue an evaluation."""
    patients: set[str] = set()
    for rtype in types or c.settings.subscribed_types:
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
    previous = parse_instant(c.queue.reconcile_since())
    interval = c.settings.reconciliation_interval_seconds or 3600
    start = previous or now - timedelta(seconds=interval)
    patients = sweep(c, start - SWEEP_MARGIN, {"kind": "reconcile", "source": reason})
    c.queue.set_reconcile_since(now.isoformat())  # only after the sweep succeeded
    return patients


def watchdog(c: Collaborators, now: datetime) -> list[dict]:
    """Subscriptions we have not heard from for heartbeat_watchdog_seconds: ask the server (look_after)."""
    report = []
    # Evaluations queued long ago and never started: their message was lost (queue.recover_pending).
    for patient in c.queue.recover_pending():
        report.append({"patient": patient, "action": "evaluation sent again (queued, never started)"})
    limit = timedelta(seconds=c.settings.heartbeat_watchdog_seconds)
    for subscription in c.queue.tracked_subscriptions():
        state = c.queue.subscription_state(subscription)
        last = parse_instant(state.last_seen_at)
        if last is None or now - last >= limit:
            report.append(look_after(c, subscription, state, now))
    return report


def look_after(c: Collaborators, subscription: str, state: SubscriptionState, now: datetime) -> dict:
    """One silent Subscription, read from the server. A backport one: $status tells its state and
    its event count (a count above ours means missed events: catch up). In `error`: re-requested.
    Left `requested` past the grace period: asked for `active`, once per look. Sending no
    heartbeats (classic R4; backport without a heartbeat period): its silence proves nothing, so
    sweep its type for what it may not have delivered. Deleted on the server: forgotten."""
    try:
        resource = c.fhir.read("Subscription", subscription.split("/", 1)[1])
    except FHIRNotFound:
        c.queue.untrack_subscription(subscription)
        return {"subscription": subscription, "action": "untracked (deleted on the server)"}
    status = resource.get("status")
    entry = {"subscription": subscription, "status": status, "action": "checked"}
    if state.kind == "backport":
        entry |= _status_check(c, subscription, state)
    # How long it has been `requested`: our last write as the server dates it, else since we first saw it so.
    since = requested_since(resource) or parse_instant(state.requested_since) or now
    grace = timedelta(seconds=c.settings.subscription_activation_grace_seconds)
    if status == "error":
        resource = re_request(c.fhir, resource, c.settings)
        since = requested_since(resource) or now  # asked afresh: the grace period starts again
        entry["action"] = "re-requested"
    elif stuck_requested(status, since, now, grace):
        resource, entry["action"] = _activate(c, subscription, resource)
    if not sends_heartbeats(resource):
        entry |= _fallback_sweep(c, subscription, resource, state, now)
    status = resource.get("status") or status
    c.queue.record_subscription_status(subscription, status or "", last_seen_at=now.isoformat(),
                                       requested_since=since.isoformat() if status == "requested" else None)
    entry["status"] = status
    problem = delivery_problem(status, since, now, grace)
    if problem:
        entry["problem"] = problem
    log.warning("watchdog", subscription=subscription, status=status, action=entry["action"], problem=problem)
    return entry


def _activate(c: Collaborators, subscription: str, resource: dict) -> tuple[dict, str]:
    try:
        return activate(c.fhir, resource, c.settings), "activated"
    except FHIRBadRequest as exc:
        log.warning("watchdog.activation_refused", subscription=subscription, error=exc.message)
        return resource, "activation refused"


def _fallback_sweep(c: Collaborators, subscription: str, resource: dict, state: SubscriptionState,
                    now: datetime) -> dict:
    """Look for what a heartbeat-less Subscription may not have delivered: its type, changed since
    it was last heard from or last swept (last_seen_at, which the watchdog moves on after each look),
    minus SWEEP_MARGIN. Silence is normal for it (nothing changed), so this window is one watchdog
    period and the search usually finds little."""
    rtype = watched_type(resource, c.settings.subscribed_types)
    if rtype is None:
        log.info("watchdog.sweep_skipped", subscription=subscription, reason="watches no subscribed type")
        return {"swept": None}
    last = parse_instant(state.last_seen_at) or now - timedelta(seconds=c.settings.heartbeat_watchdog_seconds)
    since = last - SWEEP_MARGIN
    patients = sweep(c, since, {"kind": "watchdog", "subscription": subscription}, types=(rtype,))
    detail = {"subscription": subscription, "type": rtype, "since": fhir_instant(since), "patients": len(patients)}
    c.audit.event("subscription-sweep", "success", actor="watchdog", detail=detail)
    return {"swept": rtype, "since": detail["since"], "patients": len(patients)}


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
