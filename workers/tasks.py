"""Celery tasks: thin shells over workers/pipeline, addressed by name (service/infra/queue/keys.py).
`shared_task` binds them to the app that runs them (workers/celery_app.py); each task takes the
worker process's collaborators from that app.

Failure handling, the same for every task:
- an error that is transient (service.core.errors.is_transient: FHIR unreachable, 5xx/429, Redis
  blip, an alert to retry) is retried with exponential backoff and jitter, up to
  SPINEWATCH_TASK_MAX_RETRIES;
- an error may say when a retry can succeed: its `retry_after` (seconds), the one mechanism for the
  FHIR server's Retry-After (FHIRServerError) and an alert's (AlertRetry: a held lock, a webhook's
  Retry-After). The next retry waits at least that long, however short the backoff would be, up to
  SPINEWATCH_FHIR_RETRY_AFTER_MAX_SECONDS (and below the visibility timeout): a server asking for
  120 s is asked again after 120 s, not dead-lettered after a minute of 2-4-8-16-32 s retries;
- anything else, and a transient error past its last retry, lands in the dead-letter list
  (SpineWatchTask.on_failure), never silently dropped; one that is a configuration problem (a scope
  the token lacks, a refused token: service/infra/config_problems.py) is recorded there too.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone

import structlog
from celery import Task, shared_task

from service.core.errors import SpineWatchError, is_transient
from service.core.metrics import DEAD_LETTERS
from service.infra import config_problems
from service.infra.dead_letters import DeadLetters
from service.infra.queue import TASK_CATCH_UP, TASK_EVALUATE, TASK_RECONCILE, TASK_RESOLVE, TASK_WATCHDOG
from service.infra.queue.keys import TASK_MRI_CLOCK, TASK_MRI_DECLINED
from workers import pipeline

__all__ = ["BACKOFF_CAP_SECONDS", "SpineWatchTask", "backoff", "catch_up", "check_mri_clocks", "evaluate_patient",
           "heartbeat_watchdog", "is_transient", "mri_declined", "reconcile", "resolve_focus", "retry_countdown"]
log = structlog.get_logger("spinewatch.tasks")
BACKOFF_CAP_SECONDS = 600.0  # well below the visibility timeout: a waiting retry is held unacknowledged


def retry_countdown(exc: BaseException, retries: int, settings) -> float:
    """Seconds before the next retry: the backoff, or the error's `retry_after` where that is longer,
    capped at SPINEWATCH_FHIR_RETRY_AFTER_MAX_SECONDS and below the broker visibility timeout less
    the task time limit (longer and the held retry would be redelivered as a duplicate)."""
    delay = backoff(retries, settings.task_retry_backoff_seconds)
    asked = exc.retry_after if isinstance(exc, SpineWatchError) else None
    if not isinstance(asked, (int, float)) or asked != asked or asked <= 0:  # none, or NaN
        return delay
    cap = min(float(settings.fhir_retry_after_max_seconds),
              float(settings.broker_visibility_timeout_seconds - settings.task_time_limit_seconds))
    return max(delay, min(float(asked), max(cap, 0.0)))


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
            # Past max_retries, retry() re-raises exc: on_failure then dead-letters it.
            # An error may say when a retry can succeed (retry_after: Retry-After, a held alert lock).
            countdown = retry_countdown(exc, self.request.retries, c.settings)
            log.warning("task.retry", error=type(exc).__name__, retries=self.request.retries,
                        countdown=round(countdown, 1), retry_after=exc.retry_after)  # transient: a SpineWatchError
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
        problem = config_problems.find(exc)  # e.g. a scope the token lacks: shown by /readyz and check-config
        if problem:
            config_problems.record(c.queue.redis, problem, task=self.name)
        c.audit.event("dead-letter", "failure", actor="worker",
                      patient=kwargs.get("patient") if isinstance(kwargs, dict) else None,
                      detail={"task": self.name, "task_id": task_id, "error": entry["error"],
                              "retries": entry["retries"]}
                      | ({"configuration_problem": problem.kind, "needed_scope": problem.needed_scope}
                         if problem else {}))
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


@shared_task(bind=True, base=SpineWatchTask, name=TASK_MRI_CLOCK)
def check_mri_clocks(self) -> list[str]:
    return self.run_step(pipeline.check_open_clocks, _now())


@shared_task(bind=True, base=SpineWatchTask, name=TASK_MRI_DECLINED)
def mri_declined(self, card: str, declined_at: str) -> list[str]:
    events = self.run_step(pipeline.record_declined, card, datetime.fromisoformat(declined_at), _now())
    return [e.event for e in events]
