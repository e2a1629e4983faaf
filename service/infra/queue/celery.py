"""The one Celery configuration, for both ends of the queue: the service's producer, which only
sends tasks by name, and the workers' app (workers/celery_app.py), which runs them.

Both share the broker, the queue, JSON serialization, no result backend and the broker's visibility
timeout. The producer adds short connection timeouts: a notification must hear quickly that Redis
is down (503), never hang. The workers add their delivery guarantees, each a Celery setting
(Celery docs "Tasks" > acks_late, "Optimizing" > prefetch limits, "Using Redis" > visibility timeout):

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

A `redis+sentinel://` SPINEWATCH_REDIS_URL (service/infra/redis.py) becomes kombu's Sentinel broker
URL (`sentinel://h1:26379;sentinel://h2:26379`) with `master_name` in broker_transport_options
(Celery docs "Using Redis" > Sentinel): both ends then follow the primary across a failover.
"""

from __future__ import annotations

from celery import Celery

from service.core.settings import Settings
from service.infra.queue.keys import QUEUE
from service.infra.redis import is_sentinel_url, sentinel_group

SEND_TIMEOUT_SECONDS = 2


def celery_config(settings: Settings, *, worker: bool = False) -> dict:
    """Celery settings (Celery docs "Configuration and defaults") for the producer, or with
    `worker` for the workers' app. ValueError when the task time limit is not below the broker's
    visibility timeout (Redis would redeliver a task that is still running)."""
    broker_url, transport = broker(settings.redis_url)
    shared = {
        "broker_url": broker_url,
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
    }
    transport["visibility_timeout"] = settings.broker_visibility_timeout_seconds
    if not worker:
        return shared | {
            "broker_connection_timeout": SEND_TIMEOUT_SECONDS,
            "broker_transport_options": transport | {"socket_timeout": SEND_TIMEOUT_SECONDS,
                                                     "socket_connect_timeout": SEND_TIMEOUT_SECONDS},
        }
    hard = settings.task_time_limit_seconds
    if hard >= settings.broker_visibility_timeout_seconds:
        raise ValueError("SPINEWATCH_TASK_TIME_LIMIT_SECONDS must be below SPINEWATCH_BROKER_VISIBILITY_TIMEOUT_SECONDS "
                         "(else Redis redelivers a task that is still running)")
    return shared | {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": hard,
        # The soft limit raises inside the task, which then lands in the dead-letter list; the hard
        # limit kills the process, which acknowledges the task without any handler running.
        "task_soft_time_limit": max(1, int(hard * 0.8)),
        # A task held by a worker that died (SIGKILL, OOM, lost host) is restored by kombu's periodic
        # sweep once older than the visibility timeout. The sweep runs every unacked_restore_interval
        # (10 s) but kombu 5.7 scans only every unacked_restore_throttle-th time (default 10, i.e.
        # every 100 s): scan every time, so the task is back within visibility timeout + 10 s.
        "broker_transport_options": transport | {"unacked_restore_throttle": 1},
        "broker_connection_retry_on_startup": True,
        # With acks_late, a task running when the broker connection drops will be redelivered:
        # cancel it rather than let two copies run (Celery 5.x, worker_cancel_long_running_tasks_on_connection_loss).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
        # Beat keeps its schedule in memory: no schedule file in the working directory.
        "beat_scheduler": "celery.beat:Scheduler",
    }


def broker(redis_url: str) -> tuple[str, dict]:
    """kombu's broker URL for SPINEWATCH_REDIS_URL, and the transport options it needs."""
    if not is_sentinel_url(redis_url):
        return redis_url, {}
    group = sentinel_group(redis_url)
    return group.kombu_url(), {"master_name": group.master}


def producer(settings: Settings) -> Celery:
    """A Celery app that only sends (no task modules imported): broker and queue as the worker's."""
    app = Celery("spinewatch-producer", broker=broker(settings.redis_url)[0], set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
