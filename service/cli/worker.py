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
    from service.cli.check_config import settings_or_exit

    settings = settings_or_exit()  # invalid settings: one line each and exit 2, as serve and check-config
    metrics_dir = _serve_worker_metrics(settings) if settings.worker_metrics_port else None
    try:
        from workers.celery_app import check_redis_durability, create_celery_app

        if (refused := check_redis_durability(settings)):  # production: Redis must keep the queue
            fail(refused)
        argv = ["worker", f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]
        if concurrency:
            argv.append(f"--concurrency={concurrency}")
        if beat:
            argv.append("--beat")
        create_celery_app(settings).worker_main(argv)
    finally:  # Celery's warm shutdown (SIGTERM, Ctrl-C) ends here too; SIGKILL: the next start sweeps it
        if metrics_dir:
            _remove_metrics_dir(metrics_dir)


METRICS_DIR_PREFIX = "spinewatch-worker-metrics-"


def _remove_metrics_dir(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _sweep_stale_metrics_dirs() -> None:
    """Folders of this user's earlier workers that died without cleaning up (SIGKILL, OOM): the
    folder name carries the worker's pid; a pid that no longer runs left it behind."""
    import os
    import tempfile
    from pathlib import Path

    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"):
        pid = path.name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove_metrics_dir(str(path))
        except OSError:  # alive under another user, or gone meanwhile
            continue


def _serve_worker_metrics(settings) -> str:
    """Serve the counters of every worker process on one port. Celery's prefork children count
    evaluations, alerts and dead letters in their own memory, so prometheus_client's multiprocess
    mode (one mmap file per process in PROMETHEUS_MULTIPROC_DIR, summed at scrape time) is the way
    to see them; it must be chosen before prometheus_client is first imported. Returns the folder,
    which the worker removes at exit (an atexit hook too, for exits that skip `worker`'s finally)."""
    import atexit
    import os
    import sys
    import tempfile

    if "prometheus_client" in sys.modules:  # too late to switch modes: say so rather than serve zeros
        fail("worker metrics: prometheus_client was imported before the worker set up multiprocess mode")
    _sweep_stale_metrics_dirs()
    folder = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    owner = os.getpid()
    # Forked pool children inherit atexit hooks: only the process that made the folder removes it.
    atexit.register(lambda: os.getpid() == owner and _remove_metrics_dir(folder))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry)
    except OSError as exc:
        fail(f"worker metrics: cannot listen on {settings.worker_metrics_host}:{settings.worker_metrics_port} "
              f"({exc.strerror})")
    return folder
