"""Care-team alerts: the pipeline calls `alert_if_needed(assessment, settings, ...)` after storing an
assessment, handing in its FHIR client, the alerts' Redis client and the audit log.

    alert_if_needed
      ├─ not emergency/urgent, or no patient ............. "not-needed"
      ├─ alert id already done (Redis) ................... "duplicate"     (same patient, tier, evidence)
      ├─ another worker holds the alert's lock ........... AlertRetry      (it will be done, or retried)
      ├─ recipients: active CareTeam → generalPractitioner → SPINEWATCH_ALERT_DEFAULT_RECIPIENT
      │     none at all .................................. AlertFailed     (dead letter: no one to tell)
      ├─ Communication, conditional create (If-None-Exist on its identifier): a retry finds the first
      ├─ webhook (optional), HMAC-SHA256 signed body ..... AlertRetry on 5xx/429/network, AlertFailed on 4xx
      │     (an AlertRetry's `retry_after`: the lock's TTL, or the FHIR server's / webhook's Retry-After)
      └─ mark done (Redis, SPINEWATCH_ALERT_DEDUP_DAYS) ... "sent"

Errors (the task layer retries AlertRetry with backoff and dead-letters what exhausts its retries;
AlertFailed goes to the dead-letter list at once: retrying cannot fix it):

    AlertError
    ├── AlertRetry    transient: FHIR server or webhook unreachable, 5xx, 429, lock held
    └── AlertFailed   permanent: no recipient, webhook without secret, 4xx from FHIR or webhook

Progress is kept per alert id in Redis (`spinewatch:alert:{id}`: communication, recipients,
webhook, done; and what the alert said: patient, tier, sent, basis, fingerprint, retracted), so a
retry resumes where the last attempt stopped and never sends a channel twice; each patient's alerts
are listed in `spinewatch:alerts-of:{patient}` (alert id -> sent). Every attempt is audited (kind
`alert`) and counted (spinewatch_alerts_total). Logs carry the alert id, tier and statuses, never
patient data.

    send_retraction   a record sent alerts rested on was deleted / marked entered-in-error since
      ├─ follow-up id already done (Redis) ............... "duplicate"     (same alerts, same records)
      ├─ another worker holds its lock ................... AlertRetry
      ├─ Communication inResponseTo the alerts, to their recipients, conditional create
      ├─ webhook (optional): a signed `spinewatch.alert.retraction` body
      ├─ the current alert, when the follow-up says all it would: recorded as sent (stands in)
      └─ each alert's `retracted` updated, mark done ..... "sent"        (audited `alert-retraction`)

    progress in `spinewatch:alert-retraction:{id}` (communication, recipients, webhook, done).
"""

from __future__ import annotations

import inspect
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

import httpx
import structlog

from fhir_mappings.cds.alerts import (DELIVERY_HEADER, RETRACTION_ID_SYSTEM, SIGNATURE_HEADER, AlertInput, Retraction,
                                      SentAlert, alert_id, alert_input, communication, follow_up_recipients,
                                      if_none_exist, resolve_recipients, retraction_communication, retraction_id,
                                      retraction_webhook_body, sign, stands_in_for, webhook_body)
from service.core.errors import AlertError, AlertFailed, AlertRetry, SpineWatchError, is_transient
from service.core.metrics import ALERTS
from service.infra.audit.writer import AuditLog
from service.core.errors import FHIRNotFound, FHIRScopeRefused
from service.infra import config_problems
from service.infra.fhir.base import parse_retry_after

__all__ = ["AlertError", "AlertFailed", "AlertResult", "AlertRetry", "ClientAdapter", "alert_if_needed",
           "send_retraction", "sent_alerts"]
log = structlog.get_logger("spinewatch.alerts")

KEY_PREFIX = "spinewatch:alert:"
PATIENT_PREFIX = "spinewatch:alerts-of:"
RETRACTION_PREFIX = "spinewatch:alert-retraction:"
LOCK_SECONDS = 120
ACTOR = "spinewatch-worker"


class FhirAlerts(Protocol):
    """What alerts need from a FHIR client (service/infra/fhir/sync.py provides it; tests pass fakes)."""

    def search(self, resource_type: str, params: dict) -> list[dict]: ...
    def read(self, resource_type: str, resource_id: str) -> dict | None: ...
    def create(self, resource: dict, *, if_none_exist: str | None = None) -> dict: ...


