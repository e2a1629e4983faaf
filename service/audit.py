"""Audit log interface. Call sites across the service and workers use only `audit_event`.

    audit_event("card", "success", actor="https://ehr.example.org", patient="Patient/123",
                detail={"hook": "patient-view", "hookInstance": "...", "cards": ["uuid", ...]})

Every record goes to the append-only, hash-chained store in service/audit_store.py
(SPINEWATCH_AUDIT_DB_URL; SQLite file by default). Kinds used across SpineWatch (each maps to an
IHE BALP AuditEvent profile on export, see fhir_mappings/audit_events.py):

    notification   a Subscription notification received           (actor: subscription / notifier)
    evaluation     a patient evaluated: inputs+versions, rules, tier (actor: worker or hook)
    card           cards served (hook, hookInstance, card uuids)  (actor: CDS client iss)
    feedback       CDS Hooks feedback (card uuid, outcome, override reason code)
    alert          a care-team alert sent or failed (Communication reference, channel)
    auth-failure   a rejected caller (surface, reason code)       (HIPAA 164.312(b), ATNA)
    audit-access   a reviewer read or exported the audit log      (BALP: audit access is audited)

Outcomes: success | failure (| a kind-specific code such as "duplicate" or "accepted").

Recording must never break clinical care: a failed write is logged (without the record's content)
and counted, and the caller carries on. SPINEWATCH_AUDIT_ENABLED=false switches recording off (the
benchmark comparison); production should never do that.
"""

from __future__ import annotations

import structlog

from service.audit_store import AuditRecord, AuditStore, store_for

log = structlog.get_logger("spinewatch.audit")

_override: AuditStore | None = None
_configured = None  # the settings of the app this process serves (see `configure`)


def configure(settings) -> None:
    """Use these settings for `audit_event` in this process: create_app calls it with the app's own
    settings, so an app built with explicit Settings (tests, the benchmark) audits where it says.
    Processes without an app (workers, the CLI) use the environment (get_settings)."""
    global _configured
    _configured = settings


def _settings(settings=None):
    if settings is not None:
        return settings
    if _configured is not None:
        return _configured
    from service.settings import get_settings

    return get_settings()


def current_store(settings=None) -> AuditStore:
    """The store for SPINEWATCH_AUDIT_DB_URL of `settings` (default: the configured or process
    settings), or the one installed with `use_store`."""
    if _override is not None:
        return _override
    return store_for(_settings(settings).audit_db_url)


def use_store(store: AuditStore | None) -> None:
    """Install a store for this process (tests, the CLI with --db); None returns to the setting."""
    global _override
    _override = store


def audit_event(kind: str, outcome: str, *, actor: str, patient: str | None = None,
                detail: dict | None = None) -> None:
    """Append one audit record. kind: notification|evaluation|card|feedback|alert|auth-failure|...;
    outcome: success|failure|...; actor: who acted (client iss, subscription id, worker);
    patient: "Patient/id" or None; detail: references, codes, versions; never free text or tokens."""
    record_event(kind, outcome, actor=actor, patient=patient, detail=detail)


def record_event(kind: str, outcome: str, *, actor: str, patient: str | None = None,
                 detail: dict | None = None, settings=None) -> AuditRecord | None:
    """As `audit_event`, returning the stored record (None when switched off or on failure).
    `settings`: the app's own settings (default: the process settings)."""
    settings = _settings(settings)
    if _override is None and not settings.audit_enabled:
        return None
    from service.metrics import AUDIT_WRITES

    try:
        record = current_store(settings).append(kind, outcome, actor=actor or "unknown", patient=patient, detail=detail)
    except Exception as exc:  # never let the audit log take clinical care down with it
        AUDIT_WRITES.labels(kind=kind, outcome="error").inc()
        log.error("audit.write_failed", kind=kind, error=type(exc).__name__)
        return None
    AUDIT_WRITES.labels(kind=kind, outcome="ok").inc()
    return record
