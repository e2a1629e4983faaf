"""`spinewatch worker`, `spinewatch subscribe`, `spinewatch dead-letters list|replay`.

Registered in service/cli/main.py by `app.add_typer(...)` without a name: these become top-level
commands (and `dead-letters` a group).
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
dead_letters_app = typer.Typer(help="Tasks that failed for good: list them, or send them again.",
                               no_args_is_help=True, add_completion=False)
app.add_typer(dead_letters_app, name="dead-letters")


def _fail(message: str) -> None:
    typer.echo(f"spinewatch: {message}", err=True)
    raise typer.Exit(2)


@app.command()
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
    from workers.celery_app import app as celery_app

    argv = ["worker", f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if beat:
        argv.append("--beat")
    celery_app.worker_main(argv)


def _serve_worker_metrics(settings) -> None:
    """Serve the counters of every worker process on one port. Celery's prefork children count
    evaluations, alerts and dead letters in their own memory, so prometheus_client's multiprocess
    mode (one mmap file per process in PROMETHEUS_MULTIPROC_DIR, summed at scrape time) is the way
    to see them; it must be chosen before prometheus_client is first imported."""
    import os
    import sys
    import tempfile

    if "prometheus_client" in sys.modules:  # too late to switch modes: say so rather than serve zeros
        _fail("worker metrics: prometheus_client was imported before the worker set up multiprocess mode")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="spinewatch-worker-metrics-")
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry)
    except OSError as exc:
        _fail(f"worker metrics: cannot listen on {settings.worker_metrics_host}:{settings.worker_metrics_port} "
              f"({exc.strerror})")


@app.command()
def subscribe(
    check: Annotated[bool, typer.Option("--check", help="only report; create or change nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per Subscription")] = False,
) -> None:
    """Create (idempotently) one Subscription per type in SPINEWATCH_SUBSCRIPTION_TYPES (Condition and
    Observation by default; add DocumentReference for notes) on the FHIR server and report their
    status; re-request one the server put in error."""
    from service.infra.fhir.client import FHIRClient, FHIRError
    from service.infra.queue import QueueUnavailable, WorkQueue
    from service.core.settings import get_settings
    from service.infra.fhir.subscriptions import ensure

    from service.core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings)  # logs to stderr; stdout is the report
    try:
        with FHIRClient.from_settings(settings) as fhir:
            reports = ensure(fhir, settings, check_only=check)
    except FHIRError as exc:
        _fail(f"FHIR server {settings.fhir_base_url}: {exc.message}")
    except ValueError as exc:  # authentication settings incomplete
        _fail(str(exc))
    try:
        queue = WorkQueue(settings)
        for r in reports:
            if r.id:
                # The watchdog looks after what we created; a new backport Subscription counts events from 0.
                queue.track_subscription(f"Subscription/{r.id}", kind=r.mode, status=r.status or None,
                                         reset=r.mode == "backport" and r.action == "created")
    except QueueUnavailable as exc:
        typer.echo(f"spinewatch: warning: not registered with the watchdog ({exc})", err=True)
    for r in reports:
        if as_json:
            typer.echo(json.dumps(r.to_json()))
        else:
            error = f"  error: {r.error}" if r.error else ""
            typer.echo(f"{r.resource_type:<12} {r.mode:<9} Subscription/{r.id or '-':<12} "
                       f"{r.status or '-':<10} {r.action}  ({r.criteria}){error}")
    if any(r.action == "failed" for r in reports):
        raise typer.Exit(1)


@dead_letters_app.command("list")
def dead_letters_list(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per entry")] = False,
) -> None:
    """List the dead letters, oldest first."""
    for entry in _dead_letters().entries():
        if as_json:
            typer.echo(json.dumps(entry))
        else:
            typer.echo(f"{entry['failed_at']}  {entry['id']}  {entry['task']}  {entry['error']}: {entry['message']}"
                       f"  (retries {entry['retries']})")


@dead_letters_app.command("replay")
def dead_letters_replay(
    ids: Annotated[Optional[list[str]], typer.Argument(help="task ids to replay")] = None,
    all_: Annotated[bool, typer.Option("--all", help="replay every dead letter")] = False,
) -> None:
    """Send dead letters again by task name; each leaves the list once it is queued."""
    from service.infra.queue import QueueUnavailable, WorkQueue
    from service.core.settings import get_settings

    if not ids and not all_:
        _fail("name the task ids to replay, or pass --all")
    try:
        done = _dead_letters().replay(WorkQueue(get_settings()), None if all_ else list(ids or []))
    except QueueUnavailable as exc:
        _fail(str(exc))
    for task_id in done:
        typer.echo(f"replayed {task_id}")
    missing = set(ids or []) - set(done)
    if missing:
        _fail(f"no dead letter with id {', '.join(sorted(missing))}")


def _dead_letters():
    import redis

    from service.infra.queue import redis_client
    from service.core.settings import get_settings
    from service.infra.dead_letters import DeadLetters

    client = redis_client(get_settings().redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        _fail(f"Redis unavailable: {type(exc).__name__}")
    return DeadLetters(client)