@dataclass
class AlertResult:
    status: str  # not-needed | duplicate | sent
    alert_id: str | None = None
    communication: str | None = None
    recipients: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)


def alert_if_needed(assessment, settings, *, fhir: FhirAlerts, redis_client, audit: AuditLog,
                    http: httpx.Client | None = None, now: datetime | None = None) -> AlertResult:
    """Alert the care team about an emergency/urgent assessment, once per patient, tier and evidence.
    fhir: where the Communication goes (ClientAdapter over the workers' FHIR client); redis_client:
    the per-alert progress record and lock; audit: the worker process's audit log."""
    alert = alert_input(assessment)
    if alert is None:
        return AlertResult("not-needed")
    ident = alert_id(alert)
    r = redis_client
    key = KEY_PREFIX + ident
    state = hgetall(r, key)
    if state.get("done"):
        ALERTS.labels(channel="any", outcome="duplicate").inc()
        log.info("alert.duplicate", alert_id=ident, tier=alert.tier)
        return AlertResult("duplicate", ident, state.get("communication"))

    lock_key, token = acquire_lock(r, key, "alert")
    now = now or datetime.now(timezone.utc)
    ttl = settings.alert_dedup_days * 86400
    channel = "fhir"
    try:
        state = hgetall(r, key)  # re-read under the lock
        if not state.get("communication"):
            recipients, source = _recipients(fhir, alert, settings, now)
            resource = communication(alert, recipients, now)
            created = fhir_call(fhir.create, resource, if_none_exist=if_none_exist(ident))
            state |= _what_was_said(alert, created_ref(created), recipients, source, now)
            redis_call(r.hset, key, mapping=state)
            redis_call(r.expire, key, ttl)
            ALERTS.labels(channel="fhir", outcome="sent").inc()
            log.info("alert.communication_written", alert_id=ident, tier=alert.tier, recipient_source=source)
        recipients = json.loads(state.get("recipients") or "[]")
        channels = ["fhir"]
        if settings.alert_webhook_url:
            channel = "webhook"
            if not state.get("webhook"):
                _post_webhook(settings, alert, state["communication"], recipients, now, http)
                redis_call(r.hset, key, "webhook", now.isoformat())
                ALERTS.labels(channel="webhook", outcome="sent").inc()
            channels.append("webhook")
        _mark_done(r, key, alert.patient, ident, state.get("sent") or now.isoformat(), now, ttl)
    except AlertError as exc:
        outcome = "retry" if isinstance(exc, AlertRetry) else "failed"
        ALERTS.labels(channel=channel, outcome=outcome).inc()
        log.warning("alert.failed", alert_id=ident, tier=alert.tier, channel=channel, outcome=outcome,
                    error=type(exc).__name__)
        audit.event("alert", "failure", actor=ACTOR, patient=alert.patient,
                    detail={"alert_id": ident, "tier": alert.tier, "channel": channel, "error": type(exc).__name__,
                            "retryable": isinstance(exc, AlertRetry), "communication": state.get("communication")}
                    | _refusal_detail(exc))
        raise
    finally:
        release_lock(r, lock_key, token)
    audit.event("alert", "success", actor=ACTOR, patient=alert.patient,
                detail={"alert_id": ident, "tier": alert.tier, "communication": state["communication"],
                        "channels": channels, "recipients": recipients,
                        "recipient_source": state.get("recipient_source"), "evidence": list(alert.evidence)})
    log.info("alert.sent", alert_id=ident, tier=alert.tier, channels=channels)
    return AlertResult("sent", ident, state["communication"], recipients, channels)


def _recipients(fhir: FhirAlerts, alert: AlertInput, settings, now: datetime) -> tuple[list[str], str]:
    patient_id = alert.patient.split("/")[-1]
    teams = fhir_call(fhir.search, "CareTeam", {"patient": alert.patient, "status": "active"})
    recipients, source = resolve_recipients(teams, None, None, now, patient_ref=alert.patient)
    if not recipients:
        patient = fhir_call(fhir.read, "Patient", patient_id)
        recipients, source = resolve_recipients([], patient, settings.alert_default_recipient, now)
    if not recipients:
        raise AlertFailed("no recipient: no active CareTeam, no generalPractitioner, no default recipient")
    return recipients, source


