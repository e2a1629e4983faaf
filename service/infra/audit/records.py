"""What an audit record is and how the chain is computed: the canonical JSON that is hashed, the
record hash over its content and sequence number, the walk that checks a chain (`ChainCheck`), and
the sanitising of `detail` (references, codes and versions only: never free text, tokens or bodies).
Pure: no database (store.py is that).

Hash versions (each record stores its own, column `hash_v`; NULL in logs older than the column = "1"):
  "1"  SHA-256 of the canonical content: anyone can recompute it, so someone who can write the
       database can forge records or roll the tail back with a recomputed head.
  "2"  HMAC-SHA256 with SPINEWATCH_AUDIT_HMAC_KEY over the same canonical content: without the key
       nobody can make a record (or a rewritten tail) that verifies.
A log may start unkeyed and switch to keyed once; after the first "2" record every record must be
"2" (an unkeyed record after it is a forgery or a downgrade). One key at a time: `key_id` names it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timezone



GENESIS_HASH = "0" * 64
HASH_V1 = "1"  # SHA-256, unkeyed (logs written without SPINEWATCH_AUDIT_HMAC_KEY)
HASH_V2 = "2"  # HMAC-SHA256 with SPINEWATCH_AUDIT_HMAC_KEY
HASH_VERSION = HASH_V2  # the newest; bump if the canonical form below ever changes
HASH_VERSIONS = (HASH_V1, HASH_V2)


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
                detail: str, prev_hash: str, key: bytes | None = None) -> str:
    """Version "1" (SHA-256) without a key, version "2" (HMAC-SHA256) with one; the version is part
    of what is hashed, so a record cannot be relabelled without recomputing its hash."""
    body = canonical_json({"v": HASH_V1 if key is None else HASH_V2, "seq": seq, "recorded": recorded,
                           "kind": kind, "outcome": outcome, "actor": actor, "patient": patient,
                           "detail": detail, "prev": prev_hash}).encode("utf-8")
    if key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A public name for a key (stored in the log head; says "wrong key" without revealing it)."""
    return hmac.new(key, b"spinewatch-audit-key-id", hashlib.sha256).hexdigest()[:16]


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
    head_seq: int | None = None
    keyed_from: int | None = None  # the first HMAC-keyed (version "2") record, None: none keyed
    anchors: int = 0  # expected heads checked

    def message(self) -> str:
        if not self.ok:
            return f"audit log BROKEN at record {self.broken_seq}: {self.reason}"
        if self.keyed_from is None:
            keying = "unkeyed (SHA-256)" if self.checked else ""
        elif self.keyed_from == 1:
            keying = "HMAC-keyed"
        else:
            keying = f"records 1..{self.keyed_from - 1} unkeyed (SHA-256), keyed with HMAC from record {self.keyed_from}"
        extra = "".join(f" ({part})" for part in (keying, f"{self.anchors} expected head(s) match"
                                                 if self.anchors else "") if part)
        return f"audit log intact: {self.checked} records verified{extra}; head hash {self.head_hash}"


