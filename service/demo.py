"""`spinewatch demo`: the whole flow on one machine, on development defaults, without Docker.

    redis-server ─ sekmet-fhir (the demo EHR) ─ API (uvicorn) ─ Celery worker ─ SQLite audit log
    load demo charts → register subscriptions → write new back-pain reports as an EHR would
    → the worker evaluates and alerts → show tier, patient-view card, Communications, audit

Every process the demo starts runs in a session of its own and is stopped (SIGTERM, then SIGKILL)
when the demo ends, fails, or is interrupted with Ctrl-C or SIGTERM. Its files (logs, Redis data,
FHIR store, audit log) live in one run directory: a temp dir removed at the end, or --dir.

The demo's settings are embedded (`demo_environment`): SPINEWATCH_ variables of the calling shell
are ignored so that a production setting cannot leak into it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

DATA_DIR = Path(__file__).parent / "demo_data"
FHIR_JSON = "application/fhir+json"
HOST = "127.0.0.1"
TIERS = ("emergency", "urgent", "routine", "none")
INDICATOR = {"emergency": "critical", "urgent": "warning", "routine": "info"}


class DemoError(RuntimeError):
    """A step failed; the message says what and, where it can, how to fix it."""


# ---------------- output ----------------

class Progress:
    """Numbered steps on stdout, each ending in `ok`, `skipped` or `FAILED`, with its duration."""

    def __init__(self, total: int, write: Callable[[str], None] | None = None):
        self.total, self.done = total, 0
        self.write = write or (lambda line: print(line, flush=True))

    @contextmanager
    def step(self, title: str) -> Iterator[dict]:
        self.done += 1
        info: dict = {"detail": "", "skipped": None}
        started = time.monotonic()
        self.write(f"[{self.done}/{self.total}] {title} ...")
        try:
            yield info
        except BaseException as exc:
            reason = str(exc).splitlines()[0] if isinstance(exc, DemoError) and str(exc) else type(exc).__name__
            self.write(f"      FAILED: {reason}")
            raise
        took = f"({time.monotonic() - started:.1f} s)"
        if info["skipped"]:
            self.write(f"      skipped: {info['skipped']}")
        else:
            self.write(f"      ok {took}{'  ' + info['detail'] if info['detail'] else ''}")

    def say(self, line: str = "") -> None:
        self.write(line)


# ---------------- processes ----------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Processes:
    """The processes the demo started, stopped in reverse order of starting."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[Managed] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> Managed:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        managed = Managed(name, proc, log_path)
        self.started.append(managed)
        return managed

    def check_alive(self) -> None:
        for m in self.started:
            code = m.proc.poll()
            if code is not None:
                raise DemoError(f"{m.name} exited with code {code}; its log ({m.log_path}) ends:\n{m.log_tail()}")

    def stop_all(self, timeout: float = 10.0) -> None:
        for m in reversed(self.started):
            _stop(m.proc, timeout)
        self.started.clear()


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process group (a Celery worker has children), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(what: str, ready: Callable[[], Any], procs: Processes, timeout: float = 60.0,
               interval: float = 0.2) -> Any:
    """Poll `ready()` until it returns something truthy; fail early if a process died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            value = ready()
            if value:
                return value
        except Exception as exc:  # not ready yet: keep the reason for the time-out message
            last = f" (last: {type(exc).__name__})"
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}{last}")


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


# ---------------- redis-server ----------------

def find_or_install_redis(allow_install: bool, say: Callable[[str], None]) -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    how = "install it with: sudo apt-get install redis-server"
    can_install = os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get")
    if not allow_install:
        raise DemoError(f"redis-server is not installed; {how} (SPINEWATCH_DEMO_INSTALL=false forbids installing it)")
    if not can_install:
        raise DemoError(f"redis-server is not installed and the demo can install it only as root with apt-get; {how}")
    say("      redis-server is missing: installing it with apt-get (set SPINEWATCH_DEMO_INSTALL=false to forbid)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise DemoError(f"`{' '.join(cmd)}` failed ({done.stderr.strip().splitlines()[-1:]}); {how}")
    found = shutil.which("redis-server")
    if not found:
        raise DemoError(f"apt-get installed redis-server but it is not on PATH; {how}")
    return found


def start_redis(procs: Processes, binary: str, run_dir: Path) -> str:
    port = free_port()
    data = run_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # The same durability settings as docker-compose.yml: the broker must not lose or evict tasks.
    procs.start("redis", [binary, "--port", str(port), "--bind", HOST, "--dir", str(data), "--appendonly", "yes",
                          "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "no"], env=dict(os.environ))
    url = f"redis://{HOST}:{port}/0"

    def pong() -> bool:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    wait_until("redis-server to answer PING", pong, procs, timeout=20)
    return url


# ---------------- sekmet-fhir, the demo EHR ----------------

def start_sekmet(procs: Processes, run_dir: Path) -> str:
    """sekmet serves its FHIR base at /fhir; base_url in its settings file must match the port,
    since it writes that base into Location headers and notifications (docs/sekmet.md)."""
    try:
        import sekmet  # noqa: F401
    except ImportError:
        raise DemoError("sekmet-fhir (the demo EHR) is not installed: run `bash scripts/bootstrap.sh` "
                        "or `.venv/bin/pip install sekmet-fhir`") from None
    port = free_port()
    home = run_dir / "sekmet"
    home.mkdir(parents=True, exist_ok=True)
    base = f"http://{HOST}:{port}/fhir"
    config = home / "settings.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "base_url": base, "host": HOST, "port": port, "data_dir": str(home / "data"),
        "server_auth": {"types": ["none"]}, "simulator": {"enabled": False}, "validation": {"inbound": "strict"},
        "own_private_key_path": str(home / "keys" / "sekmet_private.pem"),
        "facility_name": "SpineWatch demo EHR",
    }, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    env.update(SEKMET_CONFIG=str(config), PYTHONUNBUFFERED="1")
    procs.start("sekmet-fhir", [sys.executable, "-m", "sekmet.cli", "serve", "--config", str(config),
                                "--host", HOST, "--port", str(port)], env=env, cwd=home)
    wait_until(f"the FHIR server at {base}/metadata", lambda: http_ok(f"{base}/metadata"), procs, timeout=60)
    return base


# ---------------- the SpineWatch API and worker ----------------

def demo_environment(run_dir: Path, redis_url: str, fhir_base: str, api_base: str) -> dict[str, str]:
    """The child processes' environment: the caller's, minus its SPINEWATCH_ settings, plus the
    demo's development settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")}
    env.update({
        "SPINEWATCH_ENVIRONMENT": "development",
        "SPINEWATCH_LOG_FORMAT": "json",
        "SPINEWATCH_REDIS_URL": redis_url,
        "SPINEWATCH_FHIR_BASE_URL": fhir_base,
        "SPINEWATCH_PUBLIC_BASE_URL": api_base,
        "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{run_dir / 'audit.sqlite'}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def start_api(procs: Processes, env: dict[str, str], port: int) -> str:
    base = f"http://{HOST}:{port}"
    procs.start("api", [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
                        "--host", HOST, "--port", str(port), "--no-access-log"], env=env)
    wait_until(f"the API at {base}/healthz", lambda: http_ok(f"{base}/healthz"), procs, timeout=60)
    wait_until(f"the API's dependencies ({base}/readyz)", lambda: http_ok(f"{base}/readyz"), procs, timeout=30)
    return base


def worker_available() -> bool:
    return _module_exists("workers.celery_app")


def start_worker(procs: Processes, env: dict[str, str]) -> Managed:
    worker = procs.start("worker", [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
                                    "--loglevel", "INFO", "--concurrency", "2", "--without-gossip",
                                    "--without-mingle"], env=env)
    # Celery logs "celery@host ready." once it consumes from the queue.
    wait_until("the worker to be ready", lambda: re.search(r"ready\.", worker.log_path.read_text(errors="replace")),
               procs, timeout=60)
    return worker


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# ---------------- demo data ----------------

_DAYS_AGO = re.compile(r"^\$DAYS_AGO:(\d+)$")


@dataclass
class DemoPatient:
    key: str
    title: str
    expected_tier: str
    chart: dict
    report: dict
    results: dict = field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        return next(e["resource"]["id"] for e in self.chart["entry"] if e["resource"]["resourceType"] == "Patient")

    @property
    def reference(self) -> str:
        return f"Patient/{self.patient_id}"

    def resources(self) -> list[dict]:
        return [e["resource"] for e in self.chart["entry"] + self.report["entry"]]


def _resolve_dates(value: Any, today: datetime) -> Any:
    """Demo files date their events relative to today ("$DAYS_AGO:10"), so the demo never goes stale
    against the 90-day lookback."""
    if isinstance(value, dict):
        return {k: _resolve_dates(v, today) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_dates(v, today) for v in value]
    if isinstance(value, str) and (m := _DAYS_AGO.match(value)):
        return (today - timedelta(days=int(m.group(1)))).date().isoformat()
    return value


def load_demo_patients(now: datetime | None = None) -> list[DemoPatient]:
    now = now or datetime.now(timezone.utc)
    patients = []
    for path in sorted(DATA_DIR.glob("*.json")):
        doc = _resolve_dates(json.loads(path.read_text()), now)
        patients.append(DemoPatient(path.stem, doc["title"], doc["expected_tier"], doc["chart"], doc["report"]))
    return patients


def post_transaction(fhir: httpx.Client, bundle: dict) -> None:
    r = fhir.post("", json=bundle)
    if r.status_code >= 300:
        raise DemoError(f"the FHIR server refused a demo transaction: HTTP {r.status_code}")


# ---------------- the run ----------------

STEPS = 12


@dataclass
class Demo:
    serve: bool = False
    run_dir: Path | None = None
    allow_install: bool = True
    timeout: float = 90.0
    write: Callable[[str], None] | None = None
    procs: Processes = field(init=False)
    urls: dict[str, str] = field(default_factory=dict)
    patients: list[DemoPatient] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # steps that could not run yet, and why

    def run(self) -> int:
        temp = self.run_dir is None
        run_dir = Path(tempfile.mkdtemp(prefix="spinewatch-demo-")) if temp else self.run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.procs = Processes(run_dir / "logs")
        out = Progress(STEPS, self.write)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._run(out, run_dir)
            ok = self._report(out)
            if self.serve:
                self._serve(out)
            return 0 if ok else 1
        except DemoError as exc:
            out.say(f"\nspinewatch demo failed: {exc}")
            out.say(f"logs: {self.procs.log_dir}" if not temp else "")
            return 1
        except KeyboardInterrupt:
            out.say("\ninterrupted")
            return 130
        finally:
            out.say("stopping the demo's processes ...")
            self.procs.stop_all()
            signal.signal(signal.SIGTERM, previous)
            if temp:
                shutil.rmtree(run_dir, ignore_errors=True)
            out.say("stopped.")

    def _run(self, out: Progress, run_dir: Path) -> None:
        with out.step("redis-server (broker and assessment store)") as s:
            binary = find_or_install_redis(self.allow_install, out.say)
            self.urls["redis"] = start_redis(self.procs, binary, run_dir)
            s["detail"] = self.urls["redis"]
        with out.step("sekmet-fhir, the demo EHR's FHIR server") as s:
            self.urls["fhir"] = start_sekmet(self.procs, run_dir)
            s["detail"] = self.urls["fhir"]
        api_port = free_port()
        env = demo_environment(run_dir, self.urls["redis"], self.urls["fhir"], f"http://{HOST}:{api_port}")
        with out.step("SpineWatch API (uvicorn)") as s:
            self.urls["api"] = start_api(self.procs, env, api_port)
            s["detail"] = self.urls["api"]
        with out.step("SpineWatch worker (Celery)") as s:
            if worker_available():
                start_worker(self.procs, env)
            else:
                s["skipped"] = self._pending("worker", "workers/celery_app.py (issue 4) has not landed")
        with out.step("audit log (SQLite)") as s:
            s["detail"] = env["SPINEWATCH_AUDIT_DB_URL"]
        self.patients = load_demo_patients()
        fhir = httpx.Client(base_url=self.urls["fhir"], timeout=10.0,
                            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
        with fhir:
            with out.step(f"loading {len(self.patients)} demo patients into the EHR") as s:
                for p in self.patients:
                    post_transaction(fhir, p.chart)
                s["detail"] = ", ".join(p.reference for p in self.patients)
            with out.step("registering the subscriptions (spinewatch subscribe)") as s:
                s["skipped"] = self._pending("subscriptions", "service/subscriptions.py (issue 4) has not landed")
            with out.step("the EHR records new back-pain reports (Conditions, Observations)") as s:
                for p in self.patients:
                    post_transaction(fhir, p.report)
                s["detail"] = f"{sum(len(p.report['entry']) for p in self.patients)} resources"
            with out.step("waiting for the worker's assessments") as s:
                s["skipped"] = self._pending("assessments", "no worker and assessment store yet (issue 4)")
            with out.step("patient-view cards from the CDS Hooks service") as s:
                s["skipped"] = self._pending("cards", "service/routes/cds_hooks.py (issue 3) has not landed")
            with out.step("care-team alerts (Communication) on the EHR") as s:
                for p in self.patients:
                    r = fhir.get("/Communication", params={"subject": p.reference})
                    p.results["alerts"] = [e["resource"] for e in r.json().get("entry", [])
                                           if e.get("search", {}).get("mode", "match") == "match"]
                s["detail"] = f"{sum(len(p.results['alerts']) for p in self.patients)} Communication(s)"
        with out.step("audit summary and verification") as s:
            s["skipped"] = self._pending("audit", "`spinewatch audit` (issue 5) has not landed")

    def _pending(self, name: str, why: str) -> str:
        self.pending.append(f"{name}: {why}")
        return why

    def _report(self, out: Progress) -> bool:
        out.say("")
        out.say("Results")
        ok = True
        for p in self.patients:
            tier = p.results.get("tier")
            out.say(f"  {p.reference}  ({p.title})")
            out.say(f"    expected tier: {p.expected_tier}; tier: {tier or 'not evaluated'}")
            if tier is not None and tier != p.expected_tier:
                ok = False
            card = p.results.get("card")
            if card:
                out.say(f"    card: [{card['indicator']}] {card['summary']}")
            elif "card" in p.results:
                out.say("    card: none")
            out.say(f"    alerts on the EHR: {len(p.results.get('alerts', []))} Communication(s)")
        if self.pending:
            out.say("")
            out.say("Not shown yet (parts still being built):")
            for line in self.pending:
                out.say(f"  - {line}")
        return ok

    def _serve(self, out: Progress) -> None:
        out.say("")
        out.say("Serving until Ctrl-C:")
        out.say(f"  SpineWatch API   {self.urls['api']}  (/healthz, /readyz, /metrics, /docs)")
        out.say(f"  demo EHR (FHIR)  {self.urls['fhir']}")
        out.say(f"  Redis            {self.urls['redis']}")
        out.say(f"  logs             {self.procs.log_dir}")
        while True:
            self.procs.check_alive()
            time.sleep(0.5)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
