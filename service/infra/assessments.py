"""The latest assessment of each patient, kept in Redis by the workers and read by the CDS Hooks
service (service/infra/stored_assessments.py).

One hash per patient, `spinewatch:assessment:Patient/<id>`:
    json          Assessment.to_json() + "stored_at" + "seen" (reference -> versionId read)
    evaluated_ms  the evaluation time, for ordering
    revision      how many times it was written (1, 2, ...)

Two workers can evaluate one patient at once (a redelivered task, an event during an evaluation),
and the later evaluation can finish first. The write is a compare-and-set on the evaluation time in
one Lua script, so an older evaluation never replaces a newer one.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

PREFIX = "spinewatch:assessment:"

# KEYS[1] hash; ARGV: evaluated_ms, json. Returns the new revision, or 0 when a newer one is stored.
_SAVE = """
local current = redis.call('HGET', KEYS[1], 'evaluated_ms')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'evaluated_ms', ARGV[1], 'json', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'revision', 1)
"""


def patient_reference(patient: str) -> str:
    return patient if patient.startswith("Patient/") else f"Patient/{patient}"


class AssessmentStore:
    def __init__(self, redis_client):
        self.redis = redis_client
        self._save = redis_client.register_script(_SAVE)

    def save(self, assessment_json: dict, *, seen: dict[str, str | None] | None = None,
             stored_at: datetime | None = None) -> int:
        """Store `assessment.to_json()` with when it was stored and the resource versions it saw.
        Returns the revision written, or 0 when a newer evaluation is already stored."""
        patient = assessment_json.get("patient")
        if not patient:
            raise ValueError("an assessment without a patient cannot be stored")
        evaluated_at = datetime.fromisoformat(assessment_json["evaluated_at"])
        record = dict(assessment_json)
        record["stored_at"] = (stored_at or datetime.now(timezone.utc)).isoformat()
        record["seen"] = dict(seen if seen is not None else assessment_json.get("seen") or {})
        key = PREFIX + patient_reference(patient)
        return int(self._save(keys=[key], args=[int(evaluated_at.timestamp() * 1000), json.dumps(record)]))

    def get(self, patient_ref: str) -> dict | None:
        values = self.redis.hmget(PREFIX + patient_reference(patient_ref), "json", "revision")
        if not values or values[0] is None:
            return None
        record = json.loads(values[0])
        record["revision"] = int(values[1] or 0)
        return record

    def delete(self, patient_ref: str) -> None:
        self.redis.delete(PREFIX + patient_reference(patient_ref))