def sent_alerts(redis_client, patient: str) -> list[SentAlert]:
    """The patient's alerts sent and still remembered (SPINEWATCH_ALERT_DEDUP_DAYS), with what
    they rested on. Alerts recorded before their basis was kept are left out: nothing to compare."""
    out = []
    for ident in sorted(hgetall(redis_client, PATIENT_PREFIX + patient)):
        state = hgetall(redis_client, KEY_PREFIX + ident)
        if not (state.get("done") and state.get("basis") and state.get("communication")):
            continue
        out.append(SentAlert(ident, state.get("tier") or "", state.get("sent") or state["done"], state["communication"],
                             tuple(json.loads(state.get("recipients") or "[]")), tuple(json.loads(state["basis"])),
                             tuple(json.loads(state.get("fingerprint") or "[]")),
                             tuple(json.loads(state.get("retracted") or "[]"))))
    return out


def send_retraction(retraction: Retraction, settings, *, fhir: FhirAlerts, redis_client, audit: AuditLog,
                    current_alert: AlertInput | None = None, http: httpx.Client | None = None,
                    now: datetime | None = None) -> AlertResult:
    """Tell the care team that alerts they had rested on records since retracted: one follow-up per
    (alerts, retracted records), however often it is found. `current_alert`: what the current
    assessment would alert, recorded as sent by this follow-up when it says all that alert would."""
    rid, r = retraction_id(retraction), redis_client
    key = RETRACTION_PREFIX + rid
    detail = {"retraction_id": rid, "tier": retraction.current.tier,
              "alerts": [a.alert.alert_id for a in retraction.affected],
              "in_response_to": [a.alert.communication for a in retraction.affected],
              "retracted": [{"reference": ref, "reason": reason} for ref, reason in retraction.reasons]}
    state = hgetall(r, key)
    if state.get("done"):
        ALERTS.labels(channel="any", outcome="retraction-duplicate").inc()
        log.info("alert.retraction_duplicate", retraction_id=rid)
        return AlertResult("duplicate", rid, state.get("communication"))
    lock_key, token = acquire_lock(r, key, "alert retraction")
    now = now or datetime.now(timezone.utc)
    ttl = settings.alert_dedup_days * 86400
    channel, stand_in = "fhir", None
    try:
        state = hgetall(r, key)
        if not state.get("communication"):
            recipients = follow_up_recipients(retraction)
            if not recipients:
                raise AlertFailed("no recipient: the alerts concerned name none")
            resource = retraction_communication(retraction, recipients, now)
            created = fhir_call(fhir.create, resource, if_none_exist=if_none_exist(rid, RETRACTION_ID_SYSTEM))
            state |= {"communication": created_ref(created), "recipients": json.dumps(recipients)}
            redis_call(r.hset, key, mapping=state)
            redis_call(r.expire, key, ttl)
            ALERTS.labels(channel="fhir", outcome="retraction-sent").inc()
        recipients = json.loads(state["recipients"])
        channels = ["fhir"]
        if settings.alert_webhook_url:
            channel = "webhook"
            if not state.get("webhook"):
                body = retraction_webhook_body(retraction, state["communication"], recipients, now)
                post_signed(settings, body, rid, http)
                redis_call(r.hset, key, "webhook", now.isoformat())
                ALERTS.labels(channel="webhook", outcome="retraction-sent").inc()
            channels.append("webhook")
        if stands_in_for(retraction, current_alert):
            stand_in = _record_stand_in(r, current_alert, state["communication"], recipients, now, ttl)
        _mark_reported(r, retraction)
        redis_call(r.hset, key, "done", now.isoformat())
        redis_call(r.expire, key, ttl)
    except AlertError as exc:
        outcome = "retraction-retry" if isinstance(exc, AlertRetry) else "retraction-failed"
        ALERTS.labels(channel=channel, outcome=outcome).inc()
        log.warning("alert.retraction_failed", retraction_id=rid, channel=channel, error=type(exc).__name__)
        audit.event("alert-retraction", "failure", actor=ACTOR, patient=retraction.patient,
                    detail=detail | {"channel": channel, "error": type(exc).__name__,
                                     "retryable": isinstance(exc, AlertRetry),
                                     "communication": state.get("communication")} | _refusal_detail(exc))
        raise
    finally:
        release_lock(r, lock_key, token)
    audit.event("alert-retraction", "success", actor=ACTOR, patient=retraction.patient,
                detail=detail | {"communication": state["communication"], "channels": channels,
                                 "recipients": recipients, "stands_in_for": stand_in})
    log.info("alert.retraction_sent", retraction_id=rid, alerts=len(retraction.affected), channels=channels,
             stands_in=bool(stand_in))
    return AlertResult("sent", rid, state["communication"], recipients, channels)


