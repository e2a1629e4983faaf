"""Work queue: Celery on Redis, addressed by task name, plus the Redis bookkeeping that makes
"at least once, maybe never" delivery safe: de-duplication, per-patient coalescing and per
subscription event numbers.

The service never imports the worker's task modules (DESIGN.md); it sends by name. The workers
use the same class to schedule follow-up work.

Redis keys (prefix `spinewatch:`):
    dedup:event:Subscription/<id>:<n>   an event number seen          "claimed" | "queued"
    dedup:version:<Type>/<id>:<v>       a resource version seen       "claimed" | "queued"
    pending:Patient/<id>                an evaluation is queued and not started ("queued"), or
                                        being queued right now ("claimed:<token>")
    pending-focus:Patient/<id>          references the queued evaluation must re-read
    pending-due                         zset: patients with a queued evaluation, by due time (ms)
    subscription:Subscription/<id>      hash: highest event number, last event / heartbeat times,
                                        status, kind
    subscriptions                       set of the Subscriptions the watchdog looks after
    reconcile:since                     the _lastUpdated lower bound of the next sweep

De-duplication is two-phase: a key is "claimed" while its work is being queued and "queued" once it
is. A repeat that finds "queued" is a duplicate (200, nothing done); one that finds "claimed" is a
concurrent delivery of the same event and is told to come back (503), because the first may yet
fail; a failed enqueue deletes its claims so the server's retry is not mistaken for a duplicate.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import redis
import structlog
from celery import Celery
from kombu.exceptions import OperationalError

QUEUE = "celery"  # Celery's default queue name; /metrics reports its depth (service/api/routes/ops.py)
PREFIX = "spinewatch:"
TASK_EVALUATE = "spinewatch.evaluate_patient"
TASK_RESOLVE = "spinewatch.resolve_focus"
TASK_CATCH_UP = "spinewatch.catch_up"
TASK_RECONCILE = "spinewatch.reconcile"
TASK_WATCHDOG = "spinewatch.heartbeat_watchdog"
# Notifications arrive out of order (sekmet, like most servers, delivers from a thread pool): a
# number missing now often arrives a moment later, so recovery waits this long before it looks.
GAP_GRACE_SECONDS = 3.0
# A "claimed" key outlives a crashed request by this long at most.
CLAIM_SECONDS = 30
PENDING_SECONDS = 300
PENDING_DUE = "pending-due"  # zset: patient -> when its queued evaluation is due (ms)
STALE_PENDING_SECONDS = 60.0  # a queued evaluation this late is sent again (recover_pending)
BUSY_WAITS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0)  # ~90 ms in all

from service.infra.redis import redis_client as make_redis_client
from service.core.errors import QueueUnavailable  # noqa: F401 - re-exported
log = structlog.get_logger("spinewatch.queue")




# What must happen before a task is sent, in one round trip (one fsync under appendfsync always).
# KEYS: the dedup keys (ARGV[1] of them), then, when a patient is given, its marker and focus set.
# ARGV: n, claim ttl, dedup ttl, token ('' = no patient), pending ttl, focus refs...
# Returns {dedup state: new | duplicate | busy, the patient's marker: claimed | coalesced | busy | ''}.
_CLAIM = """
local n = tonumber(ARGV[1])
local state = 'new'
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  if v == 'queued' then state = 'duplicate'
  elseif v and state == 'new' then state = 'busy' end
end
if state == 'new' then
  for i = 1, n do redis.call('SET', KEYS[i], 'claimed', 'EX', ARGV[2]) end
elseif state == 'duplicate' then
  for i = 1, n do redis.call('SET', KEYS[i], 'queued', 'EX', ARGV[3], 'NX') end
end
if state ~= 'new' or ARGV[4] == '' then return {state, ''} end
local marker, focus = KEYS[n + 1], KEYS[n + 2]
local pending = redis.call('GET', marker)
if pending and pending ~= 'queued' then return {state, 'busy'} end
if not pending then redis.call('SET', marker, 'claimed:' .. ARGV[4], 'EX', ARGV[5]) end
if #ARGV > 5 then
  redis.call('SADD', focus, unpack(ARGV, 6))
  redis.call('EXPIRE', focus, ARGV[5])
