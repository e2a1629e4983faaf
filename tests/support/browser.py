"""A live SpineWatch service and a headless Debian Chromium driven over the Chrome DevTools Protocol
(https://chromedevtools.github.io/devtools-protocol/), for the browser tests and the docs' screenshots.
No pytest import here, so scripts/ can use it too::

    service = Service(db_url, token)          # uvicorn on 127.0.0.1, a free port
    browser = Browser()
    browser.send("Network.enable")            # then browser.requested(): every URL the page asked for
    sign_in(browser, service.base, token)
    browser.open(f"{service.base}/audit/report", "document.getElementById('chart-share')")
    browser.screenshot(path)
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.paths import ROOT
from tests.support.redis_server import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Service:
    """`uvicorn service.api.app:create_app` on 127.0.0.1 with this audit log and reviewer token."""

    def __init__(self, db_url: str, token: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_AUDIT_DB_URL": db_url,
                            "SPINEWATCH_REVIEWER_TOKEN": token}
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
    """Headless Chromium and one page, over the DevTools protocol (websockets, already installed).
    The events the browser sends between answers are kept in `events` (Network.*, Log.* once enabled)."""

    def __init__(self, window: str = "1280,1100"):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="spinewatch-chromium-")
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--window-size={window}", f"--user-data-dir={self.profile}",
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
        self.events: list[dict] = []

    def send(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

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

    def open(self, url: str, ready: str) -> None:
        """Navigate and wait until `ready` (a JS expression) holds."""
        self.send("Page.navigate", url=url)
        self.wait_for(ready)

    def requested(self) -> list[str]:
        """Every URL the page asked for since Network.enable (documents, styles, images, fonts...)."""
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def logged(self) -> list[dict]:
        """The browser's log entries since Log.enable (CSP refusals among them), as {level, source, text}."""
        return [e["params"]["entry"] for e in self.events if e["method"] == "Log.entryAdded"]

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


def sign_in(browser: Browser, base: str, token: str) -> None:
    """The reviewer's token form at /audit, submitted; back on /audit, signed in."""
    browser.send("Page.enable")
    browser.open(f"{base}/audit", "document.getElementById('token')")
    browser.js(f"document.getElementById('token').value = {json.dumps(token)};"
               "document.getElementById('login').submit()")
    browser.wait_for("document.getElementById('filters')")
