"""What an audit record is and how the chain is computed: the canonical JSON that is hashed, the
record hash over its content and sequence number, and the sanitising of `detail` (references,
codes and versions only: never free text, tokens or bodies). Pure: no database (store.py is that).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone



GENESIS_HASH = "0" * 64
HASH_VERSION = "1"  # bump if the canonical form below ever changes


# Keys whose values are secrets or bodies: dropped, never stored (ATNA: no PHI/secrets beyond need).
_FORBIDDEN_KEYS = {"token", "access_token", "authorization", "password", "secret", "body", "payload",
                   "text", "note", "narrative", "comment", "jwt", "bearer", "fhirauthorization"}
MAX_STRING = 256  # longer strings are not references or codes: replaced, never stored


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sanitise_detail(detail: dict | None) -> dict:
    """Keep references, codes, versions, counts; drop secret-looking keys and long strings."""
    def clean(value, depth=0):
        if depth > 6:
            return "[dropped: too deep]"
        if isinstance(value, dict):
            return {str(k): clean(v, depth + 1) for k, v in value.items()
                    if str(k).lower().replace("-", "_") not in _FORBIDDEN_KEYS}
        if isinstance(value, (list, tuple, set, frozenset)):
            items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
            return [clean(v, depth + 1) for v in items]
        if isinstance(value, str):
            return value if len(value) <= MAX_STRING else "[dropped: too long]"
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return clean(str(value), depth + 1)
    return clean(dict(detail or {}))


def record_hash(*, seq: int, recorded: str, kind: str, outcome: str, actor: str, patient: str | None,
                detail: str, prev_hash: str) -> str:
    body = canonical_json({"v": HASH_VERSION, "seq": seq, "recorded": recorded, "kind": kind,
                           "outcome": outcome, "actor": actor, "patient": patient, "detail": detail,
                           "prev": prev_hash})
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    recorded: str
    kind: str
    outcome: str
    actor: str
    patient: str | None
    detail: dict
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row) -> "AuditRecord":
        m = row._mapping
        try:
            detail = json.loads(m["detail"])
        except ValueError:
            detail = {"_unreadable": True}
        return cls(m["seq"], m["recorded"], m["kind"], m["outcome"], m["actor"], m["patient"], detail,
                   m["prev_hash"], m["hash"])

    def to_json(self) -> dict:
        return {"seq": self.seq, "recorded": self.recorded, "kind": self.kind, "outcome": self.outcome,
                "actor": self.actor, "patient": self.patient, "detail": self.detail,
                "prev_hash": self.prev_hash, "hash": self.hash}


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    broken_seq: int | None = None
    reason: str | None = None
    head_hash: str | None = None  # the last record's hash: note it elsewhere to anchor the chain

    def message(self) -> str:
        if self.ok:
            return f"audit log intact: {self.checked} records verified; head hash {self.head_hash}"
        return f"audit log BROKEN at record {self.broken_seq}: {self.reason}"
