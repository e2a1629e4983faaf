"""Benchmark the CDS Hooks patient-view service against a baseline that only verifies the JWT.

The app runs in this process under uvicorn on 127.0.0.1 (a free port), with one trusted ES384
issuer. A baseline endpoint, mounted here only, verifies the same kind of JWT and does nothing else.
Every request carries its own ES384 JWT (unique jti, aud = the URL called), signed before the timed
part, and a patient-view request carries a 20-entry prefetch of an emergency-tier patient.

The load generator is a separate process (16 concurrent httpx clients by default), so its CPU does
not compete with the server for this process's GIL. Per endpoint it prints p50/p95/p99 latency and
throughput as the clients see them, then the ratios. Aims (issue 3): patient-view p99 <= 50 ms, and
patient-view throughput >= 50 % of the baseline's.

Beside them, the server's own view, which a busy machine or a saturated load generator does not
distort: the app's in-process latency per request (ServerTimer) and this process's CPU time per
request (the server's capacity: 1 / CPU per request on one core).

    python bench/hooks.py [--requests 3000] [--concurrency 16] [--rounds 2] [--no-audit]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import percentiles_ms, start_server  # noqa: E402  (bench/ is on sys.path)
from fastapi import Request  # module level: the baseline endpoint's annotations must resolve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support (keys, patient records) without installing tests

from service.api.deps import VerifiedClient  # noqa: E402 - module level, as Request

ISSUER = "https://ehr.bench.example.org"
PATIENT_VIEW_PATH = "/cds-services/spinewatch-patient-view"
BASELINE_PATH = "/bench/jwt-only"


# ---------------------------------------------------------------- load generator (child process)


def _drive(url: str, tokens: list[str], body: bytes, concurrency: int, out) -> None:
    import httpx

    async def run() -> tuple[list[float], float, int]:
        latencies: list[float] = []
        errors = 0
        queue: asyncio.Queue = asyncio.Queue()
        for token in tokens:
            queue.put_nowait(token)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            async def worker():
                nonlocal errors
                while True:
                    try:
                        token = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                    started = time.perf_counter()
                    response = await client.post(url, content=body, headers=headers)
                    latencies.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        errors += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return latencies, time.perf_counter() - started, errors

    cpu = time.process_time()
    latencies, wall, errors = asyncio.run(run())
    out.send((latencies, wall, errors, time.process_time() - cpu))
    out.close()


def measure(url: str, tokens: list[str], body: bytes, concurrency: int, timer: ServerTimer) -> dict:
    timer.samples = []
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_drive, args=(url, tokens, body, concurrency, send))
    cpu = time.process_time()  # this process is the server: its CPU per request is robust to noisy neighbours
    child.start()
    latencies, wall, errors, client_cpu = receive.recv()
    cpu = time.process_time() - cpu
    child.join()
    p50, p95, p99 = percentiles_ms(latencies)
    server = percentiles_ms(timer.samples)
    return {"n": len(latencies), "errors": errors, "rps": len(latencies) / wall,
            "cpu_ms": cpu / len(latencies) * 1000, "client_cpu_ms": client_cpu / len(latencies) * 1000, "p50": p50, "p95": p95, "p99": p99, "server": server}


# ---------------------------------------------------------------- the server (this process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerTimer:
    """ASGI wrapper: time from the app receiving a request to its last response byte, per request.
    Next to the client-side figures it separates the server from a saturated load generator."""

    def __init__(self, app):
        self.app = app
        self.samples: list[float] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        async def timed_send(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.samples.append(time.perf_counter() - started)

        await self.app(scope, receive, timed_send)


def build_app(workdir: Path, issuer, audit: bool):
    from service.api.app import create_app
    from service.core.settings import Settings

    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks))
    settings = Settings(environment="test", cds_trusted_issuers=json.dumps({ISSUER: str(jwks)}),
                        audit_enabled=audit, audit_db_url=f"sqlite:///{workdir / 'audit.sqlite'}",
                        log_level="WARNING", cors_origins="")
    app = create_app(settings)  # its own audit log, on these settings (app.state.services.audit)

    async def jwt_only(request: Request, client: VerifiedClient) -> dict:
        """The baseline: the same JWT verification (signature, claims, jti) and nothing else. It
        drains the body it was sent, unparsed: a response before the body is read makes uvicorn
        close the connection, and the baseline would then measure TCP reconnects."""
        async for _chunk in request.stream():
            pass
        return {"ok": True}

    app.add_api_route(BASELINE_PATH, jwt_only, methods=["POST"])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per endpoint and round")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured requests per endpoint first")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is reported")
    parser.add_argument("--no-audit", action="store_true", help="switch the audit log off (SPINEWATCH_AUDIT_ENABLED)")
    args = parser.parse_args()

    from tests.support.cds_hooks import Issuer, hook_request, prefetch_for, record

    issuer = Issuer(ISSUER, alg="ES384")
    resources = record("emergency", "bench-patient", vitals=16)
    prefetch = prefetch_for(resources)
    entries = sum(1 for v in prefetch.values() if isinstance(v, dict) and v["resourceType"] != "Bundle") + \
        sum(len(v["entry"]) for v in prefetch.values() if isinstance(v, dict) and v["resourceType"] == "Bundle")
    body = json.dumps(hook_request("patient-view", "bench-patient", prefetch)).encode()

    with tempfile.TemporaryDirectory(prefix="spinewatch-bench-") as tmp:
        timer = ServerTimer(build_app(Path(tmp), issuer, audit=not args.no_audit))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server, thread = start_server(timer, port)

        def tokens(path: str, n: int) -> list[str]:  # one JWT per request, signed before timing
            return [issuer.token(base + path, jti=str(uuid.uuid4())) for _ in range(n)]

        try:
            for path in (BASELINE_PATH, PATIENT_VIEW_PATH):  # warm-up: imports, caches, connections
                measure(base + path, tokens(path, args.warmup), body, args.concurrency, timer)
            results: dict[str, list[dict]] = {"baseline": [], "patient-view": []}
            for _ in range(args.rounds):
                for name, path in (("baseline", BASELINE_PATH), ("patient-view", PATIENT_VIEW_PATH)):
                    results[name].append(measure(base + path, tokens(path, args.requests), body, args.concurrency,
                                                 timer))
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    best = {name: max(runs, key=lambda r: r["rps"]) for name, runs in results.items()}
    print(f"patient-view, ES384-signed calls, a {entries}-entry prefetch (emergency tier, 1 card); "
          f"{args.concurrency} concurrent clients; {args.requests} requests per endpoint and round, "
          f"best of {args.rounds} rounds; audit log {'off' if args.no_audit else 'on (SQLite)'}")
    print("latency as the clients see it (ms), throughput, and the server's own view: in-app latency (ms) "
          "and CPU per request (ms)")
    print(f"{'endpoint':<14}{'p50':>8}{'p95':>8}{'p99':>8}{'req/s':>8}{'errors':>7}  |{'app p50':>9}{'app p95':>9}"
          f"{'app p99':>9}{'CPU/req':>9}")
    for name in ("baseline", "patient-view"):
        r = best[name]
        print(f"{name:<14}{r['p50']:8.2f}{r['p95']:8.2f}{r['p99']:8.2f}{r['rps']:8.0f}{r['errors']:7d}  |"
              f"{r['server'][0]:9.2f}{r['server'][1]:9.2f}{r['server'][2]:9.2f}{r['cpu_ms']:9.2f}")
    pv, bl = best["patient-view"], best["baseline"]
    print(f"throughput patient-view / baseline: {pv['rps'] / bl['rps']:.0%}  (aim >= 50 %); "
          f"by server CPU per request: {bl['cpu_ms'] / pv['cpu_ms']:.0%}")
    print(f"p99 patient-view: {pv['p99']:.1f} ms  (aim <= 50 ms); p99 ratio to baseline {pv['p99'] / bl['p99']:.2f}x")
    print(f"load generator CPU per request: {bl['client_cpu_ms']:.2f} ms (baseline), "
          f"{pv['client_cpu_ms']:.2f} ms (patient-view); machine: {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    if pv["errors"] or bl["errors"]:
        raise SystemExit("bench: some requests failed")


if __name__ == "__main__":
    main()
