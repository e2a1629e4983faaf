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

import importlib.util
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
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

DATA_DIR = Path(__file__).parent / "data"
FHIR_JSON = "application/fhir+json"
HOST = "127.0.0.1"


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
            stop_process_group(m.proc, timeout)
        self.started.clear()


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
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
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise DemoError(f"`{' '.join(cmd)}` failed ({last}); {how}")
    # If the package's scripts start a system redis-server (port 6379), it is the system's: the demo
    # runs its own on a free port and leaves that one alone.
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
    if importlib.util.find_spec("sekmet") is None:
        raise DemoError("sekmet-fhir (the demo EHR) is not installed: run `bash scripts/bootstrap.sh` "
                        "or `.venv/bin/pip install sekmet-fhir`")
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

class DemoEhrIssuer:
    """The demo EHR as a CDS client: an ES384 key, its JWK Set in a file the service is told to trust
    (SPINEWATCH_CDS_TRUSTED_ISSUERS), and a fresh signed JWT per call (CDS Hooks 2.0, "Trusting CDS
    Clients"), so the demo runs with JWT verification on, as production does."""

    iss = "https://ehr.demo.spinewatch.invalid"

    def __init__(self, run_dir: Path):
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec

        self._jwt = jwt
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.kid = uuid.uuid4().hex[:12]
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        self.jwks_path = run_dir / "demo-ehr-jwks.json"
        self.jwks_path.write_text(json.dumps({"keys": [public | {"kid": self.kid, "alg": "ES384", "use": "sig"}]}))

    def trusted_issuers(self) -> str:
        return json.dumps({self.iss: str(self.jwks_path)})

    def authorization(self, audience: str) -> dict[str, str]:
        now = int(time.time())
        token = self._jwt.encode({"iss": self.iss, "aud": audience, "iat": now, "exp": now + 300,
                                  "jti": uuid.uuid4().hex}, self.key, algorithm="ES384",
                                 headers={"kid": self.kid, "typ": "JWT"})
        return {"Authorization": f"Bearer {token}"}


