"""The work queue: Celery on Redis, addressed by task name, plus the Redis bookkeeping that makes
"at least once, maybe never" delivery safe: de-duplication and per-patient coalescing here, the
subscription ledger and reconciliation markers in ledger.py (keys and TTLs: keys.py; the atomic
steps: scripts.py).

The service never imports the workers' task modules; it sends by name. The workers use the same
class to schedule follow-up work.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
import structlog
from celery import Celery
from kombu.exceptions import OperationalError

from service.core.errors import QueueUnavailable
from service.core.settings import Settings
from service.infra.queue import scripts
from service.infra.queue.celery import producer
from service.infra.queue.keys import (CLAIM_SECONDS, PENDING_DUE, PENDING_SECONDS, QUEUE,
                                      STALE_PENDING_SECONDS, TASK_EVALUATE, dedup_key, focus_key, pending_key)
from service.infra.queue.ledger import SubscriptionLedger
from service.infra.redis import redis_client as make_redis_client

log = structlog.get_logger("spinewatch.queue")


def redis_client(url: str, timeout: float = 2.0) -> redis.Redis:
    """The queue's client: strings in and out (service/infra/redis.py sets the timeouts)."""
    return make_redis_client(url, timeout, decode_responses=True, health_check_interval=30)


@dataclass(frozen=True)
class Claim:
    state: str  # new | duplicate | busy
    pending: str | None = None  # the patient's evaluation: claimed | coalesced (None: not asked)
    token: str | None = None


