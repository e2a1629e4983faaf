"""Run the real FHIR R4 server `sekmet-fhir` as a subprocess for integration/e2e tests and the demo.

Pure stdlib + httpx (no pytest import), so `spinewatch demo` can use it too::

    with SekmetServer() as fhir:          # 127.0.0.1, free port, empty store in a temp dir, no auth
        httpx.get(f"{fhir.base_url}/metadata")

    python tests/support/sekmet_server.py [--port N] [--data-dir DIR]   # run one by hand until Ctrl-C

How sekmet is started (read from sekmet 0.1.1 `cli.py`/`config.py`, see docs/sekmet.md):
`python -m sekmet.cli serve --config settings.yaml --host H --port P`. `--port` only moves the socket:
the FHIR base that sekmet writes into Location headers, search links, notification Bundles and
`Subscription/{id}` references comes from `base_url` in the settings file, so both are set. The
settings file also moves the SQLite store out of the working directory (default `./data/sekmet.db`)
and turns the order/appointment simulator off, which would otherwise write resources of its own
2 s after an active ServiceRequest/Task/Appointment/MedicationRequest/Claim arrives.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Iterable

import httpx

FHIR_JSON = "application/fhir+json"
# Env vars sekmet's load_settings() lets override the settings file; a stray one would point the
# server at another port/store, so they are dropped from the child's environment.
_SEKMET_OVERRIDES = ("SEKMET_CONFIG", "SEKMET_BASE_URL", "SEKMET_DB", "SEKMET_PUBLIC_URL", "SEKMET_PORT")
# Extension URLs sekmet reads to define a SubscriptionTopic as an R4 Basic resource
# (sekmet/subscriptions/backport.py, same encoding as fhir-candle).
_ST = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic"


class SekmetStartError(RuntimeError):
    """sekmet did not come up; the message ends with the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL. sekmet has no child processes (uvicorn without --reload), but it runs in
    its own session, so the whole group is signalled to be sure nothing is left behind."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        # Shutdown joins sekmet's notification thread pool, which first works off queued deliveries
        # (up to ~7 s each for a dead subscriber), hence the bounded wait before SIGKILL.
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait(timeout=5)


def create(fhir: httpx.Client, resource: dict) -> dict:
    """POST `resource` with a client on the FHIR base (SekmetServer.client()): the created resource
    (201 asserted, the server's answer in the failure)."""
    answer = fhir.post(f"/{resource['resourceType']}", json=resource)
    assert answer.status_code == 201, answer.text
    return answer.json()


