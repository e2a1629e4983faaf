"""The names the queue uses: Celery's queue and task names, the Redis keys of its bookkeeping, and
how long each key lives.

Redis keys (prefix `spinewatch:`):
    dedup:event:Subscription/<id>:<n>   an event number seen          "claimed" | "queued"
    dedup:version:<Type>/<id>:<v>       a resource version seen       "claimed" | "queued"
    pending:Patient/<id>                an evaluation is queued and not started ("queued"), or
                                        being queued right now ("claimed:<token>"; "joined:<token>"
                                        once later events coalesced into it)
    pending-focus:Patient/<id>          references the queued evaluation must re-read
    pending-due                         zset: patients with a claimed or queued evaluation, by due
                                        time (ms)
    subscription:Subscription/<id>      hash: highest event number, last event / heartbeat times,
                                        status (and requested_since), kind
    subscriptions                       set of the Subscriptions the watchdog looks after
    reconcile:since                     the _lastUpdated lower bound of the next sweep
    reconcile:pending                   a reconciliation sweep is queued
"""

from __future__ import annotations

QUEUE = "celery"  # Celery's default queue name; /metrics reports its depth (service/api/routes/ops.py)
PREFIX = "spinewatch:"

# Tasks are sent by name: the service never imports the workers' task modules.
TASK_EVALUATE = "spinewatch.evaluate_patient"
TASK_RESOLVE = "spinewatch.resolve_focus"
TASK_CATCH_UP = "spinewatch.catch_up"
TASK_RECONCILE = "spinewatch.reconcile"
TASK_WATCHDOG = "spinewatch.heartbeat_watchdog"
TASK_MRI_CLOCK = "spinewatch.check_mri_clocks"  # workers/pipeline/mri_clock.py: the scheduled check of open MRI clocks
TASK_MRI_DECLINED = "spinewatch.mri_declined"  # CDS Hooks feedback: the patient declined the MRI a card recommended

# Notifications arrive out of order (sekmet, like most servers, delivers from a thread pool): a
# number missing now often arrives a moment later, so recovery waits this long before it looks.
GAP_GRACE_SECONDS = 3.0
# A "claimed" key outlives a crashed request by this long at most.
CLAIM_SECONDS = 30
PENDING_SECONDS = 300
PENDING_DUE = PREFIX + "pending-due"  # zset: patient -> when its queued evaluation is due (ms)
STALE_PENDING_SECONDS = 60.0  # a queued evaluation this late is sent again (recover_pending)

SUBSCRIPTIONS = PREFIX + "subscriptions"
RECONCILE_SINCE = PREFIX + "reconcile:since"
RECONCILE_PENDING = PREFIX + "reconcile:pending"


def dedup_key(key: str) -> str:
    return PREFIX + "dedup:" + key


def pending_key(patient: str) -> str:
    return PREFIX + "pending:" + patient


def focus_key(patient: str) -> str:
    return PREFIX + "pending-focus:" + patient


def subscription_key(subscription: str) -> str:
    return PREFIX + "subscription:" + subscription
