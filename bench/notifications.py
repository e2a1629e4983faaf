"""Benchmark the subscription notification endpoint and the notification → stored assessment path.

Part 1, acknowledgement: the app runs in this process under uvicorn on 127.0.0.1 with a real
redis-server (started here). Every request is a distinct R4 Backport id-only event notification
(its own patient, so each one is de-duplicated, coalesced and queued for real: Lua claims, a Celery
message on the Redis list, the audit record). Event numbers are consecutive per subscription and
sent in order, as a FHIR server sends them (IG "Event Numbers"): each closed-loop client sends the
events of its own subscription one after another; the open loop spreads its requests over enough
subscriptions that one subscription's events are a second apart. So no gap should be seen, and the
run reports the `notification.gap` warnings the server logged (0 expected). `--gaps` skips every
10th number instead, to measure gap recovery (one warning and one catch-up task per skip). A baseline endpoint mounted on
the same app reads the same body and answers 200, nothing else. The load generator is a separate
process. Throughput: closed loop (--concurrency clients as fast as they can), best of --rounds.
Latency: open loop at a steady --rate (each request due at its time, latency counted from then), as a
FHIR server's notifications arrive. Aims (issue 4): p99 <= 20 ms, throughput >= 40 % of the baseline's.

Part 2, end to end: a real `spinewatch worker` process and a real FHIR server (sekmet-fhir, started
here) holding N charts of patients with cancer. One rest-hook notification per patient is sent
every --interval seconds; the latency is the assessment's `stored_at` minus the send time. It
includes SPINEWATCH_COALESCE_SECONDS, the deliberate wait that lets a burst be evaluated once.
Aim: p95 <= 2 s.

    python bench/notifications.py [--requests 3000] [--concurrency 16] [--rate 100] [--rounds 2] [--patients 40]
                                  [--interval 0.1] [--coalesce 0.5] [--appendfsync everysec|always] [--no-audit]
                                  [--skip-e2e] [--gaps]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from _common import percentiles_ms, start_server  # noqa: E402  (bench/ is on sys.path)
from fastapi import Request  # module level: the baseline route's annotation is resolved from here

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support (redis-server, sekmet, patient records)

TOKEN = "bench-notification-secret"
NOTIFY_PATH = "/fhir/notifications"
BASELINE_PATH = "/bench/bare-post"
GAP_EVERY = 10  # --gaps: every 10th event number of a subscription is never sent


# ---------------------------------------------------------------- load generator (child process)

def _drive(url: str, streams: list[list[bytes]], concurrency: int, out) -> None:
    """Closed loop: each client takes a stream (one subscription's events) and sends it in order."""
    import httpx

    async def run() -> tuple[list[float], float, int]:
        latencies: list[float] = []
        errors = 0
        queue: asyncio.Queue = asyncio.Queue()
        for stream in streams:
            queue.put_nowait(stream)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            async def worker():
                nonlocal errors
                while True:
                    try:
                        stream = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    for body in stream:
                        started = time.perf_counter()
                        response = await client.post(url, content=body, headers=headers)
                        latencies.append(time.perf_counter() - started)
                        if response.status_code != 200:
                            errors += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return latencies, time.perf_counter() - started, errors

    out.send(asyncio.run(run()))
    out.close()


def _drive_rate(url: str, bodies: list[bytes], rate: float, out) -> None:
    """Open loop: request i is due at i / rate seconds, whatever happened to the others; its latency
    counts from when it was due, so a stalled server is not hidden (no coordinated omission)."""
    import httpx

    async def run() -> tuple[list[float], float, int]:
        latencies: list[float] = []
        errors = 0
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            async def one(due: float, body: bytes):
                nonlocal errors
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                response = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - due)
                if response.status_code != 200:
                    errors += 1

            started = time.perf_counter() + 0.2
            await asyncio.gather(*(one(started + i / rate, body) for i, body in enumerate(bodies)))
            return latencies, time.perf_counter() - started, errors

    out.send(asyncio.run(run()))
    out.close()