class SekmetServer:
    """One sekmet FHIR server subprocess on 127.0.0.1.

    port: fixed port, or None for a free one. data_dir: where the SQLite store lives; None means a fresh
    temp dir that is deleted on stop (a given data_dir is kept, so a restart sees the same data).
    simulator: let sekmet's filler simulator react to orders (off by default: an empty, passive store).
    validation: sekmet's inbound structural validation (R4B models): "strict" rejects invalid
    resources with 400, "warn" accepts them, "off" skips it.
    settings: extra top-level keys merged into sekmet's settings file (e.g. {"subscriptions": {...}}).
    """

    def __init__(self, port: int | None = None, data_dir: str | os.PathLike | None = None, *,
                 host: str = "127.0.0.1", simulator: bool = False, validation: str = "strict",
                 settings: dict[str, Any] | None = None, startup_timeout: float = 30.0,
                 stop_timeout: float = 5.0, python: str | None = None):
        self.host = host
        self._requested_port = port
        self.port: int | None = port
        self._given_data_dir = Path(data_dir).resolve() if data_dir else None
        self.simulator = simulator
        self.validation = validation
        self.extra_settings = settings or {}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.python = python or sys.executable
        self.process: subprocess.Popen | None = None
        self.run_dir: Path | None = None
        self.data_dir: Path | None = self._given_data_dir
        self.log_path: Path | None = None
        self._log_file = None
        self._finalizer: weakref.finalize | None = None
        self._token = secrets.token_hex(6)

    # ---------------- URLs ----------------

    @property
    def root_url(self) -> str:
        if self.port is None:
            raise RuntimeError("SekmetServer is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """FHIR base, e.g. http://127.0.0.1:PORT/fhir (no trailing slash)."""
        return f"{self.root_url}/fhir"

    # ---------------- lifecycle ----------------

    def start(self) -> "SekmetServer":
        if self.process is not None:
            raise RuntimeError("SekmetServer already started")
        self.run_dir = Path(tempfile.mkdtemp(prefix="sekmet-"))
        self.data_dir = self._given_data_dir or self.run_dir / "data"
        self.log_path = self.run_dir / "sekmet.log"
        attempts = 1 if self._requested_port else 3  # a free port can be taken between probe and bind
        try:
            for attempt in range(attempts):
                self.port = self._requested_port or free_port(self.host)
                if self._requested_port and not _port_free(self.host, self.port):
                    raise SekmetStartError(f"port {self.host}:{self.port} is already in use")
                try:
                    self._spawn_and_wait()
                    break
                except SekmetStartError as e:
                    self._kill()
                    if attempt + 1 < attempts and "address already in use" in str(e).lower():
                        continue
                    raise
        except BaseException:
            self._cleanup_files()
            raise
        return self

    def _write_settings(self) -> Path:
        settings: dict[str, Any] = {
            "base_url": self.base_url,
            "host": self.host,
            "port": self.port,
            "data_dir": str(self.data_dir),
            "server_auth": {"types": ["none"]},
            "simulator": {"enabled": self.simulator},
            "validation": {"inbound": self.validation},
            # keys/ would otherwise be looked up relative to the working directory
            "own_private_key_path": str(self.run_dir / "keys" / "sekmet_private.pem"),
            # shown in CapabilityStatement.implementation.description: proves that the server answering
            # /metadata is this process and not another one already bound to the same port
            "facility_name": f"SEKMET General Hospital [{self._token}]",
        }
        for key, value in self.extra_settings.items():
            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
        path = self.run_dir / "settings.yaml"
        path.write_text(json.dumps(settings, indent=2))  # JSON is YAML; no yaml import needed here
        return path

    def _spawn_and_wait(self) -> None:
        config = self._write_settings()
        env = {k: v for k, v in os.environ.items() if k not in _SEKMET_OVERRIDES}
        env["SEKMET_CONFIG"] = str(config)
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [self.python, "-m", "sekmet.cli", "serve", "--config", str(config),
               "--host", self.host, "--port", str(self.port)]
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            cmd, cwd=self.run_dir, env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True)
        # stop it even if the caller forgets: finalize also runs at interpreter exit (not on SIGKILL)
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self.stop_timeout)
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code is not None:
                    raise SekmetStartError(
                        f"sekmet exited with code {code} before answering {self.base_url}/metadata\n"
                        f"command: {' '.join(cmd)}\n--- log tail ---\n{self.log_tail()}")
                try:
                    r = client.get(f"{self.base_url}/metadata", headers={"Accept": FHIR_JSON})
                    if r.status_code == 200:
                        impl = (r.json().get("implementation") or {}).get("description", "")
                        if self._token in impl:
                            return
                        last_error = f"another server answers on port {self.port}: {impl!r}"
                    else:
                        last_error = f"HTTP {r.status_code}"
                except (httpx.HTTPError, ValueError) as e:
                    last_error = repr(e)
                time.sleep(0.1)
        raise SekmetStartError(
            f"sekmet did not answer GET {self.base_url}/metadata within {self.startup_timeout:.0f} s "
            f"(last: {last_error})\ncommand: {' '.join(cmd)}\n--- log tail ---\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _kill(self) -> None:
        if self.process is not None:
            _stop_process(self.process, self.stop_timeout)
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _cleanup_files(self) -> None:
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # holds data/ unless data_dir was given
            self.run_dir = None

    def stop(self) -> None:
        """Terminate (then kill) the server and delete its temp files. Safe to call twice."""
        self._kill()
        self._cleanup_files()
        if self._requested_port is None:
            self.port = None

    def __enter__(self) -> "SekmetServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------- conveniences for tests ----------------

    def client(self, **kwargs: Any) -> httpx.Client:
        """httpx.Client on the FHIR base speaking application/fhir+json."""
        headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON, **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=kwargs.pop("timeout", 10.0), **kwargs)

    def delete_subscriptions(self) -> int:
        """Delete every Subscription. Call before a test's receiver goes away: sekmet delivers on one
        4-thread pool and each failed delivery holds a thread ~7 s (3 attempts + back-off), so a dead
        subscriber delays every other subscriber's notifications."""
        n = 0
        with self.client() as c:
            bundle = c.get("/Subscription", params={"_count": "1000", "_elements": "id"}).json()
            for e in bundle.get("entry", []):
                if e.get("search", {}).get("mode") == "match":
                    c.delete(f"/Subscription/{e['resource']['id']}").raise_for_status()
                    n += 1
        return n

    def add_topic(self, url: str, resource_type: str, *, filters: Iterable[str] = ("patient",),
                  interactions: Iterable[str] = ("create", "update"), fhirpath: str = "true",
                  title: str | None = None) -> dict:
        """Define an R5-Backport SubscriptionTopic (sekmet stores topics as Basic resources).

        sekmet 0.1.1 ships no Condition/Observation topic; this adds one, e.g.
        add_topic("http://spinewatch.test/SubscriptionTopic/condition", "Condition"). It then shows in
        the CapabilityStatement and can be used as Subscription.criteria. fhirpath is evaluated with
        %current / %previous (previous is empty on create)."""
        interactions, filters = tuple(interactions), tuple(filters)
        trigger = [{"url": "description", "valueMarkdown": f"{resource_type} {'/'.join(interactions)}"},
                   {"url": "resource", "valueUri": f"http://hl7.org/fhir/StructureDefinition/{resource_type}"},
                   *[{"url": "supportedInteraction", "valueCode": i} for i in interactions],
                   {"url": "fhirPathCriteria", "valueString": fhirpath}]
        basic = {
            "resourceType": "Basic",
            "modifierExtension": [{"url": f"{_ST}.status", "valueCode": "active"}],
            "extension": [
                {"url": f"{_ST}.url", "valueUri": url},
                {"url": f"{_ST}.title", "valueString": title or f"{resource_type} changed"},
                {"url": f"{_ST}.resourceTrigger", "extension": trigger},
                *[{"url": f"{_ST}.canFilterBy", "extension": [
                    {"url": "resource", "valueUri": resource_type},
                    {"url": "filterParameter", "valueString": p}]} for p in filters],
            ],
            "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
        }
        with self.client() as c:
            r = c.post("/Basic", json=basic)
            r.raise_for_status()
            return r.json()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run sekmet-fhir on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="keep the store here (default: temp dir, deleted)")
    p.add_argument("--simulator", action="store_true", help="let sekmet's filler simulator react to orders")
    args = p.parse_args(argv)
    with SekmetServer(args.port, args.data_dir, simulator=args.simulator) as server:
        print(f"sekmet FHIR base: {server.base_url}  (log: {server.log_path})", flush=True)
        try:
            while server.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
