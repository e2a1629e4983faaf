"""The work queue, by job: keys.py (names and TTLs), scripts.py (the atomic Lua steps), celery.py
(the one Celery configuration), work.py (sending, de-duplication, per-patient coalescing, pending
recovery) and ledger.py (subscription event numbers, reconciliation markers).

The names other modules import are re-exported here.
"""

from service.core.errors import QueueUnavailable
from service.infra.queue.celery import celery_config, producer
from service.infra.queue.keys import (GAP_GRACE_SECONDS, PREFIX, QUEUE, STALE_PENDING_SECONDS, TASK_CATCH_UP,
                                      TASK_EVALUATE, TASK_RECONCILE, TASK_RESOLVE, TASK_WATCHDOG)
from service.infra.queue.ledger import SubscriptionState
from service.infra.queue.work import Claim, WorkQueue, redis_client

__all__ = ["GAP_GRACE_SECONDS", "PREFIX", "QUEUE", "STALE_PENDING_SECONDS", "TASK_CATCH_UP", "TASK_EVALUATE",
           "TASK_RECONCILE", "TASK_RESOLVE", "TASK_WATCHDOG", "Claim", "QueueUnavailable", "SubscriptionState",
           "WorkQueue", "celery_config", "producer", "redis_client"]
