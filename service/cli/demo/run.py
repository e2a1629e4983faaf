"""`spinewatch demo`: the whole flow on one machine, on development defaults, without Docker.

    redis-server ─ sekmet-fhir (the demo EHR) ─ API (uvicorn) ─ Celery worker ─ SQLite audit log
    load demo charts → register subscriptions → write new back-pain reports as an EHR would
    → the worker evaluates and alerts → show tier, patient-view card, Communications
    → the MRI clock: one patient's MRI done in time, one deadline passing → spinewatch report → audit

Every process the demo starts runs in a session of its own and is stopped (SIGTERM, then SIGKILL)
when the demo ends, fails, or is interrupted with Ctrl-C or SIGTERM. Its files (logs, Redis data,
FHIR store, audit log) live in one run directory: a temp dir removed at the end, or --dir.

The demo's settings are embedded (`demo_environment`): SPINEWATCH_ variables of the calling shell
are ignored so that a production setting cannot leak into it.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from service.cli.demo.ehr import (PATIENT_VIEW_SERVICE, DemoEhrIssuer, DemoPatient, audit_summary, clock_events,
                                  communications, curl_example, demo_environment, describe_clock,
                                  describe_communication, load_demo_patients, mri_done, patient_view,
                                  post_transaction, report_summary, stored_tier)
from service.core.settings import PLACEHOLDER_SECRET
from service.cli.demo.processes import (FHIR_JSON, HOST, DemoError, Processes, find_or_install_redis, free_port,
                                        spinewatch_cmd, start_api, start_redis, start_sekmet, start_worker,
                                        wait_until)


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


# ---------------- the run ----------------

STEPS = 14
# The MRI clock's two stories (service/cli/demo/data): radiology does this patient's MRI in time;
# nobody orders one for the other, whose note is 20 s short of a day old when the demo loads it
# (its alert goes about 5 s after the load, so the breach has an alert to follow up).
MRI_IN_TIME, MRI_BREACH = "1-emergency", "5-note-only"


@dataclass
class Demo:
    serve: bool = False
    run_dir: Path | None = None
    allow_install: bool = True
    timeout: float = 90.0
    write: Callable[[str], None] | None = None
    procs: Processes = field(init=False)
    urls: dict[str, str] = field(default_factory=dict)
    issuer: DemoEhrIssuer | None = None
    env: dict[str, str] = field(default_factory=dict)
    run_path: Path | None = None
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
        issuer = self.issuer = DemoEhrIssuer(run_dir)
        env = self.env = demo_environment(run_dir, self.urls["redis"], self.urls["fhir"], f"http://{HOST}:{api_port}",
                                          issuer)
        self.run_path = run_dir
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
            with out.step("the MRI clock: one MRI done in time, one deadline passing (NICE QS56: 24 h)") as s:
                self._mri_clocks(fhir)
                s["detail"] = f"{MRI_IN_TIME}: MRI done, {MRI_BREACH}: deadline passed"
        with out.step("the MRI standards report (spinewatch report)") as s:
            self.results["report"] = self._standards_report(env)
            s["detail"] = f"{len(self.results['report'])} line(s)"
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

    def _mri_clocks(self, fhir: httpx.Client) -> None:
        """Radiology orders and does one emergency patient's whole-spine MRI; the other's deadline
        passes with none. Wait for the clock to see both (its scheduled check, every 2 s here), then
        list every patient's clock and Communications (the breach alert among them)."""
        by_key = {p.key: p for p in self.patients}
        post_transaction(fhir, mri_done(by_key[MRI_IN_TIME], datetime.now(timezone.utc)))
        wanted = {by_key[MRI_IN_TIME].reference: "done", by_key[MRI_BREACH].reference: "breached"}

        def both_seen() -> bool:
            found = clock_events(self.urls["audit"])
            return all(event in {e["event"] for e in found.get(ref, [])} for ref, event in wanted.items())
        wait_until("the MRI clocks (one MRI done, one deadline passed)", both_seen, self.procs,
                   timeout=self.timeout, interval=1.0)
        found = clock_events(self.urls["audit"])
        for p in self.patients:
            p.results["clock"] = describe_clock(found.get(p.reference, []))
            p.results["alerts"] = [describe_communication(c) for c in communications(fhir, p)]

    def _standards_report(self, env: dict[str, str]) -> list[str]:
        """`spinewatch report` as a reviewer runs it (audited as `audit-access`): its lines with patients."""
        done = subprocess.run(spinewatch_cmd("report", "--format", "json"), env=env, capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise DemoError(f"`spinewatch report` failed: {(done.stderr or done.stdout).strip()[-300:]}")
        return report_summary(json.loads(done.stdout))

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
            out.say(f"    MRI clock: {p.results.get('clock', 'not checked')}")
        if self.results.get("report"):
            out.say("MRI standards (spinewatch report; a month is that of the first evidence):")
            for line in self.results["report"]:
                out.say(f"  {line}")
        clocks = {p.key: p.results.get("clock", "") for p in self.patients}
        ok = ok and clocks[MRI_IN_TIME].endswith("in time") and "breached" in clocks[MRI_BREACH]
        audit = self.results.get("audit")
        if audit:
            out.say(f"Audit log: {audit['count']} records ({audit['kinds']}); hash chain: {audit['verification']}")
            if self.run_dir is not None or self.serve:
                out.say(f"  check it yourself: spinewatch audit verify --db {self.urls['audit']}")
            ok = ok and audit["ok"]
        out.say("")
        out.say("Demo OK: every patient reached its expected tier, one MRI came in time and one clock breached."
                if ok else "Demo NOT OK: see above.")
        return ok

    def _serve(self, out: Progress) -> None:
        out.say("")
        out.say("Serving until Ctrl-C:")
        api = self.urls["api"]
        out.say(f"  SpineWatch API   {api}  (/cds-services, /healthz, /readyz, /metrics)")
        out.say(f"  OpenAPI          {api}/openapi.json")
        token = self.env.get("SPINEWATCH_REVIEWER_TOKEN", PLACEHOLDER_SECRET)
        out.say(f"  review page      {api}/audit  (reviewer token: {token}, the development default)")
        out.say(f"  MRI standards    {api}/audit/report  (the report page, same sign-in)")
        out.say(f"  demo EHR (FHIR)  {self.urls['fhir']}")
        out.say(f"  Redis            {self.urls['redis']}")
        out.say(f"  audit log        {self.urls['audit']}")
        out.say(f"  logs             {self.procs.log_dir}")
        if self.issuer is not None and self.patients and self.run_path is not None:
            # the emergency still without an MRI (the other one's MRI is done: its card has gone quiet)
            patient = next(p for p in self.patients if p.key == MRI_BREACH)
            url = f"{api}/cds-services/{PATIENT_VIEW_SERVICE}"
            self.issuer.save_key()
            out.say("")
            out.say(f"Call a hook as the demo EHR (patient-view, {patient.reference}; a signed JWT, good for one call "
                    f"within 30 min):")
            out.say(f"  {curl_example(api, self.urls['fhir'], self.issuer, patient.patient_id)}")
            out.say("A fresh token for another call (replace the Bearer value):")
            out.say(f"  {sys.executable} -m service.cli.demo.ehr token --dir {self.run_path} {url}")
        out.say("")
        out.say("Ctrl-C stops everything.")
        while True:
            self.procs.check_alive()
            time.sleep(0.5)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