end
if pending then return {state, 'coalesced'} end
return {state, 'claimed'}
"""

# Set the marker to "queued" only if it is still our claim: had the task already started (and
# deleted the marker), a new "queued" marker would swallow later events. The patient also goes into
# the pending-due index (KEYS[2], score: when the task is due, ms), so a task the broker lost can be
# found and sent again (recover_pending).
_PENDING_QUEUED = """
if redis.call('GET', KEYS[1]) == 'claimed:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'queued', 'EX', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

_PENDING_RELEASE = """
if redis.call('GET', KEYS[1]) == 'claimed:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: subscription hash, set of subscriptions. ARGV: highest number in this notification (-1:
# none), now, field to stamp, status ('' to keep), subscription reference.
_ADVANCE = """
local prev = redis.call('HGET', KEYS[1], 'highest')
local top = tonumber(ARGV[1])
if top >= 0 and (not prev or top > tonumber(prev)) then redis.call('HSET', KEYS[1], 'highest', top) end
redis.call('HSET', KEYS[1], 'last_seen_at', ARGV[2], ARGV[3], ARGV[2], 'kind', 'backport')
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[4]) end
redis.call('SADD', KEYS[2], ARGV[5])
return prev
"""


def redis_client(url: str, timeout: float = 2.0) -> redis.Redis:
    """The queue's client: strings in and out (service/infra/redis.py sets the timeouts)."""
    return make_redis_client(url, timeout, decode_responses=True, health_check_interval=30)


def producer(settings) -> Celery:
    """A Celery app that only sends (no task modules imported): broker and queue as the worker's."""
    app = Celery("spinewatch-producer", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_timeout=2,
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_seconds,
                                  "socket_timeout": 2, "socket_connect_timeout": 2},
    )
    return app


@dataclass(frozen=True)
class Claim:
    state: str  # new | duplicate | busy
    pending: str | None = None  # the patient's evaluation: claimed | coalesced | busy (None: not asked)
    token: str | None = None


