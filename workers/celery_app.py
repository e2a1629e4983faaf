"""The Celery app of `spinewatch worker` (also `celery -A workers.celery_app worker|beat|inspect`),
made by a factory: `create_celery_app(settings)`. Nothing is built at import.

`celery -A workers.celery_app` finds the app as the module's attribute `app` (celery.app.utils
find_app, Celery docs "Application"); a module-level __getattr__ (PEP 562) builds it on first
access, from the environment's settings.

The configuration is the one of service/infra/queue/celery.py (delivery guarantees explained there);
the worker adds its broker transport (workers/broker.py) and the beat schedule: Celery beat runs the
heartbeat watchdog and the reconciliation sweep. Retries and the dead-letter list live in
workers/tasks.py, whose tasks (`shared_task`, by name) bind to whichever app runs them.

Each worker process makes its own Collaborators (workers/pipeline/collaborators.py) in
worker_process_init (Celery docs "Signals"), after the prefork, so no connection is shared between
processes; the app keeps them, and the tasks take them from there (`self.app.collaborators()`). A
process without that signal (the solo pool, a task applied in-process) makes them on first use.
"""

from __future__ import annotations

import gc
from typing import Any

import structlog
from celery import Celery
from celery import signals

from fhir_mappings.clinical.extract import warm_models
from fhir_mappings.clinical.terminology import load_terminology
from service.core.logging import configure_logging
from service.core.settings import Settings, get_settings
from service.infra.queue import TASK_RECONCILE, TASK_WATCHDOG, celery_config
from service.infra.queue.keys import TASK_MRI_CLOCK
from service.infra.redis import is_sentinel_url
from workers.pipeline import Collaborators

log = structlog.get_logger("spinewatch.worker")
TASK_MODULES = ["workers.tasks"]
BROKER_TRANSPORT = "workers.broker:Transport"
SENTINEL_BROKER_TRANSPORT = "workers.broker:SentinelTransport"


class SpineWatchCelery(Celery):
    """A Celery app that keeps its worker process's collaborators."""

    settings: Settings | None = None
    _collaborators: Collaborators | None = None

    def collaborators(self) -> Collaborators:
        """This process's collaborators: made in worker_process_init, else on first use."""
        if self._collaborators is None:
            self.use_collaborators(Collaborators.from_settings(self.settings or get_settings()))
        return self._collaborators

    def use_collaborators(self, collaborators: Collaborators | None) -> None:
        """Install this process's collaborators (tests: a set of their own; None: make anew)."""
        self._collaborators = collaborators


def create_celery_app(settings: Settings | None = None) -> SpineWatchCelery:
    if settings is None:
        settings = get_settings()
    app = SpineWatchCelery("spinewatch", broker=settings.redis_url, include=TASK_MODULES)
    app.settings = settings
    app.conf.update(
        celery_config(settings, worker=True),
        # kombu's Redis transport with a restore that survives a Redis restart (workers/broker.py):
        # unpatched, the worker exits when Redis restarts while it holds unacknowledged tasks.
        broker_transport=SENTINEL_BROKER_TRANSPORT if is_sentinel_url(settings.redis_url) else BROKER_TRANSPORT,
        beat_schedule=beat_schedule(settings),
    )
    connect_celery_signals(settings)

    def start_process(**_: Any) -> None:
        # The process's own connections, after the fork (the vocabulary is already compiled: _warm_up).
        load_terminology()
        try:
            app.use_collaborators(Collaborators.from_settings(settings))
        except Exception as exc:  # noqa: BLE001 - e.g. incomplete FHIR auth settings: the first task
            # tries again and fails as a task (dead letter), rather than the pool process dying here
            log.error("worker.collaborators_failed", error=type(exc).__name__)

    signals.worker_init.connect(_warm_up, weak=False)
    signals.worker_process_init.connect(start_process, weak=False)
    return app


def _warm_up(**_: Any) -> None:
    """Compile the clinical vocabulary once, in the worker's main process before the pool forks
    (worker_init): the pool processes inherit it, and each is up at once rather than seconds later
    (a pool process that is not up within worker_proc_alive_timeout, 4 s, is killed and replaced).
    The FHIR models too: their first evaluation would otherwise import their nested classes.
    Then frozen out of the collector's sight: full collections stop rescanning them, and the forked
    pool processes stop copying the pages a collection would touch (https://docs.python.org/3/library/gc.html#gc.freeze)."""
    load_terminology()
    warm_models()
    gc.freeze()


def check_redis_durability(settings: Settings) -> str | None:
    """At worker start: does Redis keep the queue (service/infra/queue/durability.py)? In
    production, a Redis that does not (appendonly no, an evicting maxmemory-policy) is a one-line
    error to refuse to start with; elsewhere a warning. Redis unreachable or not saying: a warning
    (the worker waits for its broker as ever; /readyz reports the rest)."""
    import redis

    from service.infra.queue.durability import read_durability
    from service.infra.redis import redis_client

    client = redis_client(settings.redis_url, timeout=5.0)
    try:
        durability = read_durability(client)
    except redis.RedisError as exc:
        log.warning("worker.redis_durability_unknown", error=type(exc).__name__)
        return None
    finally:
        client.close()
    if not durability.problems:
        if durability.source != "config":
            log.warning("worker.redis_durability_unknown", durability=durability.summary)
        return None
    reason = "; ".join(durability.problems)
    if settings.environment == "production":
        return f"Redis does not keep the queue: {reason}"
    log.warning("worker.redis_not_durable", reason=reason, environment=settings.environment)
    return None


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
    if settings.mri_clock_check_interval_seconds > 0:  # docs/alerts.md, "The MRI clock"
        every = float(settings.mri_clock_check_interval_seconds)
        schedule["mri-clock-check"] = {"task": TASK_MRI_CLOCK, "schedule": every, "options": {"expires": every}}
    return schedule


# ---- task ids in every log line of a task -------------------------------------------------------

def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


def _unbind_task(**_: Any) -> None:
    structlog.contextvars.unbind_contextvars("task_id", "task")


def connect_celery_signals(settings: Settings | None = None) -> None:
    """Call once where the Celery app is made: task ids in every log line of a task, and Celery's own
    logging set up by configure_logging instead of Celery's (which is not JSON and not guarded)."""

    def _setup_logging(**_: Any) -> None:
        configure_logging(settings)

    signals.setup_logging.connect(_setup_logging, weak=False)
    signals.task_prerun.connect(_bind_task, weak=False)
    signals.task_postrun.connect(_unbind_task, weak=False)


# ---- `celery -A workers.celery_app`: the app, built on first access (PEP 562) ---------------------

_app: SpineWatchCelery | None = None


def __getattr__(name: str) -> SpineWatchCelery:
    global _app
    if name == "app":
        if _app is None:
            _app = create_celery_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
