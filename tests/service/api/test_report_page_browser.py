"""The MRI standards report page in a real browser: headless Debian Chromium over the Chrome DevTools
Protocol, against a live service (uvicorn on 127.0.0.1) with the records of scripts/report_screenshot.py
(the figures are worked out by hand in its docstring). It signs in, follows the link from /audit,
checks the charts as drawn (SVG, under the review site's CSP) and the breach links, that every request
went to 127.0.0.1 (nothing from a CDN), and saves a screenshot (SPINEWATCH_ARTIFACT_DIR, default
/tmp/spinewatch-artifacts)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from scripts.report_screenshot import REPORT_PATH, TOKEN, seed
from service.infra.audit.store import AuditStore
from tests.support.browser import CHROMIUM, Browser, Service, sign_in

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")]


@pytest.fixture
def live(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.sqlite"
    store = AuditStore(url)
    seed(store)
    store.dispose()
    service = Service(url, TOKEN)
    yield service
    service.stop()


@pytest.fixture
def browser():
    browser = Browser()
    browser.send("Network.enable")  # every request the page makes, as Network.requestWillBeSent
    browser.send("Log.enable")  # CSP refusals arrive as Log.entryAdded, source "security"
    yield browser
    browser.close()


def texts(browser: Browser, selector: str) -> list[str]:
    return browser.js(f"[...document.querySelectorAll({selector!r})].map(e => e.textContent.trim())")


def test_reviewer_opens_the_report_sees_the_charts_and_follows_a_breach(live, browser):
    sign_in(browser, live.base, TOKEN)
    browser.js("document.getElementById('report-link').click()")
    browser.wait_for("document.getElementById('chart-share')")
    assert browser.js("location.pathname") == "/audit/report"

    browser.open(live.base + REPORT_PATH, "document.getElementById('chart-share')")
    charts = browser.js("[...document.querySelectorAll('svg.chart')].map(s => [s.id, s.getAttribute('role'), "
                        "s.querySelector('title').textContent, s.querySelector('desc').textContent])")
    assert [c[0] for c in charts] == ["chart-share", "chart-hours-emergency", "chart-hours-urgent"]
    assert all(role == "img" and title and desc for _, role, title, desc in charts)
    # September, October, November; emergency then urgent. November urgent: nobody, so no bar at all.
    assert texts(browser, "#chart-share text.bar-label") == ["75%", "100%", "100%", "67%", "100%", "no data"]
    assert texts(browser, "#chart-hours-urgent text.bar-label") == ["118 h", "140 h", "120 h", "190 h", "no data"]
    # Drawn as laid out: the 75% bar is 0.75 of the 160 px plot, filled as its attribute says (the
    # CSP let the presentation attributes through), and the dashed target line is on the chart.
    assert browser.js("document.querySelector('#chart-share rect.bar').getBBox().height") == 120
    assert browser.js("getComputedStyle(document.querySelector('#chart-share rect.bar')).fill") == "rgb(201, 48, 44)"
    assert texts(browser, "#chart-hours-emergency line.target + text") == ["target 24 h"]
    assert texts(browser, "#share-table tr#share-2026-11-urgent td.share") == ["no data"]

    links = browser.js("[...document.querySelectorAll('#breaches a.timeline-link')].map(a => a.getAttribute('href'))")
    assert links == ["/audit?patient=Patient%2Fsw-104", "/audit?patient=Patient%2Fsw-154"]

    artifacts = Path(os.environ.get("SPINEWATCH_ARTIFACT_DIR", "/tmp/spinewatch-artifacts"))
    shot = artifacts / "report-page.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser.js("document.querySelector('#breaches a.timeline-link').click()")
    browser.wait_for("document.getElementById('timeline')")
    assert browser.js("location.search") == "?patient=Patient%2Fsw-104"

    requested = browser.requested()
    assert any(url.startswith(f"{live.base}/audit/report?") for url in requested)
    assert {urlsplit(url).hostname for url in requested} == {"127.0.0.1"}  # no CDN, no font, nothing else
    assert [e["text"] for e in browser.logged() if e["source"] == "security"] == []  # no CSP refusal