def _mark_reported(r, retraction: Retraction) -> None:
    """Each affected alert remembers the references reported, so none is reported twice."""
    for affected in retraction.affected:
        reported = sorted(set(affected.alert.retracted) | set(affected.retracted))
        redis_call(r.hset, KEY_PREFIX + affected.alert.alert_id, "retracted", json.dumps(reported))


def _record_stand_in(r, alert: AlertInput, comm_ref: str, recipients: list[str], now: datetime, ttl: int) -> str | None:
    """Record the current alert as sent, by the follow-up that told the care team all it would say,
    so it is not sent again as if it were news. Its id; None when it was already sent."""
    ident = alert_id(alert)
    key = KEY_PREFIX + ident
    if hgetall(r, key).get("done"):
        return None
    redis_call(r.hset, key, mapping=_what_was_said(alert, comm_ref, recipients, "retraction-follow-up", now))
    _mark_done(r, key, alert.patient, ident, now.isoformat(), now, ttl)
    return ident


def created_ref(created: dict) -> str:
    if not created.get("id"):
        raise AlertRetry("FHIR server returned no Communication id")
    return f"Communication/{created['id']}"


def _what_was_said(alert: AlertInput, comm_ref: str, recipients: list[str], source: str, now: datetime) -> dict:
    """The alert's Redis record: where it went, and what it rested on (for a later retraction)."""
    return {"communication": comm_ref, "recipients": json.dumps(recipients), "recipient_source": source,
            "patient": alert.patient, "tier": alert.tier, "sent": now.isoformat(),
            "basis": json.dumps(list(alert.basis)), "fingerprint": json.dumps(list(alert.fingerprint))}


def _mark_done(r, key: str, patient: str, ident: str, sent: str, now: datetime, ttl: int) -> None:
    """Listed under its patient (for retractions), then done: every attempt that gets this far
    writes both, so a retry after a crash in between still lists it."""
    redis_call(r.hset, PATIENT_PREFIX + patient, ident, sent)
    redis_call(r.expire, PATIENT_PREFIX + patient, ttl)
    redis_call(r.hset, key, "done", now.isoformat())
    redis_call(r.expire, key, ttl)


def _post_webhook(settings, alert: AlertInput, comm_ref: str, recipients: list[str], now: datetime,
                  http: httpx.Client | None) -> None:
    post_signed(settings, webhook_body(alert, comm_ref, recipients, now), alert_id(alert), http)


