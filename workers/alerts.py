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
webhook, done), so a retry resumes where the last attempt stopped and never sends a channel twice.
Every attempt is audited (kind `alert`) and counted (spinewatch_alerts_total). Logs carry the alert
id, tier and statuses, never patient data.
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

from fhir_mappings.cds.alerts import (DELIVERY_HEADER, SIGNATURE_HEADER, AlertInput, alert_id, alert_input,
                                  communication, if_none_exist, resolve_recipients, sign, webhook_body)
from service.core.errors import AlertError, AlertFailed, AlertRetry, SpineWatchError, is_transient
from service.core.metrics import ALERTS
from service.infra.audit.writer import AuditLog
from service.core.errors import FHIRNotFound
from service.infra.fhir.base import parse_retry_after

__all__ = ["AlertError", "AlertFailed", "AlertResult", "AlertRetry", "ClientAdapter", "alert_if_needed"]
log = structlog.get_logger("spinewatch.alerts")

KEY_PREFIX = "spinewatch:alert:"
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
    state = _hgetall(r, key)
    if state.get("done"):
        ALERTS.labels(channel="any", outcome="duplicate").inc()
        log.info("alert.duplicate", alert_id=ident, tier=alert.tier)
        return AlertResult("duplicate", ident, state.get("communication"))

    lock_key, token = key + ":lock", uuid.uuid4().hex
    if not _redis_call(r.set, lock_key, token, nx=True, ex=LOCK_SECONDS):
        # Another worker is alerting for this very decision (duplicate notifications): come back
        # later and find it done, rather than racing it.
        held = AlertRetry("alert in progress in another worker")
        # Retry when the lock has lapsed at the latest: its holder may have died mid-alert (a killed
        # worker), and retrying sooner used up every retry within seconds and dead-lettered the alert
        # (bench/soak.py). A live holder finishes first; the retry then finds it done.
        held.retry_after = _lock_ttl(r, lock_key) + 1.0
        raise held
    now = now or datetime.now(timezone.utc)
    ttl = settings.alert_dedup_days * 86400
    channel = "fhir"
    try:
        state = _hgetall(r, key)  # re-read under the lock
        if not state.get("communication"):
            recipients, source = _recipients(fhir, alert, settings, now)
            resource = communication(alert, recipients, now)
            created = _fhir_call(fhir.create, resource, if_none_exist=if_none_exist(ident))
            comm_ref = f"Communication/{created.get('id')}" if created.get("id") else None
            if comm_ref is None:
                raise AlertRetry("FHIR server returned no Communication id")
            state |= {"communication": comm_ref, "recipients": json.dumps(recipients), "recipient_source": source}
            _redis_call(r.hset, key, mapping={k: state[k] for k in ("communication", "recipients", "recipient_source")})
            _redis_call(r.expire, key, ttl)
            ALERTS.labels(channel="fhir", outcome="sent").inc()
            log.info("alert.communication_written", alert_id=ident, tier=alert.tier, recipient_source=source)
        recipients = json.loads(state.get("recipients") or "[]")
        channels = ["fhir"]
        if settings.alert_webhook_url:
            channel = "webhook"
            if not state.get("webhook"):
                _post_webhook(settings, alert, state["communication"], recipients, now, http)
                _redis_call(r.hset, key, "webhook", now.isoformat())
                ALERTS.labels(channel="webhook", outcome="sent").inc()
            channels.append("webhook")
        _redis_call(r.hset, key, "done", now.isoformat())
        _redis_call(r.expire, key, ttl)
    except AlertError as exc:
        outcome = "retry" if isinstance(exc, AlertRetry) else "failed"
        ALERTS.labels(channel=channel, outcome=outcome).inc()
        log.warning("alert.failed", alert_id=ident, tier=alert.tier, channel=channel, outcome=outcome,
                    error=type(exc).__name__)
        audit.event("alert", "failure", actor=ACTOR, patient=alert.patient,
                    detail={"alert_id": ident, "tier": alert.tier, "channel": channel, "error": type(exc).__name__,
                            "retryable": isinstance(exc, AlertRetry), "communication": state.get("communication")})
        raise
    finally:
        _release(r, lock_key, token)
    audit.event("alert", "success", actor=ACTOR, patient=alert.patient,
                detail={"alert_id": ident, "tier": alert.tier, "communication": state["communication"],
                        "channels": channels, "recipients": recipients,
                        "recipient_source": state.get("recipient_source"), "evidence": list(alert.evidence)})
    log.info("alert.sent", alert_id=ident, tier=alert.tier, channels=channels)
    return AlertResult("sent", ident, state["communication"], recipients, channels)


def _recipients(fhir: FhirAlerts, alert: AlertInput, settings, now: datetime) -> tuple[list[str], str]:
    patient_id = alert.patient.split("/")[-1]
    teams = _fhir_call(fhir.search, "CareTeam", {"patient": alert.patient, "status": "active"})
    recipients, source = resolve_recipients(teams, None, None, now, patient_ref=alert.patient)
    if not recipients:
        patient = _fhir_call(fhir.read, "Patient", patient_id)
        recipients, source = resolve_recipients([], patient, settings.alert_default_recipient, now)
    if not recipients:
        raise AlertFailed("no recipient: no active CareTeam, no generalPractitioner, no default recipient")
    return recipients, source


def _post_webhook(settings, alert: AlertInput, comm_ref: str, recipients: list[str], now: datetime,
                  http: httpx.Client | None) -> None:
    secret = settings.alert_webhook_secret.get_secret_value() if settings.alert_webhook_secret else ""
    if not secret:
        # An unsigned alert could be forged by anyone who can reach the receiver: never send one.
        raise AlertFailed("webhook configured without SPINEWATCH_ALERT_WEBHOOK_SECRET")
    body = webhook_body(alert, comm_ref, recipients, now)
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret),
               DELIVERY_HEADER: alert_id(alert)}
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

def _fhir_call(fn, *args, **kwargs):
    """Call the FHIR client, mapping its errors onto retry (transient) or fail (permanent)."""
    try:
        return fn(*args, **kwargs)
    except AlertError:
        raise
    except httpx.HTTPError as exc:
        raise AlertRetry(f"FHIR server unreachable ({type(exc).__name__})") from exc
    except SpineWatchError as exc:  # the one retry rule (service/core/errors.py)
        status = getattr(exc, "status", None)
        error = (AlertRetry if is_transient(exc) else AlertFailed)(f"FHIR {type(exc).__name__} {status or ''}".strip())
        if isinstance(error, AlertRetry):
            error.retry_after = exc.retry_after  # the FHIR server's Retry-After
        raise error from exc


def _lock_ttl(r, lock_key: str) -> float:
    """Seconds until the lock lapses (LOCK_SECONDS when Redis cannot say)."""
    try:
        ttl = float(r.ttl(lock_key))
    except Exception:  # noqa: BLE001 - Redis down, or a client without TTL: assume a full lock
        return float(LOCK_SECONDS)
    return max(0.0, ttl) if ttl != -1 else float(LOCK_SECONDS)


def _redis_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # redis.RedisError: the de-duplication record is unavailable
        raise AlertRetry(f"redis unavailable ({type(exc).__name__})") from exc


def _hgetall(r, key: str) -> dict:
    raw = _redis_call(r.hgetall, key)
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def _release(r, lock_key: str, token: str) -> None:
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
