"""Reading the audit log for a reviewer: filters, the per-patient timeline and card feedback counts.

Feedback records come from CDS Hooks 2.0 feedback (https://cds-hooks.hl7.org/2.0/#feedback), which
names the card by uuid only: a feedback record reaches its patient and card type (hook, tier)
through the `card` record that lists that uuid.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

from fhir_mappings.cds.wording import OVERRIDE_REASONS
from service.core.errors import InvalidRequest
from service.infra.audit.records import utc_iso
from service.infra.audit.store import AuditStore

TIMELINE_KINDS = ("notification", "evaluation", "card", "feedback", "alert")
KINDS = TIMELINE_KINDS + ("evidence-view", "auth-failure", "audit-access")


def normalise_patient(value: str | None) -> str | None:
    """A patient filter as stored ("Patient/id"): the page, the API and `spinewatch audit` accept a bare id."""
    value = (value or "").strip() or None
    return f"Patient/{value}" if value and "/" not in value else value


def normalise_time(value: str) -> str:
    """ISO-8601 date or date-time → the store's UTC string form (records compare as strings)."""
    moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return utc_iso(moment)


class Filters:
    def __init__(self, patient: str | None = None, kind: list[str] | None = None, type: list[str] | None = None,
                 outcome: str | None = None, since: str | None = None, until: str | None = None,
                 limit: int = 50, offset: int = 0):
        self.patient = normalise_patient(patient)
        self.kinds = [k for k in (kind or []) + (type or []) if k] or None
        self.outcome = (outcome or "").strip() or None
        try:
            self.since = normalise_time(since) if since else None
            self.until = normalise_time(until) if until else None
        except ValueError:
            raise InvalidRequest("since/until: ISO-8601 date or date-time expected")
        self.limit, self.offset = limit, offset

    def query(self) -> dict:
        return {"patient": self.patient, "kinds": self.kinds, "outcome": self.outcome, "since": self.since,
                "until": self.until}

    def audit_detail(self) -> dict:
        return {k: v for k, v in self.query().items() if v}


@dataclass
class Review:
    records: list
    total: int
    timeline: list
    feedback: dict


def review(store: AuditStore, filters: Filters) -> Review:
    """The reviewer page's content: one page of matching records; with a patient, their timeline
    (feedback on their cards included); and the feedback counts."""
    records, total = store.query(**filters.query(), limit=filters.limit, offset=filters.offset)
    if filters.patient:
        timeline = _page_records(store, list(TIMELINE_KINDS), filters)
        card_records = [r for r in timeline if r.kind == "card"]
        feedback_records = _patient_feedback(store, filters, card_records)
        timeline = sorted([r for r in timeline if r.kind != "feedback"] + feedback_records, key=lambda r: r.seq)
    else:
        timeline, feedback_records = [], _page_records(store, ["feedback"], filters)
        card_records = _page_records(store, ["card"], filters)  # a card before the window: "unknown card"
    return Review(records, total, timeline, feedback_counts(feedback_records, card_records))


def feedback_counts(records, card_records=()) -> dict:
    """Cards accepted and overridden, and the override reasons, from feedback records; and the
    same per card type (hook and tier), which the feedback reaches through its card's `card`
    record (CDS Hooks feedback names only the card's uuid)."""
    kind_of = {uuid: (d.get("hook") or "?", d.get("tier") or "?")
               for r in card_records for d in [r.detail or {}] for uuid in d.get("cards") or []}
    outcomes, reasons = Counter(), Counter()
    by_kind: dict[tuple[str, str], dict] = {}
    for r in records:
        d = r.detail or {}
        outcome = d.get("outcome") or r.outcome
        outcomes[outcome] += 1
        row = by_kind.setdefault(kind_of.get(d.get("card"), ("unknown card", "?")),
                                 {"accepted": 0, "overridden": 0, "reasons": Counter()})
        if outcome in ("accepted", "overridden"):
            row[outcome] += 1
        if outcome == "overridden":
            reasons[_reason_label(d)] += 1
            row["reasons"][_reason_label(d)] += 1
    per_card = [{"hook": hook, "tier": tier, "accepted": row["accepted"], "overridden": row["overridden"],
                 "reasons": row["reasons"].most_common()} for (hook, tier), row in sorted(by_kind.items())]
    return {"accepted": outcomes.get("accepted", 0), "overridden": outcomes.get("overridden", 0),
            "other": sum(n for k, n in outcomes.items() if k not in ("accepted", "overridden")),
            "reasons": reasons.most_common(), "per_card": per_card}


def _reason_label(detail: dict) -> str:
    # CDS Hooks 2.0 feedback: overrideReason.reason is a Coding (stored as system and code); the
    # free-text userComment is never stored. Our own codes are shown with their display.
    reason = detail.get("overrideReason") or detail.get("override_reason") or detail.get("reason")
    if isinstance(reason, dict):
        reason = reason.get("reason", reason)
        if isinstance(reason, dict):
            code = reason.get("code")
            known = next((r["display"] for r in OVERRIDE_REASONS
                          if r["code"] == code and reason.get("system") in (None, r["system"])), None)
            return str(reason.get("display") or known or code or "unspecified")
    return str(reason) if reason else "unspecified"


def _patient_feedback(store: AuditStore, filters: Filters, cards) -> list:
    """Feedback on this patient's cards, matched through the card uuids of the patient's `card` records."""
    uuids = {u for r in cards for u in (r.detail or {}).get("cards") or []}
    if not uuids:
        return []
    q = filters.query() | {"patient": None, "kinds": ["feedback"]}
    records, _ = store.query(**q, limit=20000, newest_first=False)
    return [r for r in records if (r.detail or {}).get("card") in uuids]


def _page_records(store: AuditStore, kinds, filters: Filters, limit: int = 5000):
    q = filters.query() | {"kinds": kinds}
    records, _ = store.query(**q, limit=limit, newest_first=False)
    return records


def summarise(record) -> str:
    """One line for the timeline: codes and references only."""
    d = record.detail or {}
    if record.kind == "notification":
        parts = [d.get("kind") or d.get("type"), _n(d.get("events"), "event"), _n(d.get("focus"), "resource"),
                 d.get("outcome")]
    elif record.kind == "evaluation":
        flags = d.get("flags") or d.get("red_flags") or []
        parts = [f"tier {d.get('tier')}" if d.get("tier") else None, ", ".join(flags) if flags else None,
                 _n(d.get("inputs"), "input"), d.get("origin")]
    elif record.kind == "card":
        parts = [d.get("hook"), _n(d.get("cards"), "card"), d.get("indicator")]
    elif record.kind == "feedback":
        outcome = d.get("outcome") or record.outcome
        parts = [f"card {str(d.get('card'))[:8]}" if d.get("card") else None,
                 _reason_label(d) if outcome == "overridden" else None]
    elif record.kind == "alert":
        parts = [d.get("tier"), d.get("communication"), d.get("channel") or ", ".join(d.get("channels") or []),
                 d.get("error")]
    else:
        parts = [d.get("surface"), d.get("reason"), d.get("action")]
    return " · ".join(str(p) for p in parts if p) or "-"


def _n(value, noun: str) -> str | None:
    if not value:
        return None
    n = len(value) if isinstance(value, (list, dict)) else 1
    return f"{n} {noun}{'' if n == 1 else 's'}"
