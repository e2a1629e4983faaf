"""Stored assessments (written by the workers) as a last source for a hook call.

Issue 3: "Without prefetch and without fhirServer, a stored assessment of the patient, if one exists
and is younger than a configurable age, may answer." The workers keep one assessment per patient
(service/infra/assessments.py: `AssessmentStore(redis).get("Patient/id")` → `Assessment.to_json()`
plus `stored_at`). This module turns that JSON back into an Assessment for fhir_mappings.cds.cards, and
refuses one that is too old (CDS Hooks 2.0 §Security risk 6: "a decision based on outdated patient
data").
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

import structlog

from fhir_mappings.clinical.evaluate import Assessment, PendingOrder, SpineXray
from fhir_mappings.clinical.facts import Evidence, to_instant

log = structlog.get_logger("spinewatch.stored_assessment")


class StoredAssessments(Protocol):
    def get(self, patient_ref: str) -> dict | None:
        """The stored assessment JSON of `Patient/id`, or None."""


def default_source(settings) -> StoredAssessments | None:
    """The workers' store when it and a Redis URL exist; None otherwise (no stored answers)."""
    if not settings.redis_url:
        return None
    from service.infra.assessments import AssessmentStore
    from service.infra.redis import redis_client

    return AssessmentStore(redis_client(settings.redis_url, timeout=1))


def _evidence(data: dict) -> Evidence:
    reference = str(data["reference"])
    rtype, _, rid = reference.partition("/")
    return Evidence(
        concept=data["concept"], resource_type=rtype, resource_id=rid or None,
        version_id=data.get("versionId"), date=to_instant(data.get("date")), field=data.get("field", ""),
        code=data.get("code"), display=data.get("display"), quote=data.get("quote"), value=data.get("value"),
        status=data.get("status"),
    )


def assessment_from_json(data: dict) -> Assessment:
    """The inverse of Assessment.to_json (what cards need; `seen` is not stored)."""
    return Assessment(
        patient=data.get("patient"),
        evaluated_at=to_instant(data["evaluated_at"]),
        urgency=data["urgency"],
        in_scope=bool(data.get("in_scope")),
        cancers=[_evidence(e) for e in data.get("cancers", [])],
        back_pain=[_evidence(e) for e in data.get("back_pain", [])],
        red_flags=list(data.get("red_flags", [])),
        evidence=[_evidence(e) for e in data.get("evidence", [])],
        suppressed_by=list(data.get("suppressed_by", [])),
        pending_mri=[PendingOrder(p["reference"], p.get("status", "active"), to_instant(p.get("due")))
                     for p in data.get("pending_mri", [])],
        problems=list(data.get("problems", [])),
        rule_versions=dict(data.get("rule_versions", {})),
        spine_xrays=[SpineXray(x["reference"], x.get("state", "ordered"), to_instant(x.get("date")))
                     for x in data.get("spine_xrays", [])],
    )


def fresh_assessment(data: dict | None, now: datetime, max_age_seconds: int) -> Assessment | None:
    """The stored assessment when it is younger than `max_age_seconds` and readable, else None."""
    if not data or max_age_seconds <= 0:
        return None
    stored_at = to_instant(data.get("stored_at") or data.get("evaluated_at"))
    if stored_at is None or now - stored_at > timedelta(seconds=max_age_seconds) or stored_at > now + timedelta(minutes=5):
        return None
    try:
        return assessment_from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("cds.stored_assessment_unreadable", error=type(exc).__name__)
        return None
