"""The latest assessment of each patient, kept in Redis by the workers and read back by the CDS
Hooks service as a last source for a hook call.

One hash per patient, `spinewatch:assessment:Patient/<id>`:
    json          Assessment.to_json() + "stored_at" + "seen" (reference -> versionId read)
    evaluated_ms  the evaluation time, for ordering
    revision      how many times it was written (1, 2, ...)

and, for each reference a stored assessment cites (`cited_references`), a string
`spinewatch:assessment-cites:<Type>/<id>` -> `Patient/<id>`, written with the assessment and kept
`index_ttl_seconds`: when the server deletes a resource and keeps no history of it, this is how the
workers still learn whose it was (workers/pipeline/sweeps.py resolve_focus).

Two workers can evaluate one patient at once (a redelivered task, an event during an evaluation),
and the later evaluation can finish first. The write is a compare-and-set on the evaluation time in
one Lua script, so an older evaluation never replaces a newer one.

Reading back: without prefetch and without fhirServer, a stored assessment of the patient younger
than a configurable age may answer a hook call. `fresh_assessment` turns the stored JSON back into
an Assessment for fhir_mappings.cds.cards and refuses one that is too old (CDS Hooks 2.0
§Security risk 6: "a decision based on outdated patient data").
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Protocol

import structlog

from fhir_mappings.clinical.evaluate import Assessment, PendingOrder, SpineXray
from fhir_mappings.clinical.facts import Evidence, to_instant
from service.infra.redis import redis_client

log = structlog.get_logger("spinewatch.stored_assessment")

PREFIX = "spinewatch:assessment:"
CITES_PREFIX = "spinewatch:assessment-cites:"

# KEYS[1] hash, KEYS[2..] the citation index entries; ARGV: evaluated_ms, json, index ttl (s), patient.
# Returns the new revision, or 0 when a newer one is stored (and then the index is left alone too).
_SAVE = """
local current = redis.call('HGET', KEYS[1], 'evaluated_ms')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'evaluated_ms', ARGV[1], 'json', ARGV[2])
for i = 2, #KEYS do redis.call('SET', KEYS[i], ARGV[4], 'EX', ARGV[3]) end
return redis.call('HINCRBY', KEYS[1], 'revision', 1)
"""


def patient_reference(patient: str) -> str:
    return patient if patient.startswith("Patient/") else f"Patient/{patient}"


def cited_references(record: dict) -> set[str]:
    """The references an assessment (its to_json() form) rests on: cancers, back pain, red-flag
    evidence, what suppressed it and the MRI orders pending."""
    refs = {e.get("reference") for key in ("cancers", "back_pain", "evidence") for e in record.get(key) or []}
    refs |= set(record.get("suppressed_by") or [])
    refs |= {p.get("reference") for p in record.get("pending_mri") or []}
    return {r for r in refs if isinstance(r, str) and "/" in r}


class StoredAssessments(Protocol):
    def get(self, patient_ref: str) -> dict | None:
        """The stored assessment JSON of `Patient/id`, or None."""


class AssessmentStore:
    def __init__(self, redis_client):
        self.redis = redis_client
        self._save = redis_client.register_script(_SAVE)

    def save(self, assessment_json: dict, *, seen: dict[str, str | None] | None = None,
             stored_at: datetime | None = None, index_ttl_seconds: int = 0) -> int:
        """Store `assessment.to_json()` with when it was stored and the resource versions it saw,
        and (index_ttl_seconds > 0) index the references it cites to the patient for that long.
        Returns the revision written, or 0 when a newer evaluation is already stored."""
        patient = assessment_json.get("patient")
        if not patient:
            raise ValueError("an assessment without a patient cannot be stored")
        evaluated_at = datetime.fromisoformat(assessment_json["evaluated_at"])
        record = dict(assessment_json)
        record["stored_at"] = (stored_at or datetime.now(timezone.utc)).isoformat()
        record["seen"] = dict(seen if seen is not None else assessment_json.get("seen") or {})
        patient = patient_reference(patient)
        cites = [CITES_PREFIX + ref for ref in sorted(cited_references(record))] if index_ttl_seconds > 0 else []
        return int(self._save(keys=[PREFIX + patient, *cites],
                              args=[int(evaluated_at.timestamp() * 1000), json.dumps(record), index_ttl_seconds,
                                    patient]))

    def patient_citing(self, reference: str) -> str | None:
        """The patient whose stored assessment cited `reference` (within the index's lifetime), or None."""
        found = self.redis.get(CITES_PREFIX + reference)
        return found.decode() if isinstance(found, bytes) else found

    def get(self, patient_ref: str) -> dict | None:
        values = self.redis.hmget(PREFIX + patient_reference(patient_ref), "json", "revision")
        if not values or values[0] is None:
            return None
        record = json.loads(values[0])
        record["revision"] = int(values[1] or 0)
        return record

    def delete(self, patient_ref: str) -> None:
        self.redis.delete(PREFIX + patient_reference(patient_ref))


def default_source(settings) -> StoredAssessments | None:
    """The workers' store when a Redis URL is set; None otherwise (no stored answers)."""
    if not settings.redis_url:
        return None
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
