"""A Subscription notification accepted: parsed, de-duplicated, queued, and the answer decided.

FHIR R4 Subscription rest-hook (R4 §2.46.7.1) and the Subscriptions R5 Backport IG
(http://hl7.org/fhir/uv/subscriptions-backport/): the server treats any non-2xx answer as a failed
delivery and retries it, so

- control traffic (handshake, heartbeat, query-status) is recorded and nothing is evaluated;
- events are de-duplicated, then queued; the answer is 200 only once the work is on the Redis
  queue, and ServiceUnavailable (503) when Redis cannot take it;
- a gap in the event numbers (IG "Handling Errors") asks the worker to catch up on the missed ones;
- a delete is queued like any event, with `interaction: delete` and the deleted references in the
  trigger, so the worker knows the focus cannot be read any more;
- a classic rest-hook that names its Subscription (Medplum's X-Medplum-Subscription) marks a tracked
  Subscription as heard from, so the watchdog does not take a busy one for a silent one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import structlog

from fhir_mappings.fhir.notifications import (BACKPORT_KINDS, Delivery, Notification, NotificationError, WorkItem,
                                              delivery_headers, missing_event_numbers, parse_post, parse_rest_hook)
from service.core.errors import InvalidRequest, ServiceUnavailable
from service.core.metrics import NOTIFICATIONS
from service.infra.audit.writer import AuditLog
from service.infra.queue import GAP_GRACE_SECONDS, TASK_CATCH_UP, TASK_RESOLVE, Claim, QueueUnavailable, WorkQueue

MAX_NUMBERED_RECOVERY = 500
log = structlog.get_logger("spinewatch.notifications")


@dataclass
class Intake:
    outcome: str  # recorded | queued | duplicate
    message: str
    patients: list[str] = field(default_factory=list)


def read_delivery(headers: Mapping[str, str]) -> Delivery:
    """The delivery's headers (Medplum's X-Medplum-*, x-trace-id); a bad deleted-resource header: 400."""
    delivery = _parse(lambda: delivery_headers(headers))
    for warning in delivery.warnings:
        log.warning("notification.header_ignored", reason=warning)
    return delivery


def parse_notification(body: object | None, delivery: Delivery = Delivery()) -> Notification:
    """POST /fhir/notifications: an empty body (or `{}`) is an R4 rest-hook ping; a Bundle a
    backport notification; any other resource an R4 rest-hook payload; Medplum's delete headers a
    delete."""
    return _parse(lambda: parse_post(body, delivery))


def parse_rest_hook_payload(resource_type: str, resource_id: str, body: object | None,
                            delivery: Delivery = Delivery()) -> Notification:
    """PUT|POST /fhir/notifications/{type}/{id}: the R4 rest-hook payload for that resource."""
    return _parse(lambda: parse_rest_hook(resource_type, resource_id, body, delivery))


def parse_rest_hook_delete(resource_type: str, resource_id: str, body: object | None,
                           delivery: Delivery = Delivery()) -> Notification:
    """DELETE /fhir/notifications/{type}/{id}: HAPI FHIR's rest-hook delivery of that resource's delete."""
    return parse_rest_hook_payload(resource_type, resource_id, body, replace(delivery, interaction="delete"))


def _parse(parse: Callable[[], object]):
    try:
        return parse()
    except NotificationError as exc:
        NOTIFICATIONS.labels(kind="unknown", outcome="invalid").inc()
        log.info("notification.invalid", reason=str(exc))
        raise InvalidRequest(f"not a notification we can read: {exc}") from None


def accept(note: Notification, queue: WorkQueue, audit: AuditLog) -> Intake:
    """Act on one parsed notification. Raises ServiceUnavailable (503) when nothing could be queued."""
    received_at = datetime.now(timezone.utc).isoformat()
    try:
        result = _control(note, queue) if note.is_control else _events(note, queue, received_at)
    except QueueUnavailable as exc:
        NOTIFICATIONS.labels(kind=note.kind, outcome="unavailable").inc()
        log.warning("notification.unavailable", kind=note.kind, subscription=note.subscription, error=str(exc))
        raise ServiceUnavailable("the work queue is unavailable; retry later") from None
    except _Busy:
        NOTIFICATIONS.labels(kind=note.kind, outcome="busy").inc()
        raise ServiceUnavailable("the same event is being queued by another delivery; retry later") from None
    NOTIFICATIONS.labels(kind=note.kind, outcome=result.outcome).inc()
    audit.event("notification", "success", actor=note.subscription or "rest-hook",
                patient=result.patients[0] if len(result.patients) == 1 else None, detail=_detail(note, result))
    log.info("notification", kind=note.kind, subscription=note.subscription, events=note.event_numbers,
             interaction=note.interaction, deleted=note.deleted, trace=note.trace, outcome=result.outcome,
             warnings=len(note.warnings))
    return result


def _detail(note: Notification, result: Intake) -> dict:
    """The audit record's detail: references, numbers and codes only, never a body."""
    detail = {"kind": note.kind, "events": note.event_numbers,
              "focus": sorted({e.focus for e in note.events if e.focus}), "outcome": result.outcome}
    optional = {"interaction": note.interaction, "deleted": note.deleted, "trace": note.trace,
                "warnings": note.warnings}
    return detail | {name: value for name, value in optional.items() if value}


class _Busy(Exception):
    pass


