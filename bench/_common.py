"""What the benchmarks share: an in-process uvicorn server and latency percentiles."""

from __future__ import annotations

import statistics
import threading
import time


def start_server(app, port: int):
    """Serve `app` on 127.0.0.1:`port` in a thread of this process; returns (server, thread)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("bench: uvicorn did not start")
        time.sleep(0.02)
    return server, thread


def percentiles_ms(samples: list[float]) -> tuple[float, float, float]:
    """p50, p95, p99 in milliseconds of latencies in seconds."""
    q = statistics.quantiles(sorted(samples), n=100, method="inclusive")
    return q[49] * 1000, q[94] * 1000, q[98] * 1000
