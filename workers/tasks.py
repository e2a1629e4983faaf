"""Celery tasks: thin shells over workers/pipeline, addressed by name (service/infra/queue/keys.py).
`shared_task` binds them to the app that runs them (workers/celery_app.py); each task takes the
worker process's collaborators from that app.

Failure handling, the same for every task:
- an error that is transient (service.core.errors.is_transient: FHIR unreachable, 5xx/429, Redis
  blip, an alert to retry) is retried with exponential backoff and jitter, up to
  SPINEWATCH_TASK_MAX_RETRIES;
- anything else, and a transient error past its last retry, lands in the dead-letter list
  (SpineWatchTask.on_failure), never silently dropped.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone

import structlog
from celery import Task, shared_task

from service.core.errors import is_transient
from service.core.metrics import DEAD_LETTERS
from service.infra.dead_letters import DeadLetters
from service.infra.queue import TASK_CATCH_UP, TASK_EVALUATE, TASK_RECONCILE, TASK_RESOLVE, TASK_WATCHDOG
from workers import pipeline

__all__ = ["BACKOFF_CAP_SECONDS", "SpineWatchTask", "backoff", "catch_up", "evaluate_patient", "heartbeat_watchdog",
           "is_transient", "reconcile", "resolve_focus"]
log = structlog.get_logger("spinewatch.tasks")
BACKOFF_CAP_SECONDS = 600.0  # well below the visibility timeout: a waiting retry is held unacknowledged


def backoff(retries: int, base: float) -> float:
    """Exponential backoff with "equal jitter": half the delay fixed, half random, so a burst of
    failures does not come back in step and each retry still waits."""
    delay = min(BACKOFF_CAP_SECONDS, base * (2 ** retries))
    return delay / 2 + random.uniform(0, delay / 2)


class SpineWatchTask(Task):
    def run_step(self, step, *args):
        c = self.app.collaborators()
        try:
            return step(c, *args)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("task.retry", error=type(exc).__name__, retries=self.request.retries)
            # Past max_retries, retry() re-raises exc: on_failure then dead-letters it.
            # An error may say when a retry can succeed (AlertRetry: the alert lock's remaining TTL).
            countdown = max(backoff(self.request.retries, c.settings.task_retry_backoff_seconds),
                            float(getattr(exc, "retry_after", 0) or 0))
            raise self.retry(exc=exc, countdown=countdown, max_retries=c.settings.task_max_retries)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        try:
            c = self.app.collaborators()
            entry = DeadLetters(c.queue.redis).push(
                task_id=task_id, task=self.name, args=args, kwargs=kwargs, error=exc, retries=self.request.retries)
        except Exception as store_error:  # Redis down as well: the log line is all that is left
            log.error("task.dead_letter_lost", error=type(exc).__name__, store_error=type(store_error).__name__)
            return
        DEAD_LETTERS.labels(task=self.name).inc()
        c.audit.event("dead-letter", "failure", actor="worker",
                      patient=kwargs.get("patient") if isinstance(kwargs, dict) else None,
                      detail={"task": self.name, "task_id": task_id, "error": entry["error"],
                              "retries": entry["retries"]})
        log.error("task.dead_letter", error=entry["error"], retries=entry["retries"])


def _now() -> datetime:
    return datetime.now(timezone.utc)  # the evaluation time, read here and passed into the pure core


@shared_task(bind=True, base=SpineWatchTask, name=TASK_EVALUATE)
def evaluate_patient(self, patient: str, focus: list[str] | None = None, trigger: dict | None = None) -> str:
    assessment = self.run_step(pipeline.evaluate_patient, patient, focus or [], trigger or {}, _now())
    return assessment.urgency


@shared_task(bind=True, base=SpineWatchTask, name=TASK_RESOLVE)
def resolve_focus(self, focus: list[str], trigger: dict | None = None) -> list[str]:
    return self.run_step(pipeline.resolve_focus, focus, trigger or {})


@shared_task(bind=True, base=SpineWatchTask, name=TASK_CATCH_UP)
def catch_up(self, subscription: str, numbers: list[int], since: str | None = None,
             only_missing: bool = False) -> dict:
    return self.run_step(pipeline.catch_up, subscription, numbers, since, only_missing, _now())


@shared_task(bind=True, base=SpineWatchTask, name=TASK_RECONCILE)
def reconcile(self, reason: str = "scheduled") -> list[str]:
    return self.run_step(pipeline.reconcile, _now(), reason)


@shared_task(bind=True, base=SpineWatchTask, name=TASK_WATCHDOG)
def heartbeat_watchdog(self) -> list[dict]:
    return self.run_step(pipeline.watchdog, _now())
