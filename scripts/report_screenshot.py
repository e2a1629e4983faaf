"""docs/report-page.png: the review site's MRI standards report (GET /audit/report) in headless
Chromium, on a made-up but realistic audit log: three months, both tiers, two breaches, one patient
who declined the MRI.

    .venv/bin/python scripts/report_screenshot.py [--output PATH]

The service runs for real (uvicorn on 127.0.0.1, an SQLite audit log in a temp dir) and the browser
is driven as tests/service/api/test_report_page_browser.py drives it (tests/support/browser.py),
which checks the figures below on the same records.

Figures by hand (hours from first evidence to MRI; median: the mean of the two middle values for even
n; p90: nearest rank, the ceil(0.9 n)-th smallest):
    2026-09 emergency  9, 14.5, 20, 31.5   3 of 4 within 24 h = 75%    median 17.25  p90 31.5  breach sw-104
    2026-09 urgent     96, 140             2 of 2 within 168 h = 100%  median 118    p90 140
    2026-10 emergency  6.5, 8, 11, 17.5, 22  5 of 5 = 100%             median 11     p90 22
    2026-10 urgent     72, 120, 190        2 of 3 = 67%                median 120    p90 190   breach sw-154
    2026-11 emergency  7, 12, 15.5         3 of 3 = 100% (sw-112 declined: closed early, not counted)
    2026-11 urgent     nobody: no data
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fhir_mappings.cds.wording import OVERRIDE_SYSTEM  # noqa: E402
from service.infra.audit.store import AuditStore  # noqa: E402
from tests.support.browser import Browser, Service, sign_in  # noqa: E402

TOKEN = "report-screenshot-reviewer-token"
REPORT_PATH = "/audit/report?since=2026-09&until=2026-11"
OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "report-page.png"
WINDOW = "1180,900"

# (patient, tier, first evidence (UTC), hours to: alert, order, MRI (None: declined, closed at the
# order's hour), escalated; the card's feedback: accepted, an override reason code, or none)
EPISODES = [
    ("sw-101", "emergency", "2026-09-03T09:10", 0.3, 2.5, 9.0, None, "accepted"),
    ("sw-102", "emergency", "2026-09-11T22:40", 0.5, 3.0, 14.5, None, "accepted"),
    ("sw-103", "emergency", "2026-09-19T07:05", 0.4, 1.5, 20.0, None, "already-imaged"),
    ("sw-104", "emergency", "2026-09-27T16:30", 1.0, 6.0, 31.5, 12.0, None),
    ("sw-151", "urgent", "2026-09-08T10:00", 2.0, 20.0, 96.0, None, "accepted"),
    ("sw-152", "urgent", "2026-09-22T14:00", 4.0, 30.0, 140.0, None, "not-clinically-relevant"),
    ("sw-105", "emergency", "2026-10-02T11:20", 0.2, 1.0, 6.5, None, "accepted"),
    ("sw-106", "emergency", "2026-10-09T03:50", 0.6, 2.0, 11.0, None, "accepted"),
    ("sw-107", "emergency", "2026-10-15T18:15", 0.3, 4.0, 17.5, None, "accepted"),
    ("sw-108", "emergency", "2026-10-21T08:00", 0.4, 2.5, 22.0, None, "accepted"),
    ("sw-109", "emergency", "2026-10-28T13:40", 0.5, 3.0, 8.0, None, None),
    ("sw-153", "urgent", "2026-10-05T09:30", 3.0, 24.0, 72.0, None, "accepted"),
    ("sw-154", "urgent", "2026-10-12T15:00", 1.5, 48.0, 190.0, 100.0, "already-imaged"),
    ("sw-155", "urgent", "2026-10-19T10:45", 2.0, 12.0, 120.0, None, None),
    ("sw-110", "emergency", "2026-11-04T07:30", 0.3, 1.5, 7.0, None, "accepted"),
    ("sw-111", "emergency", "2026-11-12T20:10", 0.4, 2.0, 12.0, None, "accepted"),
    ("sw-112", "emergency", "2026-11-18T09:00", 0.5, 5.0, None, None, "patient-declined"),
    ("sw-113", "emergency", "2026-11-25T16:00", 0.2, 1.0, 15.5, None, "accepted"),
]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _clock_events(order_h: float, mri_h: float | None, escalated_h: float | None, target_h: int) -> list:
    """(event, hours after first evidence, close reason) as the MRI clock writes them."""
    if mri_h is None:  # the patient declined (the card overridden): the clock closes the episode
        return [("started", 0, None), ("closed", order_h, "patient-declined")]
    events = [("started", 0, None), ("ordered", order_h, None), ("done", mri_h, None), ("closed", mri_h, "done")]
    if escalated_h is not None:
        events.append(("escalated", escalated_h, None))
    if mri_h > target_h:
        events.append(("breached", target_h, None))
    return sorted(events, key=lambda e: e[1])


def seed(store: AuditStore) -> None:
    """The records the MRI clock and the CDS Hooks routes would have written, each at its own time."""
    targets = {"emergency": 24, "urgent": 168}
    for name, tier, first_text, alert_h, order_h, mri_h, escalated_h, feedback in EPISODES:
        patient = f"Patient/{name}"
        first = datetime.fromisoformat(first_text).replace(tzinfo=timezone.utc)
        card = f"card-{name}"
        store.append("card", "success", actor="https://ehr.example.org", patient=patient,
                     at=first + timedelta(minutes=5),
                     detail={"hook": "patient-view", "hookInstance": f"hook-{name}", "tier": tier, "cards": [card]})
        if feedback == "accepted":
            store.append("feedback", "accepted", actor="https://ehr.example.org", at=first + timedelta(minutes=8),
                         detail={"card": card})
        elif feedback:
            store.append("feedback", "overridden", actor="https://ehr.example.org", at=first + timedelta(minutes=8),
                         detail={"card": card, "overrideReason": {"system": OVERRIDE_SYSTEM, "code": feedback}})
        for event, after, reason in _clock_events(order_h, mri_h, escalated_h, targets[tier]):
            at = first + timedelta(hours=after)
            alerted = _iso(first + timedelta(hours=alert_h)) if after >= alert_h else None
            store.append("mri-clock", "success", actor="worker", patient=patient, at=at,
                         detail={"event": event, "episode": f"{name}-1", "tier": tier, "first_evidence_at": _iso(first),
                                 "alerted_at": alerted, "deadline": _iso(first + timedelta(hours=targets[tier])),
                                 "at": _iso(at), "reason": reason, "communication": None})


def open_report(browser: Browser, base: str) -> None:
    sign_in(browser, base, TOKEN)
    browser.open(base + REPORT_PATH, "document.getElementById('chart-share')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    output = parser.parse_args().output
    with tempfile.TemporaryDirectory(prefix="spinewatch-report-") as tmp:
        url = f"sqlite:///{tmp}/audit.sqlite"
        store = AuditStore(url)
        seed(store)
        store.dispose()
        service = Service(url, TOKEN)
        try:
            browser = Browser(window=WINDOW)
            try:
                open_report(browser, service.base)
                browser.screenshot(output)
            finally:
                browser.close()
        finally:
            service.stop()
    print(f"{output}: {output.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
