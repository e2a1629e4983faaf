"""Benchmark the CDS Hooks patient-view service: server CPU per call, throughput and latency, against
baselines served by the same server process.

The server is a separate process running the production app under uvicorn with `spinewatch serve`'s
options (h11, the settings' header and keep-alive limits), its log at the production level (INFO, to a
file) and the audit log on (SQLite). Mounted on it for this benchmark only: three baselines that do a
part of what patient-view does with the same request,

    jwt-only    verify the ES384 JWT (signature, claims, jti replay cache), drain the body unparsed
    json-only   read and parse the body (no JWT)
    jwt+json    both: what any authenticated CDS Hooks endpoint has to do before its own work

The baselines take the caller as the `VerifiedClient` dependency (as discovery and feedback do);
patient-view's route makes the same verification as a plain call (service/api/deps.py
verify_cds_client), so it skips one dependency resolution the baselines pay (tens of µs).

The load generator is wrk (Debian package `wrk`, a C event loop: a small fraction of the server's CPU
per call, so it saturates the server, not itself) with bench/hooks.lua, which sends each request with
its own JWT (fresh jti, aud = the URL called), all signed before the clock starts. With two or more
CPUs the server is pinned to one and wrk to another (taskset). The headline is the server's CPU time
per call, read from /proc before and after each run. Throughput and latency depend directly on how
busy the machine is (the load average is printed with them); CPU per call less so, but a busy
neighbour on the same core raises it too (caches), so every row runs --rounds times and the round
with the least server CPU per call is shown.

`--compare-workers` then runs patient-view against a real `spinewatch serve --workers N` (N = 1 and 2,
the JWT replay cache in a real redis-server, as N > 1 requires), unpinned: the two workers need both
cores, so wrk shares them.

    python bench/hooks.py [--seconds 5] [--rounds 2] [--connections 1,4,16] [--no-audit] [--compare-workers]
"""

# No `from __future__ import annotations`: FastAPI reads the baseline routes' annotations (Request,
# VerifiedClient, imported inside bench_app) from the functions themselves.
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support (keys, patient records) without installing tests

from tests.support.redis_server import RedisServer, free_port  # noqa: E402

ISSUER = "https://ehr.bench.example.org"
LUA = Path(__file__).with_suffix(".lua")
PATIENT_VIEW = "/cds-services/spinewatch-patient-view"
ENDPOINTS = {"patient-view": PATIENT_VIEW, "jwt+json": "/bench/jwt-json", "jwt-only": "/bench/jwt-only",
             "json-only": "/bench/json-only"}
BASELINES = ("jwt+json", "jwt-only", "json-only")
VITALS = 26  # vital-sign Observations in the chart: with the rest, a 30-entry prefetch
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WARM_UP_SECONDS = 2
WARM_UP_RPS_CEILING = 2500  # more than one core serves any of these endpoints at (tokens for the warm-up)


# ---------------------------------------------------------------- the server (a child process)


def bench_settings(workdir: Path, audit: bool):
    from service.core.settings import Settings

    return Settings(environment="test", cds_trusted_issuers=json.dumps({ISSUER: str(workdir / "jwks.json")}),
                    audit_enabled=audit, audit_db_url=f"sqlite:///{workdir / 'audit.sqlite'}", cors_origins="")


def bench_app(settings):
    """The production app plus the baselines (here only, never in service/)."""
    from fastapi import Request

    from service.api.app import create_app
    from service.api.body import read_json
    from service.api.deps import VerifiedClient

    app = create_app(settings)

    async def jwt_only(request: Request, client: VerifiedClient) -> dict:
        # Drained, not parsed: answering before the body is read makes uvicorn close the connection,
        # and the baseline would then measure TCP reconnects.
        async for _chunk in request.stream():
            pass
        return {"ok": True}

    async def json_only(request: Request) -> dict:
        await read_json(request, settings.max_body_bytes)
        return {"ok": True}

    async def jwt_json(request: Request, client: VerifiedClient) -> dict:
        await read_json(request, settings.max_body_bytes)
        return {"ok": True}

    for name, route in (("jwt-only", jwt_only), ("json-only", json_only), ("jwt+json", jwt_json)):
        app.add_api_route(ENDPOINTS[name], route, methods=["POST"])
    return app


def serve_bench_app(workdir: Path, port: int, audit: bool) -> None:
    import uvicorn

    from service.cli.serve import uvicorn_options

    settings = bench_settings(workdir, audit)
    uvicorn.run(bench_app(settings), host="127.0.0.1", port=port, log_config=None, **uvicorn_options(settings))


# ---------------------------------------------------------------- measuring from outside