class WorkQueue(SubscriptionLedger):
    def __init__(self, settings: Settings, redis_conn: redis.Redis | None = None, celery_app: Celery | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock  # seconds since the epoch: due times in the pending-due index (tests freeze it)
        self.redis = redis_conn or redis_client(settings.redis_url)
        self.celery = celery_app or producer(settings)
        self._claim = self.redis.register_script(scripts.CLAIM)
        self._pending_queued = self.redis.register_script(scripts.PENDING_QUEUED)
        self._pending_release = self.redis.register_script(scripts.PENDING_RELEASE)
        self._pending_recover = self.redis.register_script(scripts.PENDING_RECOVER)
        self._advance = self.redis.register_script(scripts.ADVANCE)

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

    def depth(self) -> int:
        return int(self._redis(self.redis.llen, QUEUE))

    # ---------------- de-duplication ----------------

    def claim(self, keys: tuple[str, ...] | list[str], patient: str | None = None,
              focus: tuple[str, ...] | list[str] = ()) -> Claim:
        """Claim an event's dedup keys: "new" (queue the work, then confirm or release),
        "duplicate" or "busy". With `patient`, a new event also reserves the patient's evaluation
        in the same round trip (see schedule_evaluation)."""
        return self._claim_call(keys, patient, focus, uuid.uuid4().hex if patient else "")

    def _claim_call(self, keys, patient: str | None, focus, token: str) -> Claim:
        dedup = [dedup_key(k) for k in keys]
        extra = [pending_key(patient), focus_key(patient), PENDING_DUE] if patient else []
        state, pending = self._redis(self._claim, keys=dedup + extra,
                                     args=[len(dedup), CLAIM_SECONDS, self.settings.dedup_ttl_seconds, token,
                                           PENDING_SECONDS, self._due_ms(), patient or "", *(focus if patient else ())])
        return Claim(state, pending or None, token or None)

    def confirm(self, keys, after: redis.client.Pipeline | None = None) -> None:
        if keys:
            pipe = after if after is not None else self.redis.pipeline(transaction=False)
            for k in keys:
                pipe.set(dedup_key(k), "queued", ex=self.settings.dedup_ttl_seconds)
            if after is None:
                self._redis(pipe.execute)

    def release(self, keys) -> None:
        """Best effort: when Redis is down the claims expire by themselves (CLAIM_SECONDS)."""
        if keys:
            try:
                self.redis.delete(*[dedup_key(k) for k in keys])
            except redis.RedisError:
                pass

    def seen(self, key: str) -> bool:
        return bool(self._redis(self.redis.exists, dedup_key(key)))

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
        if state is None:
            state = self._claim_call((), patient, focus, token).pending
        # Another delivery's claim (its task not sent yet) is joined like a queued task: no waiting,
        # no second evaluation; if that delivery then fails, the joined evaluation is recovered
        # (scripts.py CLAIM, PENDING_RELEASE).
        if state == "coalesced":
            return "coalesced"
        marker = pending_key(patient)
        try:
            self.send(TASK_EVALUATE, kwargs={"patient": patient, "focus": list(focus), "trigger": trigger or {}},
                      countdown=self.settings.coalesce_seconds)
        except QueueUnavailable:
            if state == "claimed":
                try:
                    self._pending_release(keys=[marker, PENDING_DUE], args=[token, PENDING_SECONDS, patient])
                except redis.RedisError:
                    pass  # in the pending-due index already: recover_pending sends it if others joined
            raise
        if state == "claimed":
            keys, args = [marker, PENDING_DUE], [token, PENDING_SECONDS, self._due_ms(), patient]
            if after is not None:
                self._pending_queued(keys=keys, args=args, client=after)
            else:
                self._redis(self._pending_queued, keys=keys, args=args)
        return "queued"

    def _due_ms(self) -> int:
        return int((self.clock() + self.settings.coalesce_seconds) * 1000)

    def recover_pending(self, late_seconds: float = STALE_PENDING_SECONDS) -> list[str]:
        """Evaluations queued more than `late_seconds` past their due time and still not started:
        send them again. kombu's Redis transport can lose a message (a worker killed, or Redis
        crashing, while BRPOP hands it over; bench/soak.py shows it), and the patient's "queued"
        marker would then swallow every later event for PENDING_SECONDS. A task that was only late
        (a long queue) is evaluated twice, which is harmless; a lost one is not."""
        cutoff = int((self.clock() - late_seconds) * 1000)
        recovered = []
        for patient in self._redis(self.redis.zrangebyscore, PENDING_DUE, "-inf", cutoff) or []:
            # Owed: "queued" (sent, maybe lost) or "joined" (its claimer failed after others coalesced
            # into it). Marked "queued" with a new due time first: a failed send is found next time.
            if not self._redis(self._pending_recover, keys=[pending_key(patient), PENDING_DUE],
                               args=[PENDING_SECONDS, self._due_ms(), patient]):
                continue  # started meanwhile, or a dead claim nobody relied on
            focus = sorted(self._redis(self.redis.smembers, focus_key(patient)) or [])
            self.send(TASK_EVALUATE, kwargs={"patient": patient, "focus": focus,
                                             "trigger": {"kind": "recovery", "source": "pending"}})
            recovered.append(patient)
        if recovered:
            log.warning("queue.pending_recovered", patients=len(recovered))
        return recovered

    def release_reservation(self, patient: str, claim: Claim) -> None:
        """Best effort, after a failed request: a marker still "claimed" by it goes (deleting a marker
        never loses an event: the next one queues a new evaluation); one others joined meanwhile is
        left to recover_pending (scripts.py PENDING_RELEASE)."""
        if claim.pending == "claimed" and claim.token:
            try:
                self._pending_release(keys=[pending_key(patient), PENDING_DUE],
                                      args=[claim.token, PENDING_SECONDS, patient])
            except redis.RedisError:
                pass

    def take_pending(self, patient: str) -> list[str]:
        """Called by the evaluation as it starts: from now on, new events queue a new evaluation.
        Returns the focus references of the events it absorbed."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.smembers(focus_key(patient))
        pipe.delete(focus_key(patient), pending_key(patient))
        pipe.zrem(PENDING_DUE, patient)
        members = self._redis(pipe.execute)[0]
        return sorted(members or [])

    # ---------------- plumbing ----------------

    @staticmethod
    def _redis(call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except redis.RedisError as exc:
            raise QueueUnavailable(f"Redis: {type(exc).__name__}") from None