def parse_head(text: str) -> tuple[int, str]:
    """An anchored head: "SEQ:HASH" or the JSON object `spinewatch audit head` prints. ValueError if neither."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
            seq, digest = value["seq"], value["hash"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("not a head: JSON needs \"seq\" and \"hash\"") from None
    else:
        seq, sep, digest = text.partition(":")
        if not sep:
            raise ValueError("not a head: expected SEQ:HASH or the JSON of `spinewatch audit head`")
    try:
        seq = int(seq)
    except (TypeError, ValueError):
        raise ValueError(f"not a head: sequence number {seq!r} is not a number") from None
    if seq < 0 or not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("not a head: needs a sequence number >= 0 and a 64-digit lower-case hex hash")
    return seq, digest


@dataclass(frozen=True)
class Head:
    """The one-row `audit_head`: the last sequence number and hash, and the key of the keyed segment."""
    seq: int
    hash: str
    key_id: str | None = None  # key_id() of the key records from `keyed_from` on were written with
    keyed_from: int | None = None

    def to_json(self) -> dict:
        return {"seq": self.seq, "hash": self.hash, "key_id": self.key_id, "keyed_from": self.keyed_from}


class ChainCheck:
    """The verification walk: made with the head (read in the same snapshot as the records), fed the
    stored records in sequence order (`row`), then asked for the verdict (`finish`). Names the first
    record that does not hold.

    key: the HMAC key (bytes) or None; expect: anchored heads {seq: hash} kept outside the database
    (`spinewatch audit head`, the head export file): record seq must have exactly that hash, and the
    log must reach the highest seq (else its tail was deleted and the head rolled back)."""

    def __init__(self, head: Head, key: bytes | None = None, expect: dict[int, str] | None = None):
        self.head = head
        self.key = key
        self.key_id = key_id(key) if key is not None else None
        self.expect = dict(expect or {})
        self.prev, self.checked = GENESIS_HASH, 0
        self.keyed_from: int | None = None
        self.anchors = 0
        self.result: VerifyResult | None = None  # the first break

    def _broken(self, seq: int | None, reason: str) -> VerifyResult:
        self.result = VerifyResult(False, self.checked, seq, reason, keyed_from=self.keyed_from)
        return self.result

    def _wrong_key(self) -> str:
        return (f"wrong key: SPINEWATCH_AUDIT_HMAC_KEY (key id {self.key_id}) is not the key this log was "
                f"written with (key id {self.head.key_id})")

    def row(self, *, seq: int, recorded: str, kind: str, outcome: str, actor: str, patient: str | None,
            detail: str, prev_hash: str, hash: str, hash_v: str | None = None) -> VerifyResult | None:
        """Check the next record: a VerifyResult when it breaks the chain (stop there), else None."""
        expected_seq = self.checked + 1
        if seq != expected_seq:  # ordered by seq (the primary key): only a gap is possible
            missing = (f"record {expected_seq} is missing" if seq == expected_seq + 1
                       else f"records {expected_seq}..{seq - 1} are missing")
            return self._broken(seq, f"{missing} before it (deleted)")
        if prev_hash != self.prev:
            return self._broken(seq, "previous-hash does not match the record before it (a record was "
                                     "deleted, inserted or reordered)")
        version = hash_v or HASH_V1
        if version not in HASH_VERSIONS:
            return self._broken(seq, f"unknown hash version {version!r}")
        if version == HASH_V1 and self.keyed_from is not None:
            return self._broken(seq, f"an unkeyed record after keying began at record {self.keyed_from} "
                                     "(forged or downgraded without the key)")
        if version == HASH_V2:
            if self.keyed_from is None:
                self.keyed_from = seq
            if self.key is None:
                return self._broken(seq, f"records from {seq} on are HMAC-keyed and SPINEWATCH_AUDIT_HMAC_KEY "
                                         "is not set here: they cannot be verified without the key")
        digest = record_hash(seq=seq, recorded=recorded, kind=kind, outcome=outcome, actor=actor, patient=patient,
                             detail=detail, prev_hash=prev_hash, key=self.key if version == HASH_V2 else None)
        if not hmac.compare_digest(digest, hash):
            if version == HASH_V1:
                return self._broken(seq, "content does not match its hash (the record was edited)")
            if self.head.key_id and self.head.key_id != self.key_id:
                return self._broken(seq, self._wrong_key())
            return self._broken(seq, "content does not match its keyed hash (edited, or forged without the key)")
        if seq in self.expect:
            if self.expect[seq] != hash:
                return self._broken(seq, f"record {seq} does not have the expected head hash "
                                         f"{self.expect[seq][:16]}… (the log was rewritten up to here)")
            self.anchors += 1
        self.prev, self.checked = hash, seq
        return None

    def finish(self) -> VerifyResult:
        if self.result is not None:
            return self.result
        head, checked = self.head, self.checked
        if head.seq != checked or head.hash != self.prev:
            if head.seq > checked:
                return self._broken(checked + 1, f"records {checked + 1}..{head.seq} are missing (the log head "
                                                 f"says {head.seq} records)")
            return self._broken(head.seq or None, "the log head does not match the last record")
        if self.expect.get(0, GENESIS_HASH) != GENESIS_HASH:
            return self._broken(None, "an expected head at record 0 must be 64 zeros (the empty log)")
        beyond = [seq for seq in self.expect if seq > checked]
        if beyond:
            top = max(beyond)
            return self._broken(checked + 1, f"the log ends at record {checked} but an expected head names record "
                                             f"{top}: records {checked + 1}..{top} were deleted and the head rolled back")
        if (head.key_id is None) != (self.keyed_from is None) or head.keyed_from != self.keyed_from:
            said = f"keyed from record {head.keyed_from}" if head.keyed_from else "unkeyed"
            found = f"keyed from record {self.keyed_from}" if self.keyed_from else "no keyed record"
            return self._broken(self.keyed_from or head.keyed_from,
                                f"the log head says {said} but the records show {found} (keyed records "
                                "rewritten unkeyed, or the head edited)")
        if head.key_id is not None and head.key_id != self.key_id:  # the records verified with our key
            return self._broken(self.keyed_from, f"the log head names key id {head.key_id}, but the records were "
                                                 f"written with this key (key id {self.key_id}): the head was edited")
        return VerifyResult(True, checked, head_hash=self.prev, head_seq=checked, keyed_from=self.keyed_from,
                            anchors=self.anchors)
