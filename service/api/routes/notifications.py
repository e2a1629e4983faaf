"""Subscription notifications from the EHR's FHIR server.

    POST /fhir/notifications                      backport notification Bundles (R4 Parameters or
                                                  R4B SubscriptionStatus first entry); an empty body
                                                  is an R4 rest-hook ping; a bare resource is an R4
                                                  rest-hook payload POSTed to the endpoint
    PUT|POST /fhir/notifications/{type}/{id}      R4 rest-hook payload (R4 Subscription §2.46.7.1)

Order of business, each step before the next:
1. authenticate: the secret from channel.header, compared in constant time; 401 otherwise;
2. read and parse: 413 over the size limit, 400 with an OperationOutcome for malformed input;
3. control traffic (handshake, heartbeat, query-status): recorded, 200, nothing evaluated;
4. events: de-duplicated, then queued; 200 only once the work is on the Redis queue, 503 when Redis
   cannot take it (the server retries: R4 rest-hook and the backport IG both treat non-2xx as a
   failed delivery).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fhir_mappings.fhir.notifications import (BACKPORT_KINDS, Notification, NotificationError, missing_event_numbers,
                                         parse_resource, parse_rest_hook, ping)
from service.infra.audit.writer import audit_event
from service.api.errors import FHIR_JSON, operation_outcome
from service.core.errors import InvalidRequest, PayloadTooLarge, ServiceUnavailable, Unauthorized
from service.core.metrics import AUTH_FAILURES, NOTIFICATIONS
from service.infra.queue import GAP_GRACE_SECONDS, TASK_CATCH_UP, TASK_RESOLVE, Claim, QueueUnavailable, WorkQueue

router = APIRouter(prefix="/fhir/notifications", tags=["notifications"])
MAX_NUMBERED_RECOVERY = 500
log = structlog.get_logger("spinewatch.notifications")


# ---------------- HTTP ----------------

def get_queue(request: Request) -> WorkQueue:
    queue = getattr(request.app.state, "work_queue", None)
    if queue is None:
        queue = request.app.state.work_queue = WorkQueue(request.app.state.settings)
    return queue


def authenticate(request: Request) -> None:
    """channel.header carries `Authorization: Bearer <secret>` (R4 Subscription.channel.header:
    "Additional headers / information to send as part of the notification")."""
    expected = request.app.state.settings.notification_token.encode()
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    # compare_digest on equal-length inputs takes the same time wherever they differ.
    if not (scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), expected)):
        reason = "missing" if not presented else "mismatch"
        AUTH_FAILURES.labels(surface="notifications", reason=reason).inc()
        NOTIFICATIONS.labels(kind="unknown", outcome="unauthorized").inc()
        audit_event("auth-failure", "failure", actor="notifier", detail={"surface": "notifications", "reason": reason})
        log.warning("notification.unauthorized", reason=reason)
        raise Unauthorized("notification secret missing or wrong")


async def read_json(request: Request) -> object | None:
    """The body as JSON, or None when it is empty. 413 before reading an oversized body."""
    limit = request.app.state.settings.notification_max_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"notification larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"notification larger than {limit} bytes")
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except RecursionError:  # nested deeper than the parser's recursion limit: a 400, not a 500
        raise InvalidRequest("the notification body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the notification body is not valid JSON") from None


def _answer(result: "Intake") -> JSONResponse:
    outcome = operation_outcome(result.message, code="informational", severity="information")
    return JSONResponse(outcome, status_code=200, media_type=FHIR_JSON)


@router.post("")
async def notification(request: Request) -> JSONResponse:
    authenticate(request)
    body = await read_json(request)
    note = _parse(lambda: ping() if body is None else parse_resource(body))
    return _answer(await run_in_threadpool(accept, note, get_queue(request)))


@router.put("/{resource_type}/{resource_id}", operation_id="rest_hook_put")
@router.post("/{resource_type}/{resource_id}", operation_id="rest_hook_post")
async def rest_hook(resource_type: str, resource_id: str, request: Request) -> JSONResponse:
    authenticate(request)
    body = await read_json(request)
    note = _parse(lambda: parse_rest_hook(resource_type, resource_id, body))
    return _answer(await run_in_threadpool(accept, note, get_queue(request)))


def _parse(parse) -> Notification:
    try:
        return parse()
    except NotificationError as exc:
        NOTIFICATIONS.labels(kind="unknown", outcome="invalid").inc()
        log.info("notification.invalid", reason=str(exc))
        raise InvalidRequest(f"not a notification we can read: {exc}") from None


# ---------------- intake ----------------

@dataclass
class Intake:
    outcome: str  # recorded | queued | duplicate
    message: str
    patients: list[str] = field(default_factory=list)


def accept(note: Notification, queue: WorkQueue) -> Intake:
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
    detail = {"kind": note.kind, "events": note.event_numbers,
              "focus": sorted({e.focus for e in note.events if e.focus}), "outcome": result.outcome}
    if note.warnings:
        detail["warnings"] = note.warnings
    audit_event("notification", "success", actor=note.subscription or "rest-hook",
                patient=result.patients[0] if len(result.patients) == 1 else None, detail=detail)
    log.info("notification", kind=note.kind, subscription=note.subscription, events=note.event_numbers,
             outcome=result.outcome, warnings=len(note.warnings))
    return result


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
    if not fresh and items:
        return Intake("duplicate", "duplicate: already queued")
    return Intake("queued", f"{len(fresh)} event(s) queued", patients)


def _dispatch(note: Notification, items, queue: WorkQueue, received_at: str, reserved: dict[str, Claim],
              after) -> list[str]:
    by_patient: dict[str, list] = {}
    catch_up: list[int] = []
    for item in items:
        trigger = {"kind": note.kind, "subscription": note.subscription, "event": item.event_number,
                   "received_at": received_at}
        if item.patient:
            by_patient.setdefault(item.patient, []).append(item)
        elif item.resolve:
            queue.send(TASK_RESOLVE, kwargs={"focus": list(item.focus), "trigger": trigger})
        elif note.subscription:
            # Empty payload (IG "empty": no focus): ask the server which events these were.
            catch_up.extend([item.event_number] if item.event_number is not None else [])
            if item.event_number is None:
                queue.request_reconcile("empty notification without event number")
        else:
            queue.request_reconcile("rest-hook ping")
    for patient, mine in by_patient.items():
        trigger = {"kind": note.kind, "subscription": note.subscription, "event": mine[0].event_number,
                   "received_at": received_at}
        focus = sorted({ref for item in mine for ref in item.focus})
        queue.schedule_evaluation(patient, focus, trigger, reserved=reserved.get(patient), after=after)
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
