"""`spinewatch report`: the MRI standards SpineWatch is measured by, computed from the audit log.

- NICE quality standard QS56, statement 3 (https://www.nice.org.uk/guidance/qs56): adults with
  suspected metastatic spinal cord compression have a whole-spine MRI within 24 hours (our tier
  `emergency`).
- NICE CG75 / NG234 (https://www.nice.org.uk/guidance/ng234): suspected spinal metastasis without
  neurological signs, MRI within 1 week (our tier `urgent`).

Episodes come from the MRI clock's `mri-clock` records (detail: event started | upgraded | ordered |
done | escalated | breached | closed, episode, tier, first_evidence_at, alerted_at, deadline, at,
reason); card acceptance from `card` and `feedback` records. `build_report` is pure: plain record
dicts (the shape of `AuditRecord.to_json()`) in, one JSON-ready document out; `read_records` is the
only part that reads the store. Definitions: `DEFINITIONS` below, and docs/report.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Iterator
from urllib.parse import urlencode

from fhir_mappings.cds.wording import DEADLINE
from service.infra.audit.records import utc_iso
from service.infra.audit.store import AuditStore

TIERS = ("emergency", "urgent")
TARGET_HOURS = {tier: int(DEADLINE[tier].total_seconds() // 3600) for tier in TIERS}  # 24; 168
# The clock closes an urgent episode "upgraded" when the patient becomes an emergency and opens a new,
# emergency episode: the patient counts once, in the emergency one.
SUPERSEDED = "upgraded"
KINDS = ["mri-clock", "card", "feedback"]

DEFINITIONS = {
    "month": "calendar month (UTC) of the episode's first evidence (episodes) or of the card record (cards)",
    "tier": "emergency (suspected MSCC, target 24 h, NICE QS56 statement 3) or urgent (suspected spinal "
            "metastasis, target 7 days, NICE CG75/NG234); a patient upgraded urgent -> emergency counts once, in "
            "the emergency episode (the urgent one, closed `upgraded`, is left out)",
    "flagged": "patient episodes (one per patient and MRI-clock episode: the first emergency or urgent evaluation)",
    "alert_hours": "hours from first evidence to the care-team alert (alerted_at)",
    "order_hours": "hours from first evidence to the first MRI order (negative: an open order placed before it)",
    "mri_hours": "hours from first evidence to the first MRI done",
    "median": "the middle value (the mean of the two middle values when n is even)",
    "p90": "90th percentile, nearest-rank method: the ceil(0.9 x n)-th smallest value",
    "target_hours": "24 (emergency) or 168 (urgent), counted from first evidence",
    "met": "MRI done at or before first evidence + target",
    "breaches": "MRI done after the target, or no MRI by the time the target passed (also when the episode was "
                "closed after that); each listed with patient, episode and its audit timeline URL",
    "open": "no MRI yet, not closed, target not yet passed: excluded from the denominator until the target passes",
    "closed_early": "closed without an MRI before the target passed (e.g. the suspicion was withdrawn): excluded "
                    "from the denominator, listed with the clock's reason",
    "denominator": "met + breaches",
    "met_share": "met / denominator (null when the denominator is 0)",
    "escalated": "episodes with at least one escalation",
    "cards_served": "emergency / urgent cards served (card uuids in `card` records of that month and tier)",
    "cards_accepted": "CDS Hooks feedback `accepted` on those cards",
    "cards_overridden": "CDS Hooks feedback `overridden` on those cards",
    "override_reasons": "override reason codes (overrideReason.reason.code; `unspecified` without one) -> count",
}

CSV_COLUMNS = ("month", "tier", "flagged", "open", "closed_early",
               "alert_n", "alert_median_h", "alert_p90_h", "order_n", "order_median_h", "order_p90_h",
               "mri_n", "mri_median_h", "mri_p90_h", "target_h", "met", "denominator", "met_share",
               "breaches", "escalated", "cards_served", "cards_accepted", "cards_overridden", "override_reasons")


def parse_month(value: str) -> str:
    """"YYYY-MM" (a real month) or ValueError."""
    text = value.strip()
    if not re.fullmatch(r"\d{4}-\d{2}", text) or not 1 <= int(text[5:]) <= 12:
        raise ValueError(f"expected a month as YYYY-MM, not {value!r}")
    return text


def month_start(month: str) -> datetime:
    return datetime(int(month[:4]), int(month[5:]), 1, tzinfo=timezone.utc)


def _month_of(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m")


def _months(first: str, last: str) -> list[str]:
    year, month, months = int(first[:4]), int(first[5:]), []
    while f"{year:04d}-{month:02d}" <= last:
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def _time(value) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the ceil(p/100 x n)-th smallest value (always one of the values)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]


def summary(hours: list[float]) -> dict:
    if not hours:
        return {"n": 0, "median": None, "p90": None}
    return {"n": len(hours), "median": round(statistics.median(hours), 2), "p90": round(percentile(hours, 90), 2)}


@dataclass
class Episode:
    patient: str | None
    episode: str
    tier: str | None = None
    first_evidence: datetime | None = None
    alerted: datetime | None = None
    ordered: datetime | None = None
    done: datetime | None = None
    closed: datetime | None = None
    closed_reason: str | None = None
    escalations: int = 0

    def see(self, detail: dict, recorded: str) -> None:
        """Fold one mri-clock record in (records in chain order): the latest tier, first evidence and
        alert time (an alert sent after the start reaches the later records), the first order and MRI
        done, the first close."""
        if detail.get("tier") in TIERS:
            self.tier = detail["tier"]
        self.first_evidence = _time(detail.get("first_evidence_at")) or self.first_evidence
        self.alerted = _time(detail.get("alerted_at")) or self.alerted
        at = _time(detail.get("at")) or _time(recorded)
        event = detail.get("event")
        if event == "ordered" and self.ordered is None:
            self.ordered = at
        elif event == "done" and self.done is None:
            self.done = at
        elif event == "escalated":
            self.escalations += 1
        elif event == "closed" and self.closed is None:
            self.closed, self.closed_reason = at, detail.get("reason")

    @property
    def target_end(self) -> datetime:
        return self.first_evidence + DEADLINE[self.tier]

    def status(self, now: datetime) -> str:
        """met | breach | closed_early | open, judged against first evidence + the tier's target."""
        if self.done is not None:
            return "met" if self.done <= self.target_end else "breach"
        if self.closed is not None and self.closed < self.target_end:
            return "closed_early"
        return "breach" if now >= self.target_end else "open"

    def hours_to(self, moment: datetime | None) -> float | None:
        return None if moment is None else (moment - self.first_evidence).total_seconds() / 3600