def demo_environment(run_dir: Path, redis_url: str, fhir_base: str, api_base: str,
                     issuer: DemoEhrIssuer) -> dict[str, str]:
    """The child processes' environment: the caller's, minus its SPINEWATCH_ settings, plus the
    demo's development settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")}
    fhir_host = fhir_base.split("://", 1)[1].split("/", 1)[0]
    env.update({
        "SPINEWATCH_ENVIRONMENT": "development",
        "SPINEWATCH_LOG_FORMAT": "json",
        "SPINEWATCH_REDIS_URL": redis_url,
        "SPINEWATCH_FHIR_BASE_URL": fhir_base,
        "SPINEWATCH_FHIR_ALLOWED_HOSTS": fhir_host,
        "SPINEWATCH_PUBLIC_BASE_URL": api_base,
        "SPINEWATCH_SUBSCRIPTION_ENDPOINT": f"{api_base}/fhir/notifications",
        "SPINEWATCH_NOTIFICATION_TOKEN": uuid.uuid4().hex,
        # sekmet notifies on notes too: one demo patient's emergency is written only in a note.
        "SPINEWATCH_SUBSCRIPTION_TYPES": "Condition,Observation,DocumentReference",
        "SPINEWATCH_CDS_TRUSTED_ISSUERS": issuer.trusted_issuers(),
        "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{run_dir / 'audit.sqlite'}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def spinewatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def start_api(procs: Processes, env: dict[str, str], port: int) -> str:
    base = f"http://{HOST}:{port}"
    procs.start("api", spinewatch_cmd("serve", "--host", HOST, "--port", str(port)), env=env)
    wait_until(f"the API at {base}/healthz", lambda: http_ok(f"{base}/healthz"), procs, timeout=60)
    wait_until(f"the API's dependencies ({base}/readyz)", lambda: http_ok(f"{base}/readyz"), procs, timeout=30)
    return base


def start_worker(procs: Processes, env: dict[str, str]) -> Managed:
    worker = procs.start("worker", spinewatch_cmd("worker", "--concurrency", "2"), env=env)
    # Celery logs "celery@host ready." once it consumes from the queue.
    wait_until("the worker to be ready", lambda: re.search(r"ready\.", worker.log_path.read_text(errors="replace")),
               procs, timeout=60)
    return worker


# ---------------- demo data ----------------

_DAYS_AGO = re.compile(r"^\$DAYS_AGO:(\d+)$")
_INSTANT_DAYS_AGO = re.compile(r"^\$INSTANT_DAYS_AGO:(\d+)$")  # for R4 `instant` fields (DocumentReference.date)


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
    """Demo files date their events relative to today ("$DAYS_AGO:10" a date, "$INSTANT_DAYS_AGO:0"
    an instant), so the demo never goes stale against the 90-day lookback."""
    if isinstance(value, dict):
        return {k: _resolve_dates(v, today) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_dates(v, today) for v in value]
    if isinstance(value, str) and (m := _DAYS_AGO.match(value)):
        return (today - timedelta(days=int(m.group(1)))).date().isoformat()
    if isinstance(value, str) and (m := _INSTANT_DAYS_AGO.match(value)):
        return (today - timedelta(days=int(m.group(1)))).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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


# ---------------- what the demo shows ----------------

PATIENT_VIEW_SERVICE = "spinewatch-patient-view"


def patient_view(api: str, fhir_base: str, issuer: DemoEhrIssuer, patient: DemoPatient) -> list[dict]:
    """The CDS Hooks call an EHR makes when a clinician opens the chart (CDS Hooks 2.0 patient-view),
    with fhirServer so the service reads the record itself."""
    url = f"{api}/cds-services/{PATIENT_VIEW_SERVICE}"
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "fhirServer": fhir_base,
            "context": {"userId": "Practitioner/sw-demo-gp", "patientId": patient.patient_id}}
    r = httpx.post(url, json=body, headers=issuer.authorization(url), timeout=10.0)
    if r.status_code != 200:
        raise DemoError(f"patient-view for {patient.reference} answered HTTP {r.status_code}")
    return r.json()["cards"]


def communications(fhir: httpx.Client, patient: DemoPatient) -> list[dict]:
    r = fhir.get("/Communication", params={"subject": patient.reference, "_count": "100"})
    r.raise_for_status()
    return [e["resource"] for e in r.json().get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def describe_communication(c: dict) -> str:
    to = ", ".join(r.get("reference", "?") for r in c.get("recipient", [])) or "nobody"
    text = next((p.get("contentString") for p in c.get("payload", []) if p.get("contentString")), "")
    text = text if len(text) <= 120 else text[:119] + "…"
    return f"Communication/{c.get('id')} to {to}, priority {c.get('priority', 'routine')}: {text}"


def stored_tier(redis_url: str, patient: DemoPatient) -> str | None:
    """The tier the worker stored for the patient (service/infra/assessments.py) once its evaluation
    has read every resource of the new report (an earlier one may have seen only part of it)."""
    from service.infra.assessments import AssessmentStore
    from service.infra.queue import redis_client

    client = redis_client(redis_url)
    try:
        stored = AssessmentStore(client).get(patient.reference) or {}
    finally:
        client.close()
    report = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in patient.report["entry"]}
    return stored.get("urgency") if report <= set(stored.get("seen") or {}) else None


def audit_summary(db_url: str) -> dict:
    from service.infra.audit.store import store_for

    store = store_for(db_url)
    counts: dict[str, int] = {}
    for record in store.iter_all():
        counts[record.kind] = counts.get(record.kind, 0) + 1
    result = store.verify()
    store.dispose()
    return {"count": sum(counts.values()), "kinds": ", ".join(f"{k} {n}" for k, n in sorted(counts.items())),
            "ok": result.ok, "verification": f"{'verified' if result.ok else 'BROKEN'} ({result.message()})"}


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
    results: dict = field(default_factory=dict)

    def run(self) -> int:
        temp = self.run_dir is None
        run_dir = Path(tempfile.mkdtemp(prefix="spinewatch-demo-")) if temp else self.run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.procs = Processes(run_dir / "logs")
        out = Progress(STEPS, self.write)
        # Ctrl-C and SIGTERM both end the demo through the `finally` below (SIGINT explicitly: a shell
        # starts background jobs with it ignored).
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._run(out, run_dir)
            ok = self._report(out)
            if self.serve:
                self._serve(out)
            return 0 if ok else 1
        except DemoError as exc:
            out.say(f"\nspinewatch demo failed: {exc}")
            if not temp:
                out.say(f"logs: {self.procs.log_dir}")
            return 1
        except KeyboardInterrupt:
            out.say("\ninterrupted")
            return 130
        finally:
            out.say("stopping the demo's processes ...")
            self.procs.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
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
        issuer = DemoEhrIssuer(run_dir)
        env = demo_environment(run_dir, self.urls["redis"], self.urls["fhir"], f"http://{HOST}:{api_port}", issuer)
        self.urls["audit"] = env["SPINEWATCH_AUDIT_DB_URL"]
        with out.step("SpineWatch API (spinewatch serve)") as s:
            self.urls["api"] = start_api(self.procs, env, api_port)
            s["detail"] = self.urls["api"]
        with out.step("SpineWatch worker (spinewatch worker)") as s:
            start_worker(self.procs, env)
        with out.step("audit log (SQLite)") as s:
            s["detail"] = self.urls["audit"]
        self.patients = load_demo_patients()
        fhir = httpx.Client(base_url=self.urls["fhir"], timeout=10.0,
                            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
        with fhir:
            with out.step(f"loading {len(self.patients)} demo patients into the EHR") as s:
                for p in self.patients:
                    post_transaction(fhir, p.chart)
                s["detail"] = ", ".join(p.reference for p in self.patients)
            with out.step("registering the subscriptions (spinewatch subscribe)") as s:
                s["detail"] = self._subscribe(env)
            with out.step("the EHR records new back-pain reports (Conditions, Observations, a clinical note)") as s:
                for p in self.patients:
                    post_transaction(fhir, p.report)
                s["detail"] = f"{sum(len(p.report['entry']) for p in self.patients)} resources"
            with out.step("the worker evaluates each patient") as s:
                self._wait_for_tiers()
                s["detail"] = ", ".join(f"{p.patient_id}: {p.results['tier']}" for p in self.patients)
            with out.step("patient-view cards from the CDS Hooks service") as s:
                for p in self.patients:
                    cards = patient_view(self.urls["api"], self.urls["fhir"], issuer, p)
                    p.results["card"] = (cards[0]["indicator"], cards[0]["summary"]) if cards else None
                s["detail"] = f"{sum(1 for p in self.patients if p.results['card'])} card(s)"
            with out.step("care-team alerts (Communication) on the EHR") as s:
                self._wait_for_alerts(fhir)
                s["detail"] = f"{sum(len(p.results['alerts']) for p in self.patients)} Communication(s)"
        with out.step("audit summary and verification (spinewatch audit verify)") as s:
            self.results["audit"] = audit_summary(self.urls["audit"])
            s["detail"] = self.results["audit"]["verification"]

    def _subscribe(self, env: dict[str, str]) -> str:
        done = subprocess.run(spinewatch_cmd("subscribe", "--json"), env=env, capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise DemoError(f"`spinewatch subscribe` failed: {(done.stderr or done.stdout).strip()[-300:]}")
        subs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        return ", ".join(f"{s['resource_type']} ({s['mode']}, {s['status']})" for s in subs)

    def _wait_for_tiers(self) -> None:
        def all_evaluated() -> bool:
            for p in self.patients:
                p.results["tier"] = stored_tier(self.urls["redis"], p)
            return all(p.results["tier"] for p in self.patients)
        wait_until("the worker's assessments", all_evaluated, self.procs, timeout=self.timeout, interval=0.5)

    def _wait_for_alerts(self, fhir: httpx.Client) -> None:
        """Alerts are written in the background: wait for those the tiers call for, then list all."""
        expecting = [p for p in self.patients if p.results.get("tier") in ("emergency", "urgent")]
        if expecting:
            wait_until("the care-team alerts", lambda: all(communications(fhir, p) for p in expecting),
                       self.procs, timeout=self.timeout, interval=0.5)
        for p in self.patients:
            p.results["alerts"] = [describe_communication(c) for c in communications(fhir, p)]

    def _report(self, out: Progress) -> bool:
        """The results, one block per patient; True when each patient reached its expected tier."""
        out.say("")
        out.say("Results")
        ok = True
        for p in self.patients:
            tier = p.results.get("tier")
            ok = ok and tier == p.expected_tier
            out.say(f"  {p.reference}: {p.title}")
            out.say(f"    tier: {tier or 'not evaluated'} (expected {p.expected_tier})")
            card = p.results.get("card")
            out.say(f"    patient-view card: {f'[{card[0]}] {card[1]}' if card else 'none'}")
            alerts = p.results.get("alerts", [])
            out.say(f"    care-team alerts on the EHR: {len(alerts)}")
            for line in alerts:
                out.say(f"      - {line}")
        audit = self.results.get("audit")
        if audit:
            out.say(f"Audit log: {audit['count']} records ({audit['kinds']}); hash chain: {audit['verification']}")
            if self.run_dir is not None or self.serve:
                out.say(f"  check it yourself: spinewatch audit verify --db {self.urls['audit']}")
            ok = ok and audit["ok"]
        out.say("")
        out.say("Demo OK: every patient reached its expected tier." if ok else "Demo NOT OK: see above.")
        return ok

    def _serve(self, out: Progress) -> None:
        out.say("")
        out.say("Serving until Ctrl-C:")
        out.say(f"  SpineWatch API   {self.urls['api']}  (/cds-services, /healthz, /readyz, /metrics, /docs)")
        out.say(f"  demo EHR (FHIR)  {self.urls['fhir']}")
        out.say(f"  Redis            {self.urls['redis']}")
        out.say(f"  audit log        {self.urls['audit']}")
        out.say(f"  logs             {self.procs.log_dir}")
        while True:
            self.procs.check_alive()
            time.sleep(0.5)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
