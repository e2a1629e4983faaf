"""The reviewer page in a real browser: headless Debian Chromium, driven over the Chrome DevTools
Protocol, against a live service (uvicorn on 127.0.0.1) with seeded audit records. It signs in with
the reviewer token, filters by patient, checks the timeline, the feedback counts and the events
shown, and saves a screenshot (SPINEWATCH_ARTIFACT_DIR, default /tmp/spinewatch-artifacts).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from tests.support.paths import ROOT

pytestmark = pytest.mark.browser

TOKEN = "browser-test-reviewer-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1100"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Service:
    def __init__(self, db_url: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_AUDIT_DB_URL": db_url,
                            "SPINEWATCH_REVIEWER_TOKEN": TOKEN}
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory",
                                      "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.proc.stderr.read().decode()[-800:]}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("service did not start in 30 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Browser:
    """Headless Chromium and one page, over the DevTools protocol (websockets, already installed)."""

    def __init__(self):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="spinewatch-chromium-")
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
        page = next(t for t in targets if t["type"] == "page")
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
        self.ids = itertools.count(1)

    def send(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.js(f"document.readyState === 'complete' && !!({expression})"):
                    return
            except RuntimeError:
                pass  # the page is navigating
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}; page: {self.js('location.href')}")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def live(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.sqlite"
    seed(url)
    service = Service(url)
    yield service
    service.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_reviewer_signs_in_filters_by_patient_and_sees_the_timeline(live):
    browser = Browser()
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=f"{live.base}/audit")
        browser.wait_for("document.getElementById('token')")

        browser.js(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                   "document.getElementById('login').submit()")
        browser.wait_for("document.getElementById('filters')")
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