def pinned(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def start(command: list[str], env: dict, log: Path, base: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"bench: the server did not start:\n{log.read_text(errors='replace')[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    proc.wait(20)


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of `root` and all its descendants (uvicorn's workers), from /proc."""
    parents, ticks = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime, stime
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(ticks.get(pid, 0) for pid in tree) / CLOCK_TICKS


def wrk_run(base: str, path: str, tokens: list[str], body_file: Path, seconds: float, connections: int,
            server_pid: int, wrk_cpu: int | None, workdir: Path) -> dict:
    token_file = workdir / "tokens.txt"
    token_file.write_text("\n".join(tokens) + "\n")
    env = os.environ | {"BENCH_PATH": path, "BENCH_BODY": str(body_file), "BENCH_TOKENS": str(token_file)}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = tree_cpu_seconds(server_pid)
    done = subprocess.run([*pinned(wrk_cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(LUA),
                           base + path], env=env, capture_output=True, text=True, timeout=seconds + 60)
    server_cpu = tree_cpu_seconds(server_pid) - cpu_before
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"bench: wrk failed: {done.stderr.strip()}")
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    n = summary["requests"]
    return {"n": n, "rps": n / (summary["duration_us"] / 1e6), "p50": summary["p50_us"] / 1000,
            "p99": summary["p99_us"] / 1000, "errors": summary["errors"] + summary["non_2xx"],
            "cpu_ms": server_cpu / n * 1000,
            "wrk_cpu_ms": (children.ru_utime + children.ru_stime - children_before.ru_utime
                           - children_before.ru_stime) / n * 1000}


class Bench:
    """One server process, one issuer, one request body; measured with wrk."""

    def __init__(self, issuer, base: str, server: subprocess.Popen, body_file: Path, workdir: Path,
                 wrk_cpu: int | None):
        self.issuer, self.base, self.server, self.body_file = issuer, base, server, body_file
        self.workdir, self.wrk_cpu = workdir, wrk_cpu

    def run(self, path: str, seconds: float, connections: int, expected_rps: float) -> dict:
        # One JWT per request, signed before the clock starts: twice as many as the rate seen so far
        # needs (wrk runs for a time, not a count; one token too few shows as a 401 in errors).
        tokens = [self.issuer.token(self.base + path, jti=str(uuid.uuid4()))
                  for _ in range(int(expected_rps * seconds * 2) + 100)]
        return wrk_run(self.base, path, tokens, self.body_file, seconds, connections, self.server.pid,
                       self.wrk_cpu, self.workdir)

    def warm_up(self, path: str) -> float:
        """Unmeasured calls (imports, caches, the audit store, connections); their rate."""
        return self.run(path, WARM_UP_SECONDS, 4, WARM_UP_RPS_CEILING)["rps"]


def cpus_for(server_and_wrk: bool) -> tuple[int | None, int | None]:
    """(server CPU, wrk CPU): separate cores when there are two to give, else unpinned."""
    available = sorted(os.sched_getaffinity(0))
    if server_and_wrk and len(available) >= 2 and shutil.which("taskset"):
        return available[-1], available[0]
    return None, None


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def print_rows(results: dict[tuple[str, int], dict]) -> None:
    print(f"{'endpoint':<13}{'conns':>6}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'server CPU':>12}{'wrk CPU':>9}"
          f"{'errors':>7}")
    for (name, connections), r in results.items():
        print(f"{name:<13}{connections:>6}{r['rps']:8.0f}{r['p50']:8.2f}{r['p99']:8.2f}{r['cpu_ms']:9.2f} ms"
              f"{r['wrk_cpu_ms']:6.2f} ms{r['errors']:7d}")


def main_benchmark(args, issuer, body_file: Path, workdir: Path) -> bool:
    server_cpu, wrk_cpu = cpus_for(not args.no_pin)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [*pinned(server_cpu), sys.executable, __file__, "--serve", str(workdir), str(port)]
    server = start(command + (["--no-audit"] if args.no_audit else []), os.environ.copy(),
                   workdir / "server.log", base)
    bench = Bench(issuer, base, server, body_file, workdir, wrk_cpu)
    load_before = load_average()
    results: dict[tuple[str, int], dict] = {}
    try:
        rates = {name: bench.warm_up(path) for name, path in ENDPOINTS.items()}
        for _ in range(args.rounds):
            for connections in args.connections:
                for name, path in ENDPOINTS.items():
                    result = bench.run(path, args.seconds, connections, rates[name])
                    # the least disturbed round: a neighbour's load raises CPU per call too (caches)
                    if (name, connections) not in results or result["cpu_ms"] < results[name, connections]["cpu_ms"]:
                        results[name, connections] = result
    finally:
        stop(server)
    pin = (f"server pinned to CPU {server_cpu}, wrk to CPU {wrk_cpu}" if server_cpu is not None
           else "unpinned (server and wrk share the CPUs)")
    print(f"\npatient-view: ES384 JWT per call, {args.seconds} s per row, the round of {args.rounds} with the least "
          f"server CPU per call; audit log "
          f"{'off' if args.no_audit else 'on (SQLite)'}; log level INFO; {os.cpu_count()} CPUs, {pin}; "
          f"load average (1/5/15 min) {load_before} before, {load_average()} after")
    print_rows(results)
    print("\npatient-view / baseline, same server process, same connections:")
    for baseline in BASELINES:
        cells = [f"{c:>2} conns: CPU/call {results['patient-view', c]['cpu_ms'] / results[baseline, c]['cpu_ms']:4.2f}x"
                 f", throughput {results['patient-view', c]['rps'] / results[baseline, c]['rps']:4.2f}x"
                 for c in args.connections]
        print(f"  vs {baseline:<10} " + " | ".join(cells))
    return any(r["errors"] for r in results.values())


def workers_benchmark(args, issuer, body_file: Path, workdir: Path) -> bool:
    results: dict[tuple[str, int], dict] = {}
    loads = [load_average()]
    with RedisServer() as redis_server:
        for workers in (1, 2):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
                "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": redis_server.url,
                "SPINEWATCH_CDS_JTI_REDIS_URL": redis_server.url.replace("/0", "/1"),
                "SPINEWATCH_CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: str(workdir / "jwks.json")}),
                "SPINEWATCH_AUDIT_ENABLED": "false" if args.no_audit else "true",
                "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{workdir / f'audit-{workers}.sqlite'}"}
            script = Path(sys.executable).parent / "spinewatch"
            server = start([str(script), "serve", "--port", str(port), "--workers", str(workers)], env,
                           workdir / f"serve-{workers}.log", base)
            bench = Bench(issuer, base, server, body_file, workdir, wrk_cpu=None)
            try:
                time.sleep(3)  # /healthz answers once one worker is up: let the others finish warming up
                rate = bench.warm_up(PATIENT_VIEW)
                results[f"{workers} worker{'s' if workers > 1 else ''}", 16] = bench.run(
                    PATIENT_VIEW, args.seconds, 16, rate * workers)
            finally:
                stop(server)
            loads.append(load_average())
    print(f"\n`spinewatch serve --workers N`, patient-view, 16 connections, unpinned, JWT replay cache in Redis; "
          f"load average {' -> '.join(loads)}")
    print_rows(results)
    one, two = results["1 worker", 16], results["2 workers", 16]
    print(f"  2 workers / 1 worker: throughput {two['rps'] / one['rps']:.2f}x, "
          f"CPU per call {two['cpu_ms'] / one['cpu_ms']:.2f}x")
    return any(r["errors"] for r in results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk's run time per endpoint and row")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every row; each row's least disturbed is shown")
    parser.add_argument("--connections", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16],
                        help="wrk connections, comma-separated (default 1,4,16)")
    parser.add_argument("--no-audit", action="store_true", help="switch the audit log off (SPINEWATCH_AUDIT_ENABLED)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and wrk to separate CPUs")
    parser.add_argument("--compare-workers", action="store_true",
                        help="also: patient-view on `spinewatch serve --workers 1` and `--workers 2`")
    parser.add_argument("--only-workers", action="store_true", help="only the --compare-workers part")
    parser.add_argument("--serve", nargs=2, metavar=("WORKDIR", "PORT"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.serve:
        return serve_bench_app(Path(args.serve[0]), int(args.serve[1]), audit=not args.no_audit)
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")

    from tests.support.cds_hooks import Issuer, hook_request, prefetch_for, record

    issuer = Issuer(ISSUER, alg="ES384")
    prefetch = prefetch_for(record("emergency", "bench-patient", vitals=VITALS))
    entries = sum(len(v["entry"]) if v["resourceType"] == "Bundle" else 1 for v in prefetch.values() if v)
    print(f"patient-view request: a {entries}-entry prefetch of an emergency-tier patient (1 card)")
    with tempfile.TemporaryDirectory(prefix="spinewatch-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "jwks.json").write_text(json.dumps(issuer.jwks))
        body_file = workdir / "body.json"
        body_file.write_text(json.dumps(hook_request("patient-view", "bench-patient", prefetch)))
        failed = False if args.only_workers else main_benchmark(args, issuer, body_file, workdir)
        if args.compare_workers or args.only_workers:
            failed = workers_benchmark(args, issuer, body_file, workdir) or failed
    if failed:
        raise SystemExit("bench: some requests failed (errors column)")


if __name__ == "__main__":
    main()
