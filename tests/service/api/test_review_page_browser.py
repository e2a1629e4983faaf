"""The reviewer page in a real browser: headless Debian Chromium, driven over the Chrome DevTools
Protocol, against a live service (uvicorn on 127.0.0.1) with seeded audit records. It signs in with
the reviewer token, filters by patient, checks the timeline, the feedback counts and the events
shown, and saves a screenshot (SPINEWATCH_ARTIFACT_DIR, default /tmp/spinewatch-artifacts).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from tests.support.browser import CHROMIUM, Browser, Service, sign_in

pytestmark = pytest.mark.browser

TOKEN = "browser-test-reviewer-token"


def seed(url: str) -> None:
    from fhir_mappings.cds.wording import OVERRIDE_SYSTEM
    from service.infra.audit.store import AuditStore

    store = AuditStore(url)
    rows = [
        ("notification", "success", "Patient/alpha", {"kind": "event-notification", "events": [3],
                                                      "focus": ["Condition/c1"], "outcome": "queued"}),
        ("evaluation", "success", "Patient/alpha", {"tier": "emergency", "flags": ["limb-weakness"],
                                                    "inputs": {"Condition/c1": "2", "Observation/o1": "1"}}),
        ("card", "success", "Patient/alpha", {"hook": "patient-view", "hookInstance": "h1", "cards": ["card-a"]}),
        ("card", "success", "Patient/beta", {"hook": "patient-view", "hookInstance": "h2", "cards": ["card-b"]}),
        ("feedback", "overridden", None, {"card": "card-a", "overrideReason": {"system": OVERRIDE_SYSTEM,
                                                                               "code": "already-imaged"}}),
        ("feedback", "accepted", None, {"card": "card-b"}),
        ("alert", "success", "Patient/alpha", {"tier": "emergency", "communication": "Communication/k1",
                                               "channels": ["fhir"]}),
        ("evaluation", "success", "Patient/beta", {"tier": "urgent", "flags": ["nocturnal-pain"]}),
    ]
    for kind, outcome, patient, detail in rows:
        store.append(kind, outcome, actor="seed", patient=patient, detail=detail)
    store.dispose()


@pytest.fixture
def live(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.sqlite"
    seed(url)
    service = Service(url, TOKEN)
    yield service
    service.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_reviewer_signs_in_filters_by_patient_and_sees_the_timeline(live):
    browser = Browser()
    try:
        sign_in(browser, live.base, TOKEN)
        # Without a patient filter: every patient's records, all feedback counted.
        assert browser.js("document.getElementById('count-accepted').textContent") == "1"
        assert set(browser.js("[...document.querySelectorAll('#events td.patient')].map(td => td.textContent)")) \
            >= {"Patient/alpha", "Patient/beta"}

        browser.js("document.getElementById('patient').value = 'Patient/alpha';"
                   "document.getElementById('filters').submit()")
        browser.wait_for("location.search.includes('patient=Patient%2Falpha') && document.getElementById('timeline')")

        kinds = browser.js("[...document.querySelectorAll('#timeline li')].map(li => li.dataset.kind)")
        assert kinds == ["notification", "evaluation", "card", "feedback", "alert"]
        timeline_text = browser.js("document.getElementById('timeline').innerText")
        assert "tier emergency" in timeline_text and "Communication/k1" in timeline_text
        assert "Already imaged elsewhere" in timeline_text  # the override reason, by its display
        patients = set(browser.js("[...document.querySelectorAll('#events td.patient')].map(td => td.textContent)"))
        assert patients == {"Patient/alpha"}
        assert browser.js("document.getElementById('count-overridden').textContent") == "1"
        assert browser.js("document.getElementById('count-accepted').textContent") == "0"
        assert "Already imaged elsewhere" in browser.js("document.getElementById('override-reasons').innerText")

        artifacts = Path(os.environ.get("SPINEWATCH_ARTIFACT_DIR", "/tmp/spinewatch-artifacts"))
        shot = artifacts / "review-page-patient-alpha.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.close()

    # The reviewer's views were themselves audited (BALP: access to the audit trail is audited).
    body = httpx.get(f"{live.base}/audit/events", params={"type": "audit-access"},
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()
    assert any(e["patient"] == "Patient/alpha" for e in body["events"])
