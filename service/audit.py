"""Audit log interface. (Placeholder until the audit store lands: records nothing yet.)

Call sites across the service and workers use only `audit_event`.
"""

from __future__ import annotations


def audit_event(kind: str, outcome: str, *, actor: str, patient: str | None = None,
                detail: dict | None = None) -> None:
    """Append one audit record. kind: notification|evaluation|card|feedback|alert|auth-failure|...;
    outcome: success|failure|...; actor: who acted (client iss, subscription id, worker);
    patient: "Patient/id" or None; detail: references, codes, versions; never free text or tokens."""
    return None
