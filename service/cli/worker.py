"""`spinewatch worker`: a Celery worker that evaluates patients as notifications arrive (with beat:
the heartbeat watchdog and the reconciliation sweep), and its metrics port."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from service.cli.common import fail


def worker(
    concurrency: Annotated[Optional[int], typer.Option(help="worker processes (default: one per CPU)")] = None,
    beat: Annotated[bool, typer.Option(help="also run Celery beat (heartbeat watchdog, reconciliation sweep); "
                                            "exactly one worker of a deployment should")] = True,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run a Celery worker that evaluates patients as notifications arrive."""
    from service.core.settings import get_settings

    settings = get_settings()
    if settings.worker_metrics_port:
        _serve_worker_metrics(settings)
    from workers.celery_app import create_celery_app

    argv = ["worker", f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if beat:
        argv.append("--beat")
    create_celery_app(settings).worker_main(argv)


def _serve_worker_metrics(settings) -> None:
    """Serve the counters of every worker process on one port. Celery's prefork children count
    evaluations, alerts and dead letters in their own memory, so prometheus_client's multiprocess
    mode (one mmap file per process in PROMETHEUS_MULTIPROC_DIR, summed at scrape time) is the way
    to see them; it must be chosen before prometheus_client is first imported."""
    import os
    import sys
    import tempfile

    if "prometheus_client" in sys.modules:  # too late to switch modes: say so rather than serve zeros
        fail("worker metrics: prometheus_client was imported before the worker set up multiprocess mode")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="spinewatch-worker-metrics-")
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry)
    except OSError as exc:
        fail(f"worker metrics: cannot listen on {settings.worker_metrics_host}:{settings.worker_metrics_port} "
              f"({exc.strerror})")
