"""Real processes for the fault, canary and soak runs, with the faults under the test's control.

    FhirStub     a FHIR R4 server on a real socket, in this process: reads, searches, creates; per path
                 it can answer with status codes (once or always), be slow, or hang until released
    Stack        its own redis-server (append-only file, restartable), `spinewatch serve` (uvicorn) and
                 `spinewatch worker` processes started as a user starts them, in sessions of their own,
                 so a kill reaches every process of a worker and nothing outlives `close()`

No pytest import here: bench/soak.py uses it too. Process plumbing comes from service/cli/demo/processes.py
(`Processes`, `stop_process_group`, `free_port`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import httpx

from service.cli.demo.processes import Managed, Processes, free_port, stop_process_group
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
NOTIFICATION_TOKEN = "fault-notification-secret"
FHIR_JSON = "application/fhir+json"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; AssertionError naming `what` and the bound otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - not there yet (a process restarting, say)
            last, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                         + (f" (last error: {type(last).__name__}: {last})" if last else ""))


# ---------------------------------------------------------------- the FHIR server


class FhirStub:
    """A FHIR server whose failures the test sets. Paths are matched by prefix, without the base:
    `fail["Patient/p1"] = [503, 503]` answers the next two matching requests with 503;
    `always_fail[...] = 500`; `delay[...] = 0.5` (slow, every time); `hang(prefix)` holds matching
    requests until `release()` (or `max_hang` seconds, so shutdown never waits forever)."""

    def __init__(self, max_hang: float = 60.0) -> None:
        self.resources: dict[tuple[str, str], dict] = {}
        self.fail: dict[str, list[int]] = {}
        self.always_fail: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.hung: set[str] = set()
        self._released = threading.Event()
        self.max_hang = max_hang
        self.fail_body: dict = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}
        self.requests: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                stub.handle(self, "GET")

            def do_POST(self) -> None:
                stub.handle(self, "POST")

            def do_PUT(self) -> None:
                stub.handle(self, "PUT")

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up on a hung request: expected here, not worth a traceback

        self.server = Server(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.base = f"http://{self.host}/fhir"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    # ---- data

    def put(self, resource: dict) -> dict:
        with self.lock:
            key = (resource["resourceType"], resource["id"])
            old = self.resources.get(key)
            version = int(old["meta"]["versionId"]) + 1 if old else 1
            stored = dict(resource, meta={"versionId": str(version),
                                          "lastUpdated": datetime.now(timezone.utc).isoformat()})
            self.resources[key] = stored
            return stored

    def load(self, resources: list[dict]) -> list[dict]:
        return [self.put(r) for r in resources]

    def of_type(self, rtype: str, patient: str | None = None) -> list[dict]:
        with self.lock:
            found = [r for (t, _), r in self.resources.items() if t == rtype]
        if patient:
            ref = patient if patient.startswith("Patient/") else f"Patient/{patient}"
            found = [r for r in found if _subject(r) == ref]
        return found

    def communications(self, patient: str) -> list[dict]:
        return self.of_type("Communication", patient)

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.startswith(prefix))

    # ---- faults

    def hang(self, prefix: str) -> None:
        self._released.clear()
        self.hung.add(prefix)

    def release(self) -> None:
        self.hung.clear()
        self._released.set()

    def clear_faults(self) -> None:
        self.fail.clear()
        self.always_fail.clear()
        self.delay.clear()
        self.release()

    # ---- HTTP

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = url.path.removeprefix("/fhir").lstrip("/")
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        with self.lock:
            self.requests.append(f"{method} {path}")
            self.headers.append(dict(h.headers.items()))
            failures = next((v for k, v in self.fail.items() if path.startswith(k) and v), None)
            status = failures.pop(0) if failures else next(
                (v for k, v in self.always_fail.items() if path.startswith(k)), None)
            delay = next((v for k, v in self.delay.items() if path.startswith(k)), 0.0)
            hung = any(path.startswith(k) for k in self.hung)
        if hung:
            self._released.wait(self.max_hang)
        if delay:
            time.sleep(delay)
        if status:
            return self.reply(h, status, self.fail_body)
        parts = [p for p in path.split("/") if p]
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        if method in ("POST", "PUT"):
            body = json.loads(raw or b"{}")
            if len(parts) == 2:
                body["id"] = parts[1]
            body.setdefault("id", uuid.uuid4().hex[:12])
            return self.reply(h, 201, self.put(body))
        if not parts or parts[0] == "metadata":
            return self.reply(h, 200, {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                                       "fhirVersion": "4.0.1", "format": ["json"]})
        if len(parts) == 2:
            found = self.resources.get((parts[0], parts[1]))
            if found:
                return self.reply(h, 200, found)
            return self.reply(h, 404, {"resourceType": "OperationOutcome",
                                       "issue": [{"severity": "error", "code": "not-found"}]})
        return self.reply(h, 200, self.search(parts[0], params))

    def search(self, rtype: str, params: dict) -> dict:
        found = self.of_type(rtype, params.get("patient") or params.get("subject"))
        if "_lastUpdated" in params:
            since = datetime.fromisoformat(params["_lastUpdated"][2:].replace("Z", "+00:00"))
            found = [r for r in found if datetime.fromisoformat(r["meta"]["lastUpdated"]) >= since]
        if "identifier" in params:
            system, _, value = params["identifier"].rpartition("|")
            found = [r for r in found if any(i.get("value") == value and (not system or i.get("system") == system)
                                             for i in r.get("identifier") or [])]
        return {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                "entry": [{"resource": r, "search": {"mode": "match"}} for r in found]}

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", FHIR_JSON)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): what a hung server's client does

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def _subject(resource: dict) -> str | None:
    for key in ("subject", "patient"):
        value = resource.get(key)
        if isinstance(value, dict) and value.get("reference"):
            return value["reference"]
    return None


# ---------------------------------------------------------------- the SpineWatch processes


def stack_env(redis_url: str, fhir: FhirStub, run_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of the API and worker processes: the caller's minus its SPINEWATCH_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")}
    env.update({
        "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": redis_url,
        "SPINEWATCH_FHIR_BASE_URL": fhir.base, "SPINEWATCH_FHIR_ALLOWED_HOSTS": fhir.host,
        "SPINEWATCH_NOTIFICATION_TOKEN": NOTIFICATION_TOKEN, "SPINEWATCH_COALESCE_SECONDS": "0.3",
        "SPINEWATCH_TASK_MAX_RETRIES": "2", "SPINEWATCH_TASK_RETRY_BACKOFF_SECONDS": "0.2",
        "SPINEWATCH_FHIR_TIMEOUT_SECONDS": "2", "SPINEWATCH_HOOK_TIMEOUT_SECONDS": "1",
        # A SIGKILLed worker's tasks come back after the visibility timeout (kombu restores unacked
        # messages older than it): short here so the tests can wait for it.
        "SPINEWATCH_TASK_TIME_LIMIT_SECONDS": "8", "SPINEWATCH_BROKER_VISIBILITY_TIMEOUT_SECONDS": "10",
        "SPINEWATCH_RECONCILIATION_INTERVAL_SECONDS": "0", "SPINEWATCH_HEARTBEAT_WATCHDOG_SECONDS": "3600",
        "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{run_dir / 'audit.sqlite'}",
        "SPINEWATCH_ALERT_DEFAULT_RECIPIENT": "Organization/acute-oncology",
        "SPINEWATCH_LOG_FORMAT": "json", "SPINEWATCH_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
    })
    env.update(overrides)
    return env


class Stack:
    """redis-server + FHIR stub + API process + worker process(es), all on 127.0.0.1."""

    def __init__(self, run_dir: Path, *, api: bool = True, worker: bool = True, concurrency: int = 2,
                 env: dict[str, str] | None = None, fhir: FhirStub | None = None, beat: bool = False):
        self.run_dir = run_dir
        self.procs = Processes(run_dir / "logs")
        (run_dir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(data_dir=str(run_dir / "redis")).start()
        self.fhir = fhir or FhirStub()
        self.env = stack_env(self.redis.url, self.fhir, run_dir, **(env or {}))
        self.concurrency = concurrency
        self.beat = beat  # Celery beat as a process of its own, as docker-compose.yml runs it
        self.api_url: str | None = None
        self.api_proc: Managed | None = None
        self.worker: Managed | None = None
        self._old_workers: list[Managed] = []
        self.http = httpx.Client(timeout=30)
        try:
            if api:
                self.start_api()
            if worker:
                self.start_worker()
            if beat:  # the heartbeat watchdog and the sweeps, scheduled; the workers run them
                self.procs.start("beat", [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
                                          "--loglevel", "INFO", "--pidfile", str(run_dir / "beat.pid")],
                                 env=self.env, cwd=ROOT)
        except BaseException:
            self.close()
            raise

    # ---- processes

    def start_api(self) -> str:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.env["SPINEWATCH_PUBLIC_BASE_URL"] = self.api_url
        self.api_proc = self.procs.start("api", [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                                                 "--port", str(port)], env=self.env, cwd=ROOT)
        wait_for(lambda: self._alive(self.api_proc) and self.http.get(self.api_url + "/healthz",
                                                                      timeout=1).status_code == 200,
                 30, "the API process (/healthz)")
        return self.api_url

    def start_worker(self, timeout: float = 40.0) -> Managed:
        log = self.run_dir / "logs" / "worker.log"
        offset = log.stat().st_size if log.exists() else 0
        self.worker = self.procs.start("worker", [sys.executable, "-m", "service.cli", "worker", "--no-beat",
                                                  "--concurrency", str(self.concurrency), "--loglevel", "INFO"],
                                       env=self.env, cwd=ROOT)
        worker = self.worker
        wait_for(lambda: self._alive(worker) and b" ready." in log.read_bytes()[offset:], timeout,
                 "the worker to be ready", interval=0.1)
        return worker

    def _alive(self, managed: Managed) -> bool:
        if managed.proc.poll() is not None:
            raise RuntimeError(f"{managed.name} exited with {managed.proc.returncode}:\n{managed.log_tail(30)}")
        return True

    def worker_children(self) -> list[int]:
        if self.worker is None:
            return []
        path = Path(f"/proc/{self.worker.proc.pid}/task/{self.worker.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def kill_worker_children(self) -> list[int]:
        """SIGKILL every pool process of the worker (as the OOM killer would): the main process stays."""
        children = self.worker_children()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return children

    def kill_worker(self, whole_group: bool = True) -> None:
        """SIGKILL the worker's main process (and, by default, its pool: a crashed host or container)."""
        assert self.worker is not None
        pid = self.worker.proc.pid
        if whole_group:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            os.kill(pid, signal.SIGKILL)
        self.worker.proc.wait(10)
        self._old_workers.append(self.worker)  # orphaned pool processes are still in its group
        self.worker = None

    def stop_worker(self) -> None:
        """Warm shutdown (SIGTERM): running tasks finish, reserved ones go back to the queue."""
        if self.worker is not None:
            stop_process_group(self.worker.proc, 20)
            self.worker = None

    def close(self) -> None:
        for old in self._old_workers:
            try:
                os.killpg(old.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.fhir.release()
        self.procs.stop_all(timeout=15)
        self.http.close()
        self.redis.stop()
        self.fhir.close()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- traffic

    def redis_client(self):
        import redis

        return redis.Redis.from_url(self.redis.url, decode_responses=True, socket_timeout=5)

    def patient(self, tier: str = "emergency", pid: str | None = None) -> str:
        from tests.support import cds_hooks as ch

        pid = pid or "p-" + uuid.uuid4().hex[:10]
        # ids of their own (`neuro-<pid>`, `back-pain-<pid>`, ...): one stub holds many patients
        self.fhir.load([r if r["resourceType"] == "Patient" else dict(r, id=f"{r['id']}-{pid}")
                        for r in ch.record(tier, pid)])
        return pid

    def notify_resource(self, rtype: str, rid: str, *, token: str = NOTIFICATION_TOKEN,
                        timeout: float = 10.0) -> httpx.Response:
        """An R4 rest-hook notification with the resource as payload, as sekmet sends it."""
        resource = self.fhir.resources[(rtype, rid)]
        return self.http.put(f"{self.api_url}/fhir/notifications/{rtype}/{rid}", content=json.dumps(resource),
                             headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON},
                             timeout=timeout)

    def stored(self, pid: str) -> dict | None:
        from service.infra.assessments import AssessmentStore

        client = self.redis_client()
        try:
            return AssessmentStore(client).get(f"Patient/{pid}")
        finally:
            client.close()

    def dead_letters(self) -> list[dict]:
        client = self.redis_client()
        try:
            return [json.loads(x) for x in client.lrange("spinewatch:dead-letters", 0, -1)]
        finally:
            client.close()

    def audit_records(self, kind: str | None = None, patient: str | None = None) -> list:
        from service.infra.audit.store import store_for

        store = store_for(self.env["SPINEWATCH_AUDIT_DB_URL"])
        try:
            return [r for r in store.iter_all() if (kind is None or r.kind == kind)
                    and (patient is None or r.patient == patient)]
        finally:
            store.dispose()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.run_dir / "logs").glob("*.log")))