def _in_child(drive, *args) -> dict:
    """Run a load driver in its own process (its CPU is not the server's) and summarise it."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=drive, args=(*args, send))
    child.start()
    latencies, wall, errors = receive.recv()
    child.join()
    return summarise(latencies) | {"errors": errors, "rps": len(latencies) / wall}


def measure_rate(url: str, bodies: list[bytes], rate: float) -> dict:
    return _in_child(_drive_rate, url, bodies, rate)


def measure(url: str, streams: list[list[bytes]], concurrency: int) -> dict:
    return _in_child(_drive, url, streams, concurrency)


def summarise(seconds: list[float]) -> dict:
    p50, p95, p99 = percentiles_ms(seconds)
    return {"n": len(seconds), "p50": p50, "p95": p95, "p99": p99}


# ---------------------------------------------------------------- notifications

class EventNumbers:
    """The next event number of each subscription: consecutive, or with every `skip_every`-th
    number left out (a gap the server must recover)."""

    def __init__(self, skip_every: int | None = None):
        self.skip_every = skip_every
        self.last: dict[str, int] = {}
        self.skipped = 0

    def next(self, subscription: str) -> int:
        n = self.last.get(subscription, 0) + 1
        if self.skip_every and n % self.skip_every == 0:
            n += 1
            self.skipped += 1
        self.last[subscription] = n
        return n


def streams(numbers: EventNumbers, count: int, subscriptions: int) -> list[list[bytes]]:
    """`count` notifications as `subscriptions` in-order streams, one subscription each; the
    subscriptions are new ones, so each run's streams start where nothing is known."""
    names = [f"Subscription/bench-{uuid.uuid4().hex[:8]}" for _ in range(subscriptions)]
    return [[event_notification(name, numbers.next(name)) for _ in range(count // subscriptions)] for name in names]


def interleaved(numbers: EventNumbers, count: int, subscriptions: int) -> list[bytes]:
    """`count` notifications, round robin over `subscriptions`: for the open loop, where a
    subscription's next event is sent `subscriptions` requests later."""
    names = [f"Subscription/bench-{uuid.uuid4().hex[:8]}" for _ in range(subscriptions)]
    return [event_notification(names[i % subscriptions], numbers.next(names[i % subscriptions])) for i in range(count)]


def event_notification(subscription: str, n: int, fhir_base: str = "http://ehr.bench/fhir") -> bytes:
    """An id-only event (sekmet's shape) for a new patient, event number `n` of `subscription`."""
    pid = f"bench-{uuid.uuid4().hex[:12]}"
    parts = [{"name": "event-number", "valueString": str(n)},
             {"name": "timestamp", "valueInstant": datetime.now().astimezone().isoformat()},
             {"name": "focus", "valueReference": {"reference": f"{fhir_base}/Observation/o-{pid}"}},
             {"name": "additional-context", "valueReference": {"reference": f"{fhir_base}/Patient/{pid}"}}]
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": f"{fhir_base}/{subscription}"}},
        {"name": "topic", "valueCanonical": "http://ehr.bench/topic/observation"},
        {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": "event-notification"},
        {"name": "events-since-subscription-start", "valueString": str(n)},
        {"name": "notification-event", "part": parts}]}
    return json.dumps({"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": params,
         "request": {"method": "GET", "url": f"{fhir_base}/{subscription}/$status"}, "response": {"status": "200"}},
    ]}).encode()


# ---------------------------------------------------------------- the server (this process)

