"""Soak: many notifications for a mix of patients while workers are killed and Redis restarts; then
every accepted notification is reconciled against the evaluations, alerts and audit records.

Real processes on 127.0.0.1 only (tests/support/fault_stack.py): a redis-server with its append-only
file (fsync always), `spinewatch serve` (uvicorn), `spinewatch worker` (Celery, prefork), and a FHIR
server on a socket in this process holding the patients' charts and receiving the alerts.

The run, as an EHR would drive it:
- `--patients` charts (tiers emergency, urgent, routine, none in turn) are loaded;
- `--notifications` rest-hook notifications (PUT /fhir/notifications/Patient/{id}, the resource as
  payload, as sekmet-fhir sends them) are sent by `--senders` threads at about `--rate` a second:
  most report a new version of a Patient (every patient at least once; a changed phone number:
  a change each evaluation reads and audits among its inputs, but no new clinical evidence, so it
  must not alert again); `--duplicates` of them re-deliver an earlier notification byte for byte,
  as FHIR servers do;
  a refused delivery (503, connection refused) is retried, as the server would, until accepted;
- during the run: the worker's pool processes are SIGKILLed (`--child-kills` times), the whole worker
  (main process and pool) is SIGKILLed and restarted (`--worker-kills`), and Redis is SIGKILLed and
  restarted on its append-only file (`--redis-restarts`).

Then it waits (at most `--settle` seconds) until every accepted notification is covered, and prints:

    sent / delivery attempts / refused (503) / accepted (queued, duplicate)
    evaluated   accepted notifications whose change an evaluation read: an `evaluation` audit record
                of that patient lists the resource at that version or later among its inputs
    lost        accepted but never evaluated (must be 0)
    alerts per in-scope patient (emergency, urgent): Communications on the FHIR server (exactly 1)
    duplicated alerts (must be 0), alerts for out-of-scope patients (must be 0)
    audit       a `notification` record per accepted delivery; the hash chain verifies
    throughput  accepted notifications per second while sending, and until all were evaluated

Exit status 0 when lost = 0, duplicated = 0, every in-scope patient has exactly one alert and the
audit chain verifies; 1 otherwise.

    python bench/soak.py [--notifications 1000] [--patients 40] [--rate 25] [--senders 4]
                         [--duplicates 0.2] [--child-kills 2] [--worker-kills 1] [--redis-restarts 1]
                         [--settle 300] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support

TIERS = ("emergency", "urgent", "routine", "none")
IN_SCOPE = ("emergency", "urgent")  # the tiers that alert the care team (docs/alerts.md)


@dataclass
class Delivery:
    """One notification as the EHR sends it (a re-delivery shares the body of the first)."""
    ref: str  # Patient/<id>
    version: str
    patient: str
    body: bytes
    duplicate: bool
    attempts: int = 0
    refused: int = 0
    outcome: str | None = None  # queued | duplicate | coalesced ... (the diagnostics' first word)
    accepted_at: float | None = None


@dataclass
class Run:
    deliveries: list[Delivery] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def demographics_update(patient: dict) -> dict:
    """A new version of the Patient (a changed phone number): a change every evaluation reads (its
    version is in the evaluation's audited inputs) that is no new clinical evidence, so it must not
    alert again."""
    return {k: v for k, v in patient.items() if k != "meta"} | {
        "telecom": [{"system": "phone", "value": f"+44 7700 {random.randint(100000, 999999)}"}]}


def deliver(stack, d: Delivery, give_up_after: float) -> None:
    """PUT until 2xx, backing off on 503 and on a refused connection, as a FHIR server retries."""
    url = f"{stack.api_url}/fhir/notifications/{d.ref}"
    headers = {"Authorization": f"Bearer {stack.env['SPINEWATCH_NOTIFICATION_TOKEN']}",
               "Content-Type": "application/fhir+json"}
    deadline, delay = time.monotonic() + give_up_after, 0.1
    import httpx

    while time.monotonic() < deadline:
        d.attempts += 1
        try:
            response = stack.http.put(url, content=d.body, headers=headers, timeout=10)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200:
            text = response.json()["issue"][0]["diagnostics"]
            d.outcome = "duplicate" if text.startswith("duplicate") else "queued" if "queued" in text else text
            d.accepted_at = time.time()
            return
        if response is not None and response.status_code != 503:
            raise SystemExit(f"soak: {d.ref} answered HTTP {response.status_code}: {response.text[:300]}")
        d.refused += 1
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def inject(stack, run: Run, name: str) -> None:
    started = time.monotonic()
    if name == "child-kill":
        killed = stack.kill_worker_children()
        detail = f"SIGKILL {len(killed)} worker pool process(es)"
    elif name == "worker-kill":
        stack.kill_worker(whole_group=True)
        stack.start_worker()
        detail = "SIGKILL worker main process and pool, restarted"
    else:
        os.kill(stack.redis.proc.pid, signal.SIGKILL)
        stack.redis.proc.wait(5)
        stack.redis.proc = None
        stack.redis.start()
        detail = "SIGKILL redis-server, restarted on its append-only file"
    with run.lock:
        run.faults.append((started, f"{detail} ({time.monotonic() - started:.1f} s)"))


def covered(deliveries: list[Delivery], evaluations: dict[str, list[dict]]) -> list[Delivery]:
    """Accepted deliveries no evaluation of their patient has read (at their version or later)."""
    missing = []
    for d in deliveries:
        seen = False
        for inputs in evaluations.get(d.patient, ()):
            v = inputs.get(d.ref)
            if v is not None and (not v.isdigit() or int(v) >= int(d.version)):
                seen = True
                break
        if not seen:
            missing.append(d)
    return missing


def evaluations_by_patient(records) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.kind == "evaluation" and r.patient:
            out[r.patient].append(r.detail.get("inputs") or {})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notifications", type=int, default=1000)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--rate", type=float, default=25.0, help="notifications per second, about")
    parser.add_argument("--senders", type=int, default=4, help="concurrent deliveries")
    parser.add_argument("--duplicates", type=float, default=0.2, help="share of re-deliveries")
    parser.add_argument("--child-kills", type=int, default=2)
    parser.add_argument("--worker-kills", type=int, default=1)
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--settle", type=float, default=300.0, help="most seconds to wait for the backlog")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="keep logs, Redis data and the audit log here")
    args = parser.parse_args()
    random.seed(args.seed)

    from tests.support.fault_stack import Stack

    run_dir = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="spinewatch-soak-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {"SPINEWATCH_COALESCE_SECONDS": "0.5", "SPINEWATCH_TASK_MAX_RETRIES": "5",
           "SPINEWATCH_FHIR_TIMEOUT_SECONDS": "5", "SPINEWATCH_TASK_TIME_LIMIT_SECONDS": "20",
           # Above the longest countdown a task gets (an alert lock's 120 s), so that no waiting retry is
           # redelivered early; a killed worker's tasks come back after it.
           "SPINEWATCH_BROKER_VISIBILITY_TIMEOUT_SECONDS": "150",
           # Celery beat runs as its own process, as in docker-compose.yml: the watchdog (every
           # 10 s here) sends again an evaluation the broker lost (service/infra/queue.py recover_pending).
           "SPINEWATCH_HEARTBEAT_WATCHDOG_SECONDS": "20"}
    print(f"soak: {args.notifications} notifications, {args.patients} patients, ~{args.rate:g}/s, "
          f"{args.duplicates:.0%} re-deliveries; faults: {args.child_kills} pool kill(s), {args.worker_kills} "
          f"worker kill(s), {args.redis_restarts} Redis restart(s); {os.cpu_count()} CPUs; run dir {run_dir}",
          flush=True)
    stack = Stack(run_dir, env=env, concurrency=args.concurrency, beat=True)
    run = Run()
    try:
        patients = {}
        for i in range(args.patients):
            tier = TIERS[i % len(TIERS)]
            pid = stack.patient(tier, f"soak-{i:03d}-{tier}")
            patients[f"Patient/{pid}"] = tier

        # the plan: which send is a new observation and which a re-delivery, and when faults strike
        faults = ["child-kill"] * args.child_kills + ["worker-kill"] * args.worker_kills + \
            ["redis-restart"] * args.redis_restarts
        random.shuffle(faults)
        fault_at = {int(args.notifications * (k + 1) / (len(faults) + 1)): f for k, f in enumerate(faults)}
        pool = ThreadPoolExecutor(args.senders)
        fault_threads, futures, originals = [], [], []
        started = time.monotonic()
        for n in range(args.notifications):
            if n in fault_at:
                t = threading.Thread(target=inject, args=(stack, run, fault_at[n]))
                t.start()
                fault_threads.append(t)
            if len(originals) >= len(patients) and random.random() < args.duplicates:
                first = random.choice(originals)
                d = Delivery(first.ref, first.version, first.patient, first.body, duplicate=True)
            else:
                # every patient at least once, then at random
                patient = list(patients)[len(originals)] if len(originals) < len(patients) \
                    else random.choice(list(patients))
                pid = patient.split("/", 1)[1]
                stored = stack.fhir.put(demographics_update(stack.fhir.resources[("Patient", pid)]))
                d = Delivery(f"Patient/{pid}", stored["meta"]["versionId"], patient,
                             json.dumps(stored).encode(), duplicate=False)
                originals.append(d)
            run.deliveries.append(d)
            futures.append(pool.submit(deliver, stack, d, args.settle))
            pause = started + (n + 1) / args.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        for f in futures:
            f.result()
        sent_done = time.monotonic()
        for t in fault_threads:
            t.join()
        pool.shutdown()

        accepted = [d for d in run.deliveries if d.accepted_at is not None]
        # settle: every accepted notification read by an evaluation, then every in-scope patient
        # alerted and nothing left in the broker (a killed worker's tasks come back after the
        # visibility timeout: a duplicate alert would show then)
        deadline = time.monotonic() + args.settle
        missing, all_done = accepted, None
        in_scope = [p for p, tier in patients.items() if tier in IN_SCOPE]
        r = stack.redis_client()
        while time.monotonic() < deadline:
            missing = covered(accepted, evaluations_by_patient(stack.audit_records("evaluation")))
            if not missing and all_done is None:
                all_done = time.monotonic()
            if not missing and all(stack.fhir.communications(p) for p in in_scope) \
                    and r.llen("celery") == 0 and r.hlen("unacked") == 0:
                break
            time.sleep(1.0)
        all_done = all_done or time.monotonic()
        time.sleep(3.0)  # a late alert or duplicate evaluation would land now
        return report(args, stack, run, patients, accepted, missing, started, sent_done, all_done)
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def report(args, stack, run: Run, patients: dict[str, str], accepted: list[Delivery], missing: list[Delivery],
           started: float, sent_done: float, all_done: float) -> int:
    from service.infra.audit.store import store_for

    records = stack.audit_records()
    kinds = Counter(r.kind for r in records)
    evaluations = [r for r in records if r.kind == "evaluation"]
    alerts_fhir = {p: len(stack.fhir.communications(p)) for p in patients}
    in_scope = {p: n for p, n in alerts_fhir.items() if patients[p] in IN_SCOPE}
    out_of_scope_alerts = sum(n for p, n in alerts_fhir.items() if patients[p] not in IN_SCOPE)
    duplicated = sum(max(0, n - 1) for n in alerts_fhir.values())
    audited_alerts = Counter(r.patient for r in records if r.kind == "alert" and r.outcome == "success")
    notif_records = Counter()
    for r in records:
        if r.kind == "notification":
            for focus in r.detail.get("focus") or []:
                notif_records[focus] += 1
    accepted_per_ref = Counter(d.ref for d in accepted)
    unaudited = sum(max(0, n - notif_records.get(ref, 0)) for ref, n in accepted_per_ref.items())
    store = store_for(stack.env["SPINEWATCH_AUDIT_DB_URL"])
    verification = store.verify()
    store.dispose()
    dead = stack.dead_letters()
    outcomes = Counter(d.outcome for d in accepted)
    by_tier = Counter(patients.values())
    send_seconds = sent_done - started
    total_seconds = all_done - started
    lost = len(missing)
    alerts_ok = all(n == 1 for n in in_scope.values())

    print()
    print("soak results")
    print(f"  sent                    {len(run.deliveries)} notifications "
          f"({sum(not d.duplicate for d in run.deliveries)} new Patient versions, "
          f"{sum(d.duplicate for d in run.deliveries)} re-deliveries) for {len(patients)} patients "
          f"({', '.join(f'{by_tier[t]} {t}' for t in TIERS)})")
    print(f"  delivery attempts       {sum(d.attempts for d in run.deliveries)} "
          f"({sum(d.refused for d in run.deliveries)} refused with 503 or connection refused, then retried)")
    print(f"  accepted                {len(accepted)} ({', '.join(f'{n} {o}' for o, n in outcomes.most_common())})")
    print(f"  evaluated               {len(accepted) - lost} of {len(accepted)} accepted notifications read by an "
          f"evaluation ({len(evaluations)} evaluations in all)")
    print(f"  lost                    {lost}" + (f"  e.g. {[d.ref for d in missing[:5]]}" if missing else ""))
    counts = Counter(in_scope.values())
    print(f"  alerts per in-scope patient ({len(in_scope)} emergency/urgent): "
          + ", ".join(f"{n} alert(s): {k} patient(s)" for n, k in sorted(counts.items()))
          + f"  (audit: {sum(1 for p in in_scope if audited_alerts.get(p) == 1)} with exactly one alert record)")
    print(f"  duplicated alerts       {duplicated}")
    print(f"  alerts out of scope     {out_of_scope_alerts} (routine and none must not alert)")
    print(f"  audit                   {len(records)} records ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); "
          f"accepted deliveries without a notification record: {unaudited}; hash chain "
          f"{'verified' if verification.ok else 'BROKEN'} ({verification.checked} records)")
    recovered = sum(1 for r in evaluations if (r.detail.get("trigger") or {}).get("kind") == "recovery")
    print(f"  recovered               {recovered} evaluation(s) sent again by the watchdog (queued, never started: "
          f"a message the broker lost)")
    print(f"  dead letters            {len(dead)}" + (f" ({Counter(d['error'] for d in dead)})" if dead else ""))
    print("  faults injected:")
    for at, what in run.faults:
        print(f"    +{at - started:6.1f} s  {what}")
    print(f"  throughput              {len(accepted) / send_seconds:.1f} accepted notifications/s while sending "
          f"({send_seconds:.1f} s); all evaluated {total_seconds:.1f} s after the first "
          f"({len(accepted) / total_seconds:.1f}/s end to end)")
    ok = lost == 0 and duplicated == 0 and alerts_ok and out_of_scope_alerts == 0 and verification.ok
    print(f"  verdict                 {'PASS' if ok else 'FAIL'}: lost {lost}, duplicated alerts {duplicated}, "
          f"in-scope patients without exactly one alert {sum(n != 1 for n in in_scope.values())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