def _control(note: Notification, queue: WorkQueue) -> Intake:
    """Handshake, heartbeat, query-status: no evaluation. Their events-since-subscription-start
    still reveals events that never reached us (IG "Handling Errors": a heartbeat's count above the
    last number received means missed notifications)."""
    state = queue.subscription_state(note.subscription)
    missing = missing_event_numbers(state.highest, [], note.events_since_start)
    if missing:
        _recover(queue, note.subscription, missing, state.last_event_at)
    queue.advance_subscription(note.subscription, kind=note.kind, status=note.status,
                               top=note.events_since_start, event=False)
    return Intake("recorded", f"{note.kind} recorded")


def _events(note: Notification, queue: WorkQueue, received_at: str) -> Intake:
    """Claim, queue, then confirm: three Redis round trips for the common event (one Lua script
    for the claims, the Celery message, one pipeline for everything after)."""
    items = note.work()
    focus_of: dict[str, set[str]] = {}  # a batched notification can name one patient several times
    for item in items:
        if item.patient:
            focus_of.setdefault(item.patient, set()).update(item.focus)
    reserved: dict[str, Claim] = {}
    claimed: list[tuple[str, ...]] = []
    fresh = []
    after = queue.pipeline()
    try:
        for item in items:
            reserve = item.patient if item.patient and item.patient not in reserved else None
            claim = queue.claim(item.keys, reserve, sorted(focus_of[reserve]) if reserve else ())
            if claim.state == "duplicate":
                continue
            if claim.state == "busy":
                raise _Busy()
            if reserve:
                reserved[reserve] = claim
            claimed.append(item.keys)
            fresh.append(item)
        patients = _dispatch(note, fresh, queue, received_at, reserved, after)
        if note.kind in BACKPORT_KINDS:
            state = queue.subscription_state(note.subscription)
            missing = missing_event_numbers(state.highest, note.event_numbers, note.events_since_start)
            if missing:
                _recover(queue, note.subscription, missing, state.last_event_at or received_at)
            top = max([*note.event_numbers, note.events_since_start or 0]) if note.event_numbers else None
            queue.advance_subscription(note.subscription, kind=note.kind, status=note.status, top=top, event=True,
                                       after=after)
        for keys in claimed:
            queue.confirm(keys, after=after)
        queue.execute(after)
    except BaseException:
        for keys in claimed:
            queue.release(keys)
        for patient, claim in reserved.items():
            queue.release_reservation(patient, claim)
        raise
    if note.subscription and note.kind not in BACKPORT_KINDS:
        _heard_from(queue, note.subscription, received_at)
    if not fresh and items:
        return Intake("duplicate", "duplicate: already queued")
    return Intake("queued", f"{len(fresh)} event(s) queued", patients)


def _heard_from(queue: WorkQueue, subscription: str, received_at: str) -> None:
    """A classic rest-hook has no heartbeat: its notifications are the only sign it is alive. Only
    a Subscription the ledger knows (`spinewatch subscribe` registered it) is stamped, with the
    field the watchdog reads; not advance_subscription, which files it as a backport one and would
    have the watchdog ask a classic server for $status. Best effort: the work is queued already,
    and a missed stamp costs at most one needless watchdog read."""
    try:
        if queue.subscription_state(subscription).kind is not None:
            queue.set_subscription_fields(subscription, last_seen_at=received_at)
    except QueueUnavailable as exc:
        log.warning("notification.last_seen_not_recorded", subscription=subscription, error=str(exc))


def _trigger(note: Notification, items: list[WorkItem], received_at: str) -> dict:
    trigger = {"kind": note.kind, "subscription": note.subscription, "event": items[0].event_number,
               "received_at": received_at}
    deleted = sorted({ref for item in items if item.deleted for ref in item.focus})
    return trigger | ({"interaction": "delete", "deleted": deleted} if deleted else {})


def _dispatch(note: Notification, items, queue: WorkQueue, received_at: str, reserved: dict[str, Claim],
              after) -> list[str]:
    by_patient: dict[str, list] = {}
    catch_up: list[int] = []
    for item in items:
        if item.patient:
            by_patient.setdefault(item.patient, []).append(item)
        elif item.resolve:
            queue.send(TASK_RESOLVE, kwargs={"focus": list(item.focus), "trigger": _trigger(note, [item], received_at)})
        elif note.kind in BACKPORT_KINDS:
            # Empty payload (IG "empty": no focus): ask the server which events these were.
            catch_up.extend([item.event_number] if item.event_number is not None else [])
            if item.event_number is None:
                queue.request_reconcile("empty notification without event number")
        else:
            queue.request_reconcile("rest-hook ping")
    for patient, mine in by_patient.items():
        focus = sorted({ref for item in mine for ref in item.focus})
        queue.schedule_evaluation(patient, focus, _trigger(note, mine, received_at), reserved=reserved.get(patient),
                                  after=after)
    if catch_up:
        queue.send(TASK_CATCH_UP, kwargs={"subscription": note.subscription, "numbers": sorted(set(catch_up)),
                                          "since": received_at, "only_missing": False})
    return sorted(by_patient)


def _recover(queue: WorkQueue, subscription: str, numbers: list[int], since: str | None) -> None:
    log.warning("notification.gap", subscription=subscription, missing=len(numbers),
                first=numbers[0], last=numbers[-1])
    if len(numbers) > MAX_NUMBERED_RECOVERY:
        numbers = []  # too many to ask for one by one: the catch-up sweeps by _lastUpdated instead
    queue.send(TASK_CATCH_UP, kwargs={"subscription": subscription, "numbers": numbers, "since": since,
                                      "only_missing": True}, countdown=GAP_GRACE_SECONDS)