@dataclass(frozen=True)
class SubscriptionState:
    highest: int | None  # highest event number seen; None: never heard of it
    last_event_at: str | None
    status: str | None
    kind: str | None
    last_seen_at: str | None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class WorkQueue:
    def __init__(self, settings, redis_conn: redis.Redis | None = None, celery_app: Celery | None = None):
        self.settings = settings
        self.redis = redis_conn or redis_client(settings.redis_url)
        self.celery = celery_app or producer(settings)
        self._claim = self.redis.register_script(_CLAIM)
        self._pending_queued = self.redis.register_script(_PENDING_QUEUED)
        self._pending_release = self.redis.register_script(_PENDING_RELEASE)
        self._advance = self.redis.register_script(_ADVANCE)

    # ---------------- sending ----------------

    def send(self, name: str, args: tuple | list = (), kwargs: dict | None = None,
             countdown: float | None = None) -> str:
        """Put one task on the queue by name; returns its id. QueueUnavailable if Redis refused."""
        try:
            result = self.celery.send_task(name, args=list(args), kwargs=kwargs or {}, queue=QUEUE,
                                           countdown=countdown or None, retry=False)
        except (OperationalError, redis.RedisError, OSError) as exc:
            raise QueueUnavailable(f"cannot queue {name}: {type(exc).__name__}") from None
        return result.id

    # ---------------- de-duplication ----------------

    def claim(self, keys: tuple[str, ...] | list[str], patient: str | None = None,
              focus: tuple[str, ...] | list[str] = ()) -> Claim:
        """Claim an event's dedup keys: "new" (queue the work, then confirm or release),
        "duplicate" or "busy". With `patient`, a new event also reserves the patient's evaluation
        in the same round trip (see schedule_evaluation)."""
        return self._claim_call(keys, patient, focus, uuid.uuid4().hex if patient else "")

    def _claim_call(self, keys, patient: str | None, focus, token: str) -> Claim:
        dedup = [PREFIX + "dedup:" + k for k in keys]
        extra = [PREFIX + "pending:" + patient, PREFIX + "pending-focus:" + patient] if patient else []
        state, pending = self._redis(self._claim, keys=dedup + extra,
                                     args=[len(dedup), CLAIM_SECONDS, self.settings.dedup_ttl_seconds, token,
                                           PENDING_SECONDS, *(focus if patient else ())])
        return Claim(state, pending or None, token or None)

    def confirm(self, keys, after: redis.client.Pipeline | None = None) -> None:
        if keys:
            pipe = after if after is not None else self.redis.pipeline(transaction=False)
            for k in keys:
                pipe.set(PREFIX + "dedup:" + k, "queued", ex=self.settings.dedup_ttl_seconds)
            if after is None:
                self._redis(pipe.execute)

    def release(self, keys) -> None:
        """Best effort: when Redis is down the claims expire by themselves (CLAIM_SECONDS)."""
        if keys:
            try:
                self.redis.delete(*[PREFIX + "dedup:" + k for k in keys])
            except redis.RedisError:
                pass

    def seen(self, key: str) -> bool:
        return bool(self._redis(self.redis.exists, PREFIX + "dedup:" + key))

    def mark_seen(self, keys) -> None:
        self.confirm(keys)

    def pipeline(self) -> redis.client.Pipeline:
        """Writes that follow a successful send, to go together in one round trip (`execute`)."""
        return self.redis.pipeline(transaction=False)

    def execute(self, pipe: redis.client.Pipeline) -> None:
        self._redis(pipe.execute)

    # ---------------- per-patient coalescing ----------------

    def schedule_evaluation(self, patient: str, focus: tuple[str, ...] | list[str] = (),
                            trigger: dict | None = None, *, reserved: Claim | None = None,
                            after: redis.client.Pipeline | None = None) -> str:
        """Queue an evaluation of `patient`, unless one is queued and not yet started: that one will
        read the record after this event, so it is enough ("coalesced"; the focus references are
        handed to it). The first event waits `coalesce_seconds`, so a burst is evaluated once.
        reserved: the claim() that already reserved the patient; after: a pipeline() that takes the
        last write instead of a round trip of its own."""
        token = reserved.token if reserved and reserved.token else uuid.uuid4().hex
        state = reserved.pending if reserved and reserved.pending else None
        for wait in BUSY_WAITS:
            if state is None or state == "busy":
                state = self._claim_call((), patient, focus, token).pending
            if state != "busy":
                break
            # Another delivery is queueing this patient's evaluation right now (a millisecond's
            # work): wait for it rather than queue a second one. If it stays busy (that request
            # died), queue our own: an extra evaluation is harmless, a lost one is not.
            time.sleep(wait)
        if state == "coalesced":
            return "coalesced"
        marker = PREFIX + "pending:" + patient
        try:
            self.send(TASK_EVALUATE, kwargs={"patient": patient, "focus": list(focus), "trigger": trigger or {}},
                      countdown=self.settings.coalesce_seconds)
        except QueueUnavailable:
            if state == "claimed":
                try:
                    self._pending_release(keys=[marker], args=[token])
                except redis.RedisError:
                    pass  # expires by itself; meanwhile "claimed" makes others queue their own task
            raise
        if state == "claimed":
            keys, args = [marker, PREFIX + PENDING_DUE], [token, PENDING_SECONDS, self._due_ms(), patient]
            if after is not None:
                self._pending_queued(keys=keys, args=args, client=after)
            else:
                self._redis(self._pending_queued, keys=keys, args=args)
        return "queued"

    def _due_ms(self) -> int:
        return int((time.time() + self.settings.coalesce_seconds) * 1000)

    def recover_pending(self, late_seconds: float = STALE_PENDING_SECONDS) -> list[str]:
        """Evaluations queued more than `late_seconds` past their due time and still not started:
        send them again. kombu's Redis transport can lose a message (a worker killed, or Redis
        crashing, while BRPOP hands it over: issue 7, bench/soak.py), and the patient's "queued"
        marker would then swallow every later event for PENDING_SECONDS. A task that was only late
        (a long queue) is evaluated twice, which is harmless; a lost one is not."""
        cutoff = int((time.time() - late_seconds) * 1000)
        recovered = []
        for patient in self._redis(self.redis.zrangebyscore, PREFIX + PENDING_DUE, "-inf", cutoff) or []:
            marker, focus_key = PREFIX + "pending:" + patient, PREFIX + "pending-focus:" + patient
            if self._redis(self.redis.get, marker) != "queued":
                self._redis(self.redis.zrem, PREFIX + PENDING_DUE, patient)  # started meanwhile
                continue
            focus = sorted(self._redis(self.redis.smembers, focus_key) or [])
            self.send(TASK_EVALUATE, kwargs={"patient": patient, "focus": focus,
                                             "trigger": {"kind": "recovery", "source": "pending"}})
            self._redis(self.redis.zadd, PREFIX + PENDING_DUE, {patient: self._due_ms()})
            recovered.append(patient)
        if recovered:
            log.warning("queue.pending_recovered", patients=len(recovered))
        return recovered

    def release_reservation(self, patient: str, claim: Claim) -> None:
        """Best effort, after a failed request: a marker still "claimed" by it goes (deleting a marker
        never loses an event: the next one queues a new evaluation)."""
        if claim.pending == "claimed" and claim.token:
            try:
                self._pending_release(keys=[PREFIX + "pending:" + patient], args=[claim.token])
            except redis.RedisError:
                pass

    def take_pending(self, patient: str) -> list[str]:
        """Called by the evaluation as it starts: from now on, new events queue a new evaluation.
        Returns the focus references of the events it absorbed."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.smembers(PREFIX + "pending-focus:" + patient)
        pipe.delete(PREFIX + "pending-focus:" + patient, PREFIX + "pending:" + patient)
        pipe.zrem(PREFIX + PENDING_DUE, patient)
        members = self._redis(pipe.execute)[0]
        return sorted(members or [])

    # ---------------- subscriptions ----------------

    def subscription_state(self, subscription: str) -> SubscriptionState:
        data = self._redis(self.redis.hgetall, PREFIX + "subscription:" + subscription) or {}
        highest = data.get("highest")
        return SubscriptionState(int(highest) if highest is not None else None, data.get("last_event_at"),
                                 data.get("status"), data.get("kind"), data.get("last_seen_at"))

    def advance_subscription(self, subscription: str, *, kind: str, status: str | None, top: int | None,
                             event: bool, after: redis.client.Pipeline | None = None) -> None:
        """Record a notification: highest event number (never lowered), when it was heard from,
        the status the server reported. Called after the work is queued (see the route)."""
        keys = [PREFIX + "subscription:" + subscription, PREFIX + "subscriptions"]
        args = [top if top is not None else -1, _now(), "last_event_at" if event else f"last_{kind}_at",
                status or "", subscription]
        if after is not None:
            self._advance(keys=keys, args=args, client=after)
        else:
            self._redis(self._advance, keys=keys, args=args)

    def track_subscription(self, subscription: str, *, kind: str, status: str | None = None,
                           reset: bool = False) -> None:
        """`spinewatch subscribe` registers what it created, so the watchdog looks after it. A new
        backport Subscription starts at event 0 (reset), so event 1 is not mistaken for a first
        contact."""
        key = PREFIX + "subscription:" + subscription
        fields = {"kind": kind, "last_seen_at": _now()} | ({"status": status} if status else {})
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        if reset:
            pipe.hsetnx(key, "highest", 0)
        pipe.sadd(PREFIX + "subscriptions", subscription)
        self._redis(pipe.execute)

    def untrack_subscription(self, subscription: str) -> None:
        self._redis(self.redis.srem, PREFIX + "subscriptions", subscription)

    def tracked_subscriptions(self) -> list[str]:
        return sorted(self._redis(self.redis.smembers, PREFIX + "subscriptions") or [])

    def set_subscription_fields(self, subscription: str, **fields) -> None:
        self._redis(self.redis.hset, PREFIX + "subscription:" + subscription,
                    mapping={k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in fields.items()})

    # ---------------- reconciliation ----------------

    def reconcile_since(self) -> str | None:
        return self._redis(self.redis.get, PREFIX + "reconcile:since")

    def set_reconcile_since(self, instant: str) -> None:
        self._redis(self.redis.set, PREFIX + "reconcile:since", instant)

    def request_reconcile(self, reason: str) -> str:
        """One sweep at a time is enough: a ping while one is queued adds nothing."""
        if not self._redis(self.redis.set, PREFIX + "reconcile:pending", reason, nx=True,
                           ex=max(60, int(self.settings.coalesce_seconds) + 60)):
            return "coalesced"
        try:
            self.send(TASK_RECONCILE, kwargs={"reason": reason}, countdown=self.settings.coalesce_seconds)
        except QueueUnavailable:
            try:
                self.redis.delete(PREFIX + "reconcile:pending")
            except redis.RedisError:
                pass
            raise
        return "queued"

    def reconcile_started(self) -> None:
        self._redis(self.redis.delete, PREFIX + "reconcile:pending")

    def depth(self) -> int:
        return int(self._redis(self.redis.llen, QUEUE))

    # ---------------- plumbing ----------------

    @staticmethod
    def _redis(call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except redis.RedisError as exc:
            raise QueueUnavailable(f"Redis: {type(exc).__name__}") from None
