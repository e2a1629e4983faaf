"""The workers for real: a real redis-server, a real `spinewatch worker` process started here, the
notification endpoint in process, and a small FHIR server on a socket whose failures the tests
control (503s, 404s, a hang, an $events answer).

    notification → evaluation → stored assessment; a duplicate is not evaluated again; a burst for
    one patient is evaluated once; Redis stopped → 503; a transient FHIR failure is retried; a
    permanent one (and one past its retries) ends in the dead-letter list, which replays; a worker
    killed mid-task loses nothing; a gap in event numbers is recovered ($events, or _lastUpdated).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.infra.assessments import AssessmentStore
from service.cli.demo.processes import stop_process_group
from service.core.settings import Settings
from tests.support import cds_hooks as ch
from tests.support.redis_server import RedisServer, free_port
from tests.support.paths import ROOT

pytestmark = pytest.mark.integration
TOKEN = "integration-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
METRICS_PORT = free_port()
DB = 7  # a database of the session's redis-server of its own: never flushed under the running worker
# the installed console script, as a user runs it (next to this interpreter, e.g. .venv/bin/spinewatch)
_SCRIPT = Path(sys.executable).parent / "spinewatch"
SPINEWATCH = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "service.cli.main"]


# ---------------- a FHIR server whose behaviour the tests set ----------------

class FhirStub:
    """Reads, searches (patient, _lastUpdated), creates; `fail` injects status codes per path prefix;
    `hang` delays one path once; `events` answers Subscription/{id}/$events."""

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], dict] = {}
        self.fail: dict[str, list[int]] = {}
        self.always_fail: dict[str, int] = {}
        self.hang: dict[str, float] = {}
        self.events: dict[str, dict] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.handle(self, "GET")

            def do_POST(self) -> None:
                stub.handle(self, "POST")

            def do_PUT(self) -> None:
                stub.handle(self, "PUT")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def put(self, resource: dict) -> dict:
        with self.lock:
            key = (resource["resourceType"], resource["id"])
            old = self.resources.get(key)
            version = int(old["meta"]["versionId"]) + 1 if old else 1
            stored = dict(resource, meta={"versionId": str(version),
                                          "lastUpdated": datetime.now(timezone.utc).isoformat()})
            self.resources[key] = stored
            return stored

    def load(self, resources: list[dict]) -> None:
        for resource in resources:
            self.put(resource)

    def count(self, prefix: str) -> int:
        return sum(1 for r in self.requests if r.startswith(prefix))

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = url.path.removeprefix("/fhir/")
        with self.lock:
            self.requests.append(f"{method} {path}")
            failures = next((v for k, v in self.fail.items() if path.startswith(k) and v), None)
            status = failures.pop(0) if failures else next(
                (v for k, v in self.always_fail.items() if path.startswith(k)), None)
            delay = next((self.hang.pop(k) for k in list(self.hang) if path.startswith(k)), 0)
        if delay:
            time.sleep(delay)
        if status:
            return self.reply(h, status, {"resourceType": "OperationOutcome", "issue": [{"severity": "error",
                                                                                          "code": "transient"}]})
        parts = path.split("/")
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        if method in ("POST", "PUT"):
            body = json.loads(h.rfile.read(int(h.headers.get("Content-Length") or 0)) or b"{}")
            body.setdefault("id", uuid.uuid4().hex[:12])
            return self.reply(h, 201, self.put(body))
        if len(parts) == 3 and parts[2] == "$events":
            found = self.events.get(parts[1])
            return self.reply(h, 200, found) if found else self.reply(h, 404, {"resourceType": "OperationOutcome"})
        if len(parts) == 2:
            found = self.resources.get((parts[0], parts[1]))
            return self.reply(h, 200, found) if found else self.reply(h, 404, {"resourceType": "OperationOutcome"})
        return self.reply(h, 200, self.search(parts[0], params))

    def search(self, rtype: str, params: dict) -> dict:
        with self.lock:
            found = [r for (t, _), r in self.resources.items() if t == rtype]
        if "patient" in params:
            pid = params["patient"].removeprefix("Patient/")
            found = [r for r in found if (r.get("subject") or r.get("patient") or {}).get("reference") == f"Patient/{pid}"]
        if "_lastUpdated" in params:
            since = datetime.fromisoformat(params["_lastUpdated"][2:].replace("Z", "+00:00"))
            found = [r for r in found if datetime.fromisoformat(r["meta"]["lastUpdated"]) >= since]
        return {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                "entry": [{"resource": r, "search": {"mode": "match"}} for r in found]}

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/fhir+json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------- processes ----------------

def worker_env(redis_url: str, fhir_base: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")}
    return env | {
        "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": redis_url, "SPINEWATCH_FHIR_BASE_URL": fhir_base,
        "SPINEWATCH_NOTIFICATION_TOKEN": TOKEN, "SPINEWATCH_COALESCE_SECONDS": "0.3",
        "SPINEWATCH_TASK_MAX_RETRIES": "2", "SPINEWATCH_TASK_RETRY_BACKOFF_SECONDS": "0.2",
        "SPINEWATCH_FHIR_TIMEOUT_SECONDS": "5", "SPINEWATCH_RECONCILIATION_INTERVAL_SECONDS": "0",
        "SPINEWATCH_HEARTBEAT_WATCHDOG_SECONDS": "3600", "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp}/audit.sqlite",
        "SPINEWATCH_ALERT_DEFAULT_RECIPIENT": "Organization/acute-oncology", "SPINEWATCH_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1", "SPINEWATCH_WORKER_METRICS_PORT": str(METRICS_PORT),
    }


class Worker:
    """`spinewatch worker` as a user starts it; stopped with SIGTERM (Celery's warm shutdown)."""

    def __init__(self, env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen([*SPINEWATCH, "worker", "--concurrency", "2", "--no-beat", "--loglevel", "INFO"],
                                     env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while b"ready." not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("worker did not start:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=15)  # SIGTERM (Celery's warm shutdown), then SIGKILL


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    fhir = FhirStub()
    worker = Worker(worker_env(url, fhir.base, tmp), tmp / "worker.log")
    settings = Settings(environment="test", redis_url=url, fhir_base_url=fhir.base, notification_token=TOKEN,
                        coalesce_seconds=0.3, audit_db_url=f"sqlite:///{tmp}/api-audit.sqlite")
    with TestClient(create_app(settings)) as api:
        yield {"fhir": fhir, "worker": worker, "api": api, "url": url, "tmp": tmp,
               "redis": redis.Redis.from_url(url, decode_responses=True), "env": worker_env(url, fhir.base, tmp)}
    worker.stop()
    fhir.close()


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def patient(stack, tier: str = "emergency") -> str:
    pid = "p-" + uuid.uuid4().hex[:10]
    stack["fhir"].load(ch.record(tier, pid))
    return pid


def notify(stack, number: int, pid: str | None, focus: str, sub: str = "Subscription/int", kind="event-notification"):
    parts = [{"name": "event-number", "valueString": str(number)}]
    if focus:
        parts.append({"name": "focus", "valueReference": {"reference": f"{stack['fhir'].base}/{focus}"}})
    if pid:
        parts.append({"name": "additional-context", "valueReference": {"reference": f"{stack['fhir'].base}/Patient/{pid}"}})
    params = [{"name": "subscription", "valueReference": {"reference": f"{stack['fhir'].base}/{sub}"}},
              {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": kind},
              {"name": "events-since-subscription-start", "valueString": str(number)}]
    if kind == "event-notification":
        params.append({"name": "notification-event", "part": parts})
    body = {"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "Parameters", "parameter": params},
         "request": {"method": "GET", "url": f"{sub}/$status"}, "response": {"status": "200"}}]}
    return stack["api"].post("/fhir/notifications", content=json.dumps(body), headers=AUTH)


def stored(stack, pid: str) -> dict | None:
    return AssessmentStore(stack["redis"]).get(f"Patient/{pid}")


def dead_letters(stack) -> list[dict]:
    return [json.loads(x) for x in stack["redis"].lrange("spinewatch:dead-letters", 0, -1)]


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPINEWATCH, *args], env=stack["env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


# ---------------- the tests ----------------

def test_a_notification_leads_to_an_evaluation_and_a_stored_assessment(stack):
    pid = patient(stack)
    sub = f"Subscription/{uuid.uuid4().hex[:8]}"
    assert notify(stack, 1, pid, "Observation/neuro", sub).status_code == 200
    record = wait_for(lambda: stored(stack, pid), what="stored assessment")
    assert record["urgency"] == "emergency" and record["red_flags"] == ["limb-weakness"]
    assert record["seen"][f"Patient/{pid}"] == "1" and record["seen"]["Condition/cancer"]
    assert record["revision"] == 1
    assert datetime.fromisoformat(record["stored_at"]) > datetime.now(timezone.utc) - timedelta(minutes=1)


def test_the_worker_serves_the_counters_of_its_child_processes(stack):
    import httpx

    pid = patient(stack)
    notify(stack, 1, pid, "Observation/neuro", f"Subscription/{uuid.uuid4().hex[:8]}")
    wait_for(lambda: stored(stack, pid), what="stored assessment")

    def emergencies() -> float:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        lines = [ln for ln in text.splitlines()
                 if ln.startswith("spinewatch_evaluations_total{") and 'tier="emergency"' in ln]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    assert wait_for(lambda: emergencies() >= 1, what="evaluations counted at the worker's /metrics")


def test_a_duplicate_notification_is_not_evaluated_again(stack):
    pid = patient(stack)
    sub = f"Subscription/{uuid.uuid4().hex[:8]}"
    notify(stack, 1, pid, "Condition/back-pain", sub)
    assert notify(stack, 1, pid, "Condition/back-pain", sub).json()["issue"][0]["diagnostics"].startswith("duplicate")
    wait_for(lambda: stored(stack, pid), what="stored assessment")
    again = notify(stack, 1, pid, "Condition/back-pain", sub)  # redelivered after the evaluation
    assert again.json()["issue"][0]["diagnostics"].startswith("duplicate")
    time.sleep(1.5)
    assert stored(stack, pid)["revision"] == 1


def test_a_burst_of_events_for_one_patient_is_evaluated_once(stack):
    pid = patient(stack)
    sub = f"Subscription/{uuid.uuid4().hex[:8]}"
    for number, focus in enumerate(["Condition/cancer", "Condition/back-pain", "Observation/neuro"] * 2, start=1):
        assert notify(stack, number, pid, focus, sub).status_code == 200
    wait_for(lambda: stored(stack, pid), what="stored assessment")
    time.sleep(1.0)
    assert stored(stack, pid)["revision"] == 1


def test_an_id_only_event_is_resolved_by_reading_its_focus(stack):
    pid = patient(stack, "urgent")
    assert notify(stack, 1, None, "Condition/back-pain", f"Subscription/{uuid.uuid4().hex[:8]}").status_code == 200
    # the stub keeps one Condition/back-pain per id: the last patient loaded owns it
    assert wait_for(lambda: stored(stack, pid), what="stored assessment")["urgency"] == "urgent"


def test_redis_stopped_means_503_and_redis_back_means_200(tmp_path):
    with RedisServer() as own_redis:
        settings = Settings(environment="test", redis_url=own_redis.url, notification_token=TOKEN,
                            audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")
        with TestClient(create_app(settings)) as api:
            stack = {"api": api, "fhir": type("F", (), {"base": "http://ehr/fhir"})()}
            assert notify(stack, 1, "p1", "Condition/c1").status_code == 200
            own_redis.stop()
            started = time.monotonic()
            response = notify(stack, 2, "p1", "Condition/c2")
            assert response.status_code == 503 and response.json()["issue"][0]["code"] == "transient"
            assert time.monotonic() - started < 5  # quickly, so that the server retries
            own_redis.start()
            assert wait_for(lambda: notify(stack, 2, "p1", "Condition/c2").status_code == 200, timeout=10,
                            what="Redis back")
            assert redis.Redis.from_url(own_redis.url).llen("celery") >= 1  # event 1 survived (AOF)


def test_a_transient_fhir_failure_is_retried(stack):
    pid = patient(stack)
    stack["fhir"].fail[f"Patient/{pid}"] = [503, 503]
    notify(stack, 1, pid, "Condition/cancer", f"Subscription/{uuid.uuid4().hex[:8]}")
    assert wait_for(lambda: stored(stack, pid), what="stored assessment after retries")["urgency"] == "emergency"
    assert stack["fhir"].fail[f"Patient/{pid}"] == []  # both 503s were answered, then a read succeeded
    # (3 reads by the evaluation; the alerting step may read the Patient again for its recipients)
    assert stack["fhir"].count(f"GET Patient/{pid}") >= 3
    assert not [d for d in dead_letters(stack) if d["kwargs"].get("patient") == f"Patient/{pid}"]


def test_a_transient_failure_past_its_retries_ends_in_the_dead_letter_list(stack):
    pid = patient(stack)
    stack["fhir"].always_fail[f"Patient/{pid}"] = 503
    notify(stack, 1, pid, "Condition/cancer", f"Subscription/{uuid.uuid4().hex[:8]}")
    entry = wait_for(lambda: [d for d in dead_letters(stack) if d["kwargs"].get("patient") == f"Patient/{pid}"],
                     what="dead letter")[0]
    assert (entry["task"], entry["error"], entry["retries"]) == ("spinewatch.evaluate_patient", "FHIRServerError", 2)
    assert stack["fhir"].count(f"GET Patient/{pid}") == 3  # the first try and two retries
    assert stored(stack, pid) is None
    del stack["fhir"].always_fail[f"Patient/{pid}"]


def test_a_permanent_failure_is_dead_lettered_at_once_and_replays(stack):
    pid = "p-" + uuid.uuid4().hex[:10]  # not on the server (yet)
    notify(stack, 1, pid, f"Patient/{pid}", f"Subscription/{uuid.uuid4().hex[:8]}")
    entry = wait_for(lambda: [d for d in dead_letters(stack) if d["kwargs"].get("patient") == f"Patient/{pid}"],
                     what="dead letter")[0]
    assert (entry["error"], entry["retries"]) == ("FHIRNotFound", 0)
    assert pid not in entry["message"]  # ids of the request stay out of error messages
    listed = cli(stack, "dead-letters", "list", "--json")
    assert listed.returncode == 0 and entry["id"] in listed.stdout
    stack["fhir"].load(ch.record("urgent", pid))  # the patient appears
    replay = cli(stack, "dead-letters", "replay", entry["id"])
    assert replay.returncode == 0 and f"replayed {entry['id']}" in replay.stdout
    assert wait_for(lambda: stored(stack, pid), what="stored after replay")["urgency"] == "urgent"
    assert entry["id"] not in cli(stack, "dead-letters", "list", "--json").stdout


def test_a_worker_process_killed_mid_task_loses_nothing(stack):
    pid = patient(stack)
    stack["fhir"].hang[f"Patient/{pid}"] = 3.0  # the first read hangs: the task is running when killed
    notify(stack, 1, pid, "Condition/cancer", f"Subscription/{uuid.uuid4().hex[:8]}")
    wait_for(lambda: stack["fhir"].count(f"GET Patient/{pid}") >= 1, what="task started")
    for child in stack["worker"].children():
        os.kill(child, signal.SIGKILL)  # task_reject_on_worker_lost: its task goes back on the queue
    record = wait_for(lambda: stored(stack, pid), timeout=20, what="stored after the kill")
    assert record["urgency"] == "emergency"
    assert stack["fhir"].count(f"GET Patient/{pid}") >= 2


def test_a_gap_is_recovered_with_the_events_operation(stack):
    fhir = stack["fhir"]
    sid = uuid.uuid4().hex[:8]
    first, missed = patient(stack), patient(stack, "urgent")
    fhir.events[sid] = {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": f"Subscription/{sid}"}},
            {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": "query-event"},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": "2"},
                {"name": "focus", "valueReference": {"reference": "Condition/back-pain"}},
                {"name": "additional-context", "valueReference": {"reference": f"Patient/{missed}"}}]}]},
        "request": {"method": "GET", "url": f"Subscription/{sid}/$events"}, "response": {"status": "200"}}]}
    notify(stack, 0, None, "", f"Subscription/{sid}", kind="handshake")
    notify(stack, 1, first, "Condition/cancer", f"Subscription/{sid}")
    notify(stack, 3, first, "Observation/neuro", f"Subscription/{sid}")  # event 2 never arrives
    assert wait_for(lambda: stored(stack, missed), what="the missed patient evaluated")["urgency"] == "urgent"
    assert fhir.count(f"GET Subscription/{sid}/$events") == 1


def test_without_events_operation_a_gap_is_recovered_by_last_updated(stack):
    fhir = stack["fhir"]
    sid = uuid.uuid4().hex[:8]
    notify(stack, 0, None, "", f"Subscription/{sid}", kind="handshake")
    notify(stack, 1, None, None, f"Subscription/{sid}", kind="heartbeat")
    missed = patient(stack, "urgent")  # written on the server; its notification (event 1) is lost
    assert notify(stack, 1, None, None, f"Subscription/{sid}", kind="heartbeat").status_code == 200
    assert wait_for(lambda: stored(stack, missed), what="the missed patient evaluated")["urgency"] == "urgent"
    assert fhir.count(f"GET Subscription/{sid}/$events") == 1  # 404: the stub has no $events for it
    assert fhir.count("GET Condition") >= 1


def test_the_worker_start_up_warms_the_models_and_freezes_what_it_built():
    """worker_init's handler: an error there is only logged by Celery, and the pool forks without it."""
    import gc

    from workers import celery_app

    gc.unfreeze()
    celery_app._warm_up()
    assert gc.get_freeze_count() > 0