def episodes(records: Iterable[dict]) -> list[Episode]:
    """One Episode per (patient, episode id) from mri-clock records; left out: those superseded by an
    upgrade, and those without a tier or first evidence time (nothing to measure them against)."""
    found: dict[tuple, Episode] = {}
    for record in sorted((r for r in records if r["kind"] == "mri-clock"), key=lambda r: r["seq"]):
        detail = record.get("detail") or {}
        if not detail.get("episode"):
            continue
        key = (record.get("patient"), str(detail["episode"]))
        found.setdefault(key, Episode(*key)).see(detail, record["recorded"])
    return [e for e in found.values() if e.tier and e.first_evidence and e.closed_reason != SUPERSEDED]


def review_url(review_base: str, patient: str | None) -> str | None:
    """The review site's per-patient audit timeline (GET /audit?patient=...)."""
    return f"{review_base.rstrip('/')}/audit?{urlencode({'patient': patient})}" if patient else None


def _override_code(detail: dict) -> str:
    reason = detail.get("overrideReason") or {}
    return str(reason.get("code") or "unspecified") if isinstance(reason, dict) else "unspecified"


def _card_counts(records: list[dict]) -> dict[tuple[str, str], dict]:
    """(month, tier) -> cards served, accepted, overridden and override reasons. Feedback (CDS Hooks
    2.0 names the card by uuid only) counts in the month and tier of the card record it answers."""
    counts: dict[tuple[str, str], dict] = {}
    card_row: dict[str, dict] = {}
    for record in records:
        detail = record.get("detail") or {}
        recorded = _time(record["recorded"])
        if record["kind"] == "card" and detail.get("tier") in TIERS and recorded:
            row = counts.setdefault((_month_of(recorded), detail["tier"]),
                                    {"served": 0, "accepted": 0, "overridden": 0, "reasons": Counter()})
            for uuid in detail.get("cards") or []:
                row["served"] += 1
                card_row[uuid] = row
    for record in records:
        detail = record.get("detail") or {}
        row = card_row.get(detail.get("card")) if record["kind"] == "feedback" else None
        if row is None:
            continue
        outcome = detail.get("outcome") or record["outcome"]
        if outcome in ("accepted", "overridden"):
            row[outcome] += 1
        if outcome == "overridden":
            row["reasons"][_override_code(detail)] += 1
    return counts


def _listed(e: Episode, review_base: str, **extra) -> dict:
    return {"patient": e.patient, "episode": e.episode, "tier": e.tier, "first_evidence_at": utc_iso(e.first_evidence),
            **extra, "review_url": review_url(review_base, e.patient)}


