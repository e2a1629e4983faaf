"""What the audit log adds to CDS Hooks patient-view latency: audit on versus off, A/B on one server.

bench/hooks.py runs the whole service once per setting, so two runs minutes apart on a busy machine
differ by more than the audit log costs. Here one server (built by bench/hooks.py, same JWTs, same
20-entry prefetch, same load generator) serves alternating rounds with the audit log switched on and
off between them (a new `AuditLog` on the app's services each round), in the order on-off-off-on-on-off..., so drift in the
machine's load falls on both sides alike. Reported: the median over rounds of p50/p95/p99 and
throughput for each setting, and the p95 ratio. Aim (issue 5): audit adds <= 5 % to patient-view p95.

    python bench/audit_overhead.py [--requests 2000] [--concurrency 16] [--rounds 6] [--db sqlite|URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per round")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per setting (alternating)")
    parser.add_argument("--db", default="sqlite", help="'sqlite' (a temporary file) or an audit database URL")
    args = parser.parse_args()

    from bench import hooks  # importable by name: its load generator runs in a spawned process
    from service.infra.audit.store import store_for
    from service.infra.audit.writer import AuditLog
    from tests.support.cds_hooks import Issuer, hook_request, prefetch_for, record

    issuer = Issuer(hooks.ISSUER, alg="ES384")
    body = hooks.json.dumps(hook_request("patient-view", "bench-patient",
                                         prefetch_for(record("emergency", "bench-patient", vitals=16)))).encode()
    results: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="spinewatch-audit-bench-") as tmp:
        app = hooks.build_app(Path(tmp), issuer, audit=True)
        timer = hooks.ServerTimer(app) if hasattr(hooks, "ServerTimer") else None  # in-app latency, when offered
        services = app.state.services
        on = services.settings if args.db == "sqlite" else services.settings.model_copy(update={"audit_db_url": args.db})
        off = on.model_copy(update={"audit_enabled": False})
        port = hooks.free_port()
        base = f"http://127.0.0.1:{port}"
        url = base + hooks.PATIENT_VIEW_PATH
        server, thread = hooks.start_server(timer or app, port)

        def measure(signed: list[str]) -> dict:
            return hooks.measure(*((url, signed, body, args.concurrency) + ((timer,) if timer else ())))

        def tokens(n: int) -> list[str]:
            return [issuer.token(url, jti=str(uuid.uuid4())) for _ in range(n)]

        try:
            services.audit = AuditLog(on, background=True)
            measure(tokens(args.warmup))
            before = store_for(on.audit_db_url).head()[0]
            order = ["on", "off", "off", "on"] * ((args.rounds + 1) // 2)
            for mode in order[: 2 * args.rounds]:
                services.audit = AuditLog(on if mode == "on" else off, background=True)  # as create_app does
                signed = tokens(args.requests)  # signing is not the server's work: before the clock
                cpu = time.process_time()
                result = measure(signed)
                services.audit.flush()  # the round's background audit writes finish inside the round
                result["cpu_ms"] = (time.process_time() - cpu) * 1000 / args.requests
                results[mode].append(result)
            services.audit.flush()
            written = store_for(on.audit_db_url).head()[0] - before
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"patient-view, audit log on ({'SQLite file' if args.db == 'sqlite' else 'given URL'}) versus off, "
          f"one server; {args.concurrency} concurrent clients; {args.requests} requests a round; "
          f"{args.rounds} rounds each, alternating; medians over rounds")
    for mode in ("on", "off"):
        for r in results[mode]:
            r["app_p95"] = r["server"][1] if "server" in r else float("nan")
    print(f"{'audit':<8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>10}{'app p95 ms':>12}{'CPU ms/req':>12}"
          f"{'errors':>8}")
    for mode in ("on", "off"):
        errors = sum(r["errors"] for r in results[mode])
        print(f"{mode:<8}{median(mode, 'p50'):9.2f}{median(mode, 'p95'):9.2f}{median(mode, 'p99'):9.2f}"
              f"{median(mode, 'rps'):10.0f}{median(mode, 'app_p95'):12.2f}{median(mode, 'cpu_ms'):12.3f}{errors:8d}")
    print("per round p95 (on / off): " + "  ".join(
        f"{a['p95']:.0f}/{b['p95']:.0f}" for a, b in zip(results["on"], results["off"])))
    ratio = median("on", "p95") / median("off", "p95")
    print(f"audit records written during the 'on' rounds: {written} "
          f"(expected {args.rounds * args.requests}: one `card` record a request)")
    print(f"p95 with audit / without: {ratio:.3f}  ({(ratio - 1) * 100:+.1f} %; aim <= +5 %); in-app p95: "
          f"{median('on', 'app_p95') / median('off', 'app_p95'):.3f}")
    print(f"throughput with audit / without: {median('on', 'rps') / median('off', 'rps'):.3f}; server CPU a request "
          f"with / without: {median('on', 'cpu_ms') / median('off', 'cpu_ms'):.3f}")
    if any(r["errors"] for runs in results.values() for r in runs):
        raise SystemExit("bench: some requests failed")


if __name__ == "__main__":
    main()
