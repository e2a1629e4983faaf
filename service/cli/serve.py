"""`spinewatch serve [--host H] [--port P] [--workers N]`: the FastAPI service (CDS Hooks, notifications,
audit) under uvicorn.

HTTP limits (docs/operations.md): uvicorn's h11 protocol is chosen explicitly, as it is the one that
bounds the bytes of a request's line and headers (SPINEWATCH_HTTP_MAX_HEADER_BYTES via
h11_max_incomplete_event_size; httptools, which `auto` would pick, has no such bound); idle
keep-alive connections close after SPINEWATCH_HTTP_KEEP_ALIVE_SECONDS. uvicorn has no timeout for
reading the headers: production runs behind a proxy that has one (nginx `client_header_timeout`).

Workers: one Python process serves one core (the GIL), so `--workers N` runs N uvicorn worker
processes on the one port. What must hold across them is shared or refused: a CDS client's JWT may be
used once (CDS Hooks 2.0 "Trusting CDS Clients": jti), so N > 1 needs the Redis replay cache
(SPINEWATCH_CDS_JTI_REDIS_URL); the in-memory one would let a JWT replay on another worker. /metrics
sums every worker (prometheus_client multiprocess mode, one file per worker in a folder made here).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Annotated

import typer

from service.cli.check_config import settings_or_exit

METRICS_DIR_PREFIX = "spinewatch-api-metrics-"


def uvicorn_options(settings) -> dict:
    """The uvicorn options every `spinewatch serve` runs with (the Dockerfile's CMD says the same)."""
    return {"http": "h11", "h11_max_incomplete_event_size": settings.http_max_header_bytes,
            "timeout_keep_alive": settings.http_keep_alive_seconds}


def workers_refusal(settings, workers: int) -> str | None:
    """Why these settings cannot run `workers` processes, or None."""
    if workers > 1 and not settings.cds_jti_redis_url:
        return (f"--workers {workers} needs SPINEWATCH_CDS_JTI_REDIS_URL: the in-memory JWT replay cache is per "
                "process, so a JWT refused by one worker would be accepted by another")
    return None


def share_metrics_between_workers() -> None:
    """Point prometheus_client, in every worker to come, at one folder (multiprocess mode: a file per
    process, summed at scrape time), removed when serve exits. It must be set before a worker first
    imports prometheus_client: the workers are spawned after this, and inherit the environment."""
    folder = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def serve(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0: all)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes (more than 1 needs "
                                              "SPINEWATCH_CDS_JTI_REDIS_URL)", min=1, max=64)] = 1,
) -> None:
    """Serve the API with uvicorn (settings: SPINEWATCH_* environment variables)."""
    import uvicorn

    settings = settings_or_exit()  # invalid settings: one line each and exit 2, before the port is bound
    refusal = workers_refusal(settings, workers)
    if refusal:
        typer.echo(f"spinewatch: {refusal}", err=True)
        raise typer.Exit(2)
    if workers > 1:
        share_metrics_between_workers()
    # proxy_headers stays at uvicorn's default (trust only 127.0.0.1); behind another proxy set
    # SPINEWATCH_PUBLIC_BASE_URL so the CDS Hooks JWT `aud` check uses the external URL.
    uvicorn.run("service.api.app:create_app", factory=True, host=host, port=port, log_config=None,
                workers=workers, **uvicorn_options(settings))