def _row(month: str, tier: str, found: list[Episode], cards: dict | None, now: datetime, review_base: str) -> dict:
    status = {id(e): e.status(now) for e in found}
    met = sum(s == "met" for s in status.values())
    breaches = [e for e in found if status[id(e)] == "breach"]
    denominator = met + len(breaches)
    cards = cards or {"served": 0, "accepted": 0, "overridden": 0, "reasons": Counter()}
    return {
        "month": month, "tier": tier, "flagged": len(found),
        "open": sum(s == "open" for s in status.values()),
        "alert_hours": summary([h for e in found if (h := e.hours_to(e.alerted)) is not None]),
        "order_hours": summary([h for e in found if (h := e.hours_to(e.ordered)) is not None]),
        "mri_hours": summary([h for e in found if (h := e.hours_to(e.done)) is not None]),
        "target_hours": TARGET_HOURS[tier], "met": met, "denominator": denominator,
        "met_share": round(met / denominator, 4) if denominator else None,
        "escalated": sum(e.escalations > 0 for e in found),
        "breaches": [_listed(e, review_base, target_end=utc_iso(e.target_end),
                             mri_done_at=utc_iso(e.done) if e.done else None,
                             mri_hours=round(e.hours_to(e.done), 2) if e.done else None, escalations=e.escalations)
                     for e in breaches],
        "closed_early": [_listed(e, review_base, closed_at=utc_iso(e.closed), reason=e.closed_reason)
                         for e in found if status[id(e)] == "closed_early"],
        "cards_served": cards["served"], "cards_accepted": cards["accepted"],
        "cards_overridden": cards["overridden"], "override_reasons": dict(cards["reasons"].most_common()),
    }


def build_report(records: Iterable[dict], *, now: datetime, since: str | None = None, until: str | None = None,
                 review_base: str = "") -> dict:
    """The report for months since..until (YYYY-MM, both included; defaults: the first month with
    data, and the month of `now`), one row per month and tier, judged as of `now`."""
    records = list(records)
    found = episodes(records)
    cards = _card_counts(records)
    until = until or _month_of(now)
    months_seen = [_month_of(e.first_evidence) for e in found] + [month for month, _ in cards]
    since = since or min(months_seen, default=until)
    rows = [_row(month, tier, [e for e in found if e.tier == tier and _month_of(e.first_evidence) == month],
                 cards.get((month, tier)), now, review_base)
            for month in _months(since, until) for tier in TIERS]
    return {"report": "spinewatch-mri-standards", "generated_at": utc_iso(now), "since": since, "until": until,
            "definitions": DEFINITIONS, "rows": rows}


def csv_rows(report: dict) -> Iterator[list]:
    """The CSV: a header (CSV_COLUMNS), then one row per month and tier; override reasons as
    "code=n;code=n" (most frequent first); empty cells for figures with no data."""
    yield list(CSV_COLUMNS)
    for row in report["rows"]:
        stats = [row[name][part] for name in ("alert_hours", "order_hours", "mri_hours")
                 for part in ("n", "median", "p90")]
        values = [row["month"], row["tier"], row["flagged"], row["open"], len(row["closed_early"]), *stats,
                  row["target_hours"], row["met"], row["denominator"], row["met_share"], len(row["breaches"]),
                  row["escalated"], row["cards_served"], row["cards_accepted"], row["cards_overridden"],
                  ";".join(f"{code}={n}" for code, n in row["override_reasons"].items())]
        yield ["" if value is None else value for value in values]


def render(report: dict, format: str) -> str:
    """The report as one JSON document or as CSV (`csv_rows`): what `spinewatch report` prints and the
    review site's downloads serve."""
    if format == "json":
        return json.dumps(report, indent=2, sort_keys=True) + "\n"
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(csv_rows(report))
    return out.getvalue()


def access_detail(report: dict, format: str) -> dict:
    """The detail of the `audit-access` record (action `report`) written for each reading: the report
    names the patients of breaches, so reading it is audited like an export."""
    return {"action": "report", "format": format, "since": report["since"], "until": report["until"],
            "count": len(report["rows"])}


def read_records(store: AuditStore, since: str | None, page: int = 1000) -> Iterator[dict]:
    """The records the report needs, in chain order. Recorded from the first month on only: an
    episode's records all come after its first evidence, feedback after its card."""
    offset = 0
    start = utc_iso(month_start(since)) if since else None
    while True:
        records, total = store.query(kinds=KINDS, since=start, limit=page, offset=offset, newest_first=False)
        yield from (r.to_json() for r in records)
        offset += page
        if offset >= total or not records:
            return