def post_signed(settings, body: bytes, delivery: str, http: httpx.Client | None) -> None:
    """POST one signed body to the webhook; AlertRetry on 5xx/429/network, AlertFailed on 4xx."""
    secret = settings.alert_webhook_secret.get_secret_value() if settings.alert_webhook_secret else ""
    if not secret:
        # An unsigned alert could be forged by anyone who can reach the receiver: never send one.
        raise AlertFailed("webhook configured without SPINEWATCH_ALERT_WEBHOOK_SECRET")
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret), DELIVERY_HEADER: delivery}
    client = http or httpx.Client(timeout=settings.alert_timeout_seconds, follow_redirects=False)
    try:
        response = client.post(settings.alert_webhook_url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise AlertRetry(f"webhook unreachable ({type(exc).__name__})") from exc
    finally:
        if http is None:
            client.close()
    if response.status_code == 429 or response.status_code >= 500:
        error = AlertRetry(f"webhook answered {response.status_code}")
        error.retry_after = parse_retry_after(response.headers.get("retry-after"))  # as for FHIR (workers/tasks.py)
        raise error
    if response.status_code >= 300:
        raise AlertFailed(f"webhook answered {response.status_code}")


# -- seams -------------------------------------------------------------------------------------------

def fhir_call(fn, *args, **kwargs):
    """Call the FHIR client, mapping its errors onto retry (transient) or fail (permanent)."""
    try:
        return fn(*args, **kwargs)
    except AlertError:
        raise
    except httpx.HTTPError as exc:
        raise AlertRetry(f"FHIR server unreachable ({type(exc).__name__})") from exc
    except FHIRScopeRefused as exc:
        # A configuration problem: the same token is refused again, so fail now, with the message
        # that names the interaction and the scope it needed (the dead letter shows it).
        raise AlertFailed(exc.message) from exc
    except SpineWatchError as exc:  # the one retry rule (service/core/errors.py)
        status = getattr(exc, "status", None)
        error = (AlertRetry if is_transient(exc) else AlertFailed)(f"FHIR {type(exc).__name__} {status or ''}".strip())
        if isinstance(error, AlertRetry):
            error.retry_after = exc.retry_after  # the FHIR server's Retry-After
        raise error from exc


def _refusal_detail(exc: AlertError) -> dict:
    """For the failure's audit record: the SMART scope a refused FHIR interaction needed."""
    problem = config_problems.find(exc)
    return {"needed_scope": problem.needed_scope} if problem and problem.needed_scope else {}


def acquire_lock(r, key: str, what: str) -> tuple[str, str]:
    """Take the record's lock (lock key, token), or AlertRetry: another worker is sending this very
    message (duplicate notifications), so come back later and find it done rather than race it."""
    lock_key, token = key + ":lock", uuid.uuid4().hex
    if not redis_call(r.set, lock_key, token, nx=True, ex=LOCK_SECONDS):
        held = AlertRetry(f"{what} in progress in another worker")
        # Retry when the lock has lapsed at the latest: its holder may have died mid-alert (a killed
        # worker), and retrying sooner used up every retry within seconds and dead-lettered the alert
        # (bench/soak.py). A live holder finishes first; the retry then finds it done.
        held.retry_after = _lock_ttl(r, lock_key) + 1.0
        raise held
    return lock_key, token


def _lock_ttl(r, lock_key: str) -> float:
    """Seconds until the lock lapses (LOCK_SECONDS when Redis cannot say)."""
    try:
        ttl = float(r.ttl(lock_key))
    except Exception:  # noqa: BLE001 - Redis down, or a client without TTL: assume a full lock
        return float(LOCK_SECONDS)
    return max(0.0, ttl) if ttl != -1 else float(LOCK_SECONDS)


def redis_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # redis.RedisError: the de-duplication record is unavailable
        raise AlertRetry(f"redis unavailable ({type(exc).__name__})") from exc


def hgetall(r, key: str) -> dict:
    raw = redis_call(r.hgetall, key)
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def release_lock(r, lock_key: str, token: str) -> None:
    try:
        r.eval(_RELEASE, 1, lock_key, token)  # only our own lock: it may have expired and moved on
    except Exception:  # noqa: BLE001 - the lock expires by itself
        log.warning("alert.lock_release_failed")


class ClientAdapter:
    """service.infra.fhir.sync.FHIRClient as `FhirAlerts`.

    Conditional create: the Communication is searched by its identifier first, then created with
    If-None-Exist when the client can send it. The search makes a retry safe even on a server
    without conditional create; the per-alert Redis lock keeps two workers from racing between
    the search and the create."""

    def __init__(self, client):
        self.client = client

    def search(self, resource_type: str, params: dict) -> list[dict]:
        return self.client.search_all(resource_type, params)

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        try:
            return self.client.read(resource_type, resource_id)
        except FHIRNotFound:
            return None

    def create(self, resource: dict, *, if_none_exist: str | None = None) -> dict:
        if if_none_exist:
            name, _, value = if_none_exist.partition("=")
            system, _, code = value.partition("|")
            # Kept only if it really carries the identifier: a server may ignore the parameter.
            existing = [r for r in self.client.search_all(resource["resourceType"], {name: value})
                        if any(i.get("system") == system and i.get("value") == code for i in r.get("identifier") or [])]
            if existing:
                return existing[0]
            if "if_none_exist" in inspect.signature(self.client.create).parameters:
                return self.client.create(resource, if_none_exist=if_none_exist)
        return self.client.create(resource)

    def close(self) -> None:
        self.client.close()