class GapWarnings(logging.Handler):
    """Counts the server's `notification.gap` warnings (service/usecases/intake.py)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, dict) and record.msg.get("event") == "notification.gap":
            self.count += 1


def build_app(redis_url: str, workdir: Path, audit: bool, coalesce: float):
    from service.api.app import create_app
    from service.core.settings import Settings

    settings = Settings(environment="test", redis_url=redis_url, notification_token=TOKEN,
                        coalesce_seconds=coalesce, audit_enabled=audit,
                        audit_db_url=f"sqlite:///{workdir / 'audit.sqlite'}", log_level="WARNING")
    app = create_app(settings)

    async def bare_post(request: Request) -> dict:
        """The baseline: read the body, answer 200."""
        await request.body()
        return {"ok": True}

    app.add_api_route(BASELINE_PATH, bare_post, methods=["POST"])
    return app


def ack_benchmark(args, redis_url: str, workdir: Path) -> dict:
    from tests.support.redis_server import free_port

    app = build_app(redis_url, workdir, audit=not args.no_audit, coalesce=args.coalesce)
    gaps = GapWarnings()
    logging.getLogger().addHandler(gaps)
    # the baseline never reads the numbers: only the notification endpoint's are ever skipped
    numbers = {NOTIFY_PATH: EventNumbers(skip_every=GAP_EVERY if args.gaps else None), BASELINE_PATH: EventNumbers()}
    port = free_port()
    server, thread = start_server(app, port)
    base = f"http://127.0.0.1:{port}"
    best: dict[str, dict] = {}
    c = args.concurrency
    try:
        for path in (NOTIFY_PATH, BASELINE_PATH):  # warm-up: connections, Lua scripts, Celery producer
            measure(base + path, streams(numbers[path], args.warmup, c), c)
        steady = {name: measure_rate(base + path, interleaved(numbers[path], int(args.rate * 10), max(1, int(args.rate))),
                                     args.rate)
                  for name, path in (("notification", NOTIFY_PATH), ("baseline", BASELINE_PATH))}
        for _ in range(args.rounds):
            for name, path in (("notification", NOTIFY_PATH), ("baseline", BASELINE_PATH)):
                result = measure(base + path, streams(numbers[path], args.requests, c), c)
                if name not in best or result["rps"] > best[name]["rps"]:
                    best[name] = result
    finally:
        server.should_exit = True
        thread.join(10)
        logging.getLogger().removeHandler(gaps)
    return {"steady": steady, **best, "gap_warnings": gaps.count, "skipped": numbers[NOTIFY_PATH].skipped}


# ---------------------------------------------------------------- end to end

def e2e_benchmark(args, redis_url: str, workdir: Path) -> dict:
    import httpx
    import redis

    from tests.support import cds_hooks as ch
    from tests.support.redis_server import free_port
    from tests.support.sekmet_server import SekmetServer

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    with SekmetServer(validation="warn") as fhir_server:
        with fhir_server.client() as fhir:
            charts = []
            for _ in range(args.patients):
                pid = fhir.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
                for resource in ch.record("emergency", pid)[1:]:
                    body = {k: v for k, v in resource.items() if k != "id"}
                    stored = fhir.post(f"/{body['resourceType']}", json=body).json()
                charts.append((pid, stored))  # the last one written: the leg-weakness Observation
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
            "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": redis_url,
            "SPINEWATCH_FHIR_BASE_URL": fhir_server.base_url, "SPINEWATCH_NOTIFICATION_TOKEN": TOKEN,
            "SPINEWATCH_COALESCE_SECONDS": str(args.coalesce), "SPINEWATCH_LOG_LEVEL": "WARNING",
            "SPINEWATCH_AUDIT_ENABLED": "false" if args.no_audit else "true",
            "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{workdir / 'worker-audit.sqlite'}",
            "SPINEWATCH_ALERT_DEFAULT_RECIPIENT": "Organization/acute-oncology",
            "SPINEWATCH_RECONCILIATION_INTERVAL_SECONDS": "0"}
        log = open(workdir / "worker.log", "wb")
        script = Path(sys.executable).parent / "spinewatch"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli.main"]
        worker = subprocess.Popen([*command, "worker", "--no-beat",
                                   "--concurrency", str(args.worker_concurrency), "--loglevel", "WARNING"],
                                  env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        app = build_app(redis_url, workdir, audit=not args.no_audit, coalesce=args.coalesce)
        port = free_port()
        server, thread = start_server(app, port)
        try:
            time.sleep(3)  # the worker's processes start
            sent: dict[str, float] = {}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
                for pid, obs in charts:
                    sent[pid] = time.time()
                    response = api.put(f"{NOTIFY_PATH}/Observation/{obs['id']}", json=obs,
                                       headers={"Authorization": f"Bearer {TOKEN}"})
                    assert response.status_code == 200, response.text
                    time.sleep(args.interval)
            latencies: dict[str, float] = {}
            deadline = time.monotonic() + 60
            while len(latencies) < len(sent) and time.monotonic() < deadline:
                for pid in sent:
                    if pid in latencies:
                        continue
                    raw = r.hget(f"spinewatch:assessment:Patient/{pid}", "json")
                    if raw:
                        record = json.loads(raw)
                        latencies[pid] = datetime.fromisoformat(record["stored_at"]).timestamp() - sent[pid]
                time.sleep(0.02)
            if len(latencies) < len(sent):
                raise SystemExit(f"bench: only {len(latencies)} of {len(sent)} assessments stored; see {log.name}")
        finally:
            server.should_exit = True
            thread.join(10)
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(20)
    return summarise(list(latencies.values())) | {"max": max(latencies.values()) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per endpoint and round")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16, help="closed loop: clients, for throughput")
    parser.add_argument("--rate", type=float, default=100, help="open loop: notifications per second, for latency")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is reported")
    parser.add_argument("--patients", type=int, default=40, help="end to end: patients notified")
    parser.add_argument("--interval", type=float, default=0.1, help="end to end: seconds between notifications")
    parser.add_argument("--coalesce", type=float, default=0.5, help="SPINEWATCH_COALESCE_SECONDS (default 0.5)")
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument("--no-audit", action="store_true", help="switch the audit log off (comparison only)")
    parser.add_argument("--appendfsync", choices=["always", "everysec"], default="everysec",
                        help="Redis AOF fsync policy: everysec as in docker-compose.yml (default), or always "
                             "(as tests/support/redis_server.py: every write on disk before the answer)")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--gaps", action="store_true",
                        help=f"skip every {GAP_EVERY}th event number per subscription: measure gap recovery")
    args = parser.parse_args()

    from tests.support.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="spinewatch-bench-") as tmp, RedisServer() as redis_server:
        import redis

        workdir = Path(tmp)
        redis.Redis.from_url(redis_server.url).config_set("appendfsync", args.appendfsync)
        print(f"redis-server {redis_server.url} (appendonly, appendfsync {args.appendfsync}); audit "
              f"{'off' if args.no_audit else 'on (SQLite)'}; {os.cpu_count()} CPUs", flush=True)
        ack = ack_benchmark(args, redis_server.url, workdir)
        n, b = ack["notification"], ack["baseline"]
        print(f"\nacknowledgement, {args.concurrency} concurrent clients, best of {args.rounds} rounds of "
              f"{args.requests}:")
        for name, x in (("notification", n), ("baseline bare POST", b)):
            print(f"  {name:<20} p50 {x['p50']:6.2f} ms  p95 {x['p95']:6.2f} ms  p99 {x['p99']:6.2f} ms  "
                  f"{x['rps']:7.0f} req/s  errors {x['errors']}")
        print(f"  throughput ratio {n['rps'] / b['rps']:.0%} of the baseline (aim >= 40 %)")
        print(f"\nacknowledgement at a steady {args.rate:.0f} notifications/s for 10 s (open loop):")
        for name, x in ack["steady"].items():
            print(f"  {name:<20} p50 {x['p50']:6.2f} ms  p95 {x['p95']:6.2f} ms  p99 {x['p99']:6.2f} ms  "
                  f"errors {x['errors']}")
        print(f"  notification p99 {ack['steady']['notification']['p99']:.1f} ms (aim <= 20 ms)")
        print(f"\ngap warnings (notification.gap) the server logged: {ack['gap_warnings']}"
              + (f"; event numbers skipped on purpose (--gaps): {ack['skipped']}" if args.gaps
                 else " (events in order: 0 expected)"))
        if not args.skip_e2e:
            e2e = e2e_benchmark(args, redis_server.url, workdir)
            print(f"\nnotification -> stored assessment, {args.patients} patients, one every {args.interval} s, "
                  f"coalesce {args.coalesce} s, real worker ({args.worker_concurrency} processes) and sekmet-fhir:")
            print(f"  p50 {e2e['p50']:.0f} ms  p95 {e2e['p95']:.0f} ms  max {e2e['max']:.0f} ms (aim p95 <= 2000 ms)")


if __name__ == "__main__":
    main()
