"""The Celery app of `spinewatch worker` (also `celery -A workers.celery_app worker`).

Delivery guarantees, each a Celery setting (Celery docs "Tasks" › acks_late, "Optimizing" ›
prefetch limits, "Using Redis" › visibility timeout):

- task_acks_late: a task is acknowledged after it ran, so a worker that dies mid-task leaves it on
  the queue for another (tasks are idempotent: re-running one does no harm);
- task_reject_on_worker_lost: a child process killed mid-task (OOM, SIGKILL) requeues its task
  instead of acknowledging it;
- worker_prefetch_multiplier 1: a worker holds one task per process, so a busy or dying worker does
  not sit on others' work;
- time limits below the broker's visibility timeout: Redis redelivers a task that is not
  acknowledged within the visibility timeout, so a task must be over (or killed) well before, or
  it would run twice at once;
- results are not stored: the outcome of a task is the stored assessment.

Retries (jittered exponential backoff, transient errors only) and the dead-letter list live in
workers/tasks.py. Celery beat runs the heartbeat watchdog and the reconciliation sweep.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery
from celery.signals import worker_process_init

from service.core.logging import configure_logging
from service.infra.queue import QUEUE, TASK_RECONCILE, TASK_WATCHDOG
from service.core.settings import Settings, get_settings



# Task ids in every log line of a task.

def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


def _unbind_task(**_: Any) -> None:
    structlog.contextvars.unbind_contextvars("task_id", "task")


def connect_celery_signals(settings: Any = None) -> None:
    """Call once where the Celery app is made: task ids in every log line of a task, and Celery's own
    logging set up by configure_logging instead of Celery's (which is not JSON and not guarded)."""
    from celery import signals

    def _setup_logging(**_: Any) -> None:
        configure_logging(settings)

    signals.setup_logging.connect(_setup_logging, weak=False)
    signals.task_prerun.connect(_bind_task, weak=False)
    signals.task_postrun.connect(_unbind_task, weak=False)


def make_celery(settings: Settings) -> Celery:
    hard = settings.task_time_limit_seconds
    if hard >= settings.broker_visibility_timeout_seconds:
        raise ValueError("SPINEWATCH_TASK_TIME_LIMIT_SECONDS must be below SPINEWATCH_BROKER_VISIBILITY_TIMEOUT_SECONDS "
                         "(else Redis redelivers a task that is still running)")
    app = Celery("spinewatch", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard,
        # The soft limit raises inside the task, which then lands in the dead-letter list; the hard
        # limit kills the process, which acknowledges the task without any handler running.
        task_soft_time_limit=max(1, int(hard * 0.8)),
        # A task held by a worker that died (SIGKILL, OOM, lost host) is restored by kombu's periodic
        # sweep once older than the visibility timeout. The sweep runs every unacked_restore_interval
        # (10 s) but kombu 5.7 scans only every unacked_restore_throttle-th time (default 10, i.e.
        # every 100 s): scan every time, so the task is back within visibility timeout + 10 s
        # (tests/integration/test_faults.py).
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_seconds,
                                  "unacked_restore_throttle": 1},
        # kombu's Redis transport with a restore that survives a Redis restart (workers/broker.py):
        # unpatched, the worker exits when Redis restarts while it holds unacknowledged tasks.
        broker_transport="workers.broker:Transport",
        broker_connection_retry_on_startup=True,
        # With acks_late, a task running when the broker connection drops will be redelivered:
        # cancel it rather than let two copies run (Celery 5.x, worker_cancel_long_running_tasks_on_connection_loss).
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
        # Beat keeps its schedule in memory: no schedule file in the working directory.
        beat_scheduler="celery.beat:Scheduler",
        beat_schedule=beat_schedule(settings),
    )
    connect_celery_signals(settings)
    worker_process_init.connect(_warm_up, weak=False)
    return app


def _warm_up(**_):
    # Compile the clinical vocabulary once per worker process, before its first task.
    from fhir_mappings.clinical.terminology import load_terminology

    load_terminology()


def beat_schedule(settings: Settings) -> dict:
    watchdog_every = max(1.0, settings.heartbeat_watchdog_seconds / 2)
    schedule = {
        "heartbeat-watchdog": {"task": TASK_WATCHDOG, "schedule": watchdog_every,
                               # a run that waited longer than its period is stale: the next one is due
                               "options": {"expires": watchdog_every}},
    }
    if settings.reconciliation_interval_seconds > 0:
        every = float(settings.reconciliation_interval_seconds)
        schedule["reconciliation-sweep"] = {"task": TASK_RECONCILE, "schedule": every,
                                            "kwargs": {"reason": "scheduled"}, "options": {"expires": every}}
    return schedule


app = make_celery(get_settings())
