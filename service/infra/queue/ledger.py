"""The subscription ledger and the reconciliation markers, kept in Redis next to the work queue.

Per Subscription (keys.py `subscription:<ref>`): the highest event number seen (FHIR R4 Subscriptions
Backport IG, "eventsSinceSubscriptionStart": a gap means missed notifications), when it was last
heard from (an event, a heartbeat or a $status query), the status the server reported (and since when
it has been `requested`), and its kind.
The heartbeat watchdog walks the set of tracked Subscriptions. The reconciliation sweep keeps the
_lastUpdated lower bound of its next run, and a marker that one sweep is queued.

A mixin of WorkQueue (work.py), which provides `settings`, `redis`, `send`, `_redis` and the
registered `_advance` script.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import redis

from service.core.errors import QueueUnavailable
from service.infra.queue.keys import (RECONCILE_PENDING, RECONCILE_SINCE, SUBSCRIPTIONS, TASK_RECONCILE,
                                      subscription_key)


@dataclass(frozen=True)
class SubscriptionState:
    highest: int | None  # highest event number seen; None: never heard of it
    last_event_at: str | None
    status: str | None
    kind: str | None
    last_seen_at: str | None
    requested_since: str | None = None  # status `requested` since then (see record_subscription_status)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _status_fields(pipe: redis.client.Pipeline, key: str, status: str, requested_since: str | None) -> None:
    """Status, and since when it has been `requested`: the server's meta.lastUpdated when it gives
    one, else the first time we saw it so (the notification script, scripts.py ADVANCE, does the same)."""
    pipe.hset(key, "status", status)
    if status != "requested":
        pipe.hdel(key, "requested_since")
    elif requested_since:
        pipe.hset(key, "requested_since", requested_since)
    else:
        pipe.hsetnx(key, "requested_since", _now())


class SubscriptionLedger:
    # ---------------- subscriptions ----------------

    def subscription_state(self, subscription: str) -> SubscriptionState:
        data = self._redis(self.redis.hgetall, subscription_key(subscription)) or {}
        highest = data.get("highest")
        return SubscriptionState(int(highest) if highest is not None else None, data.get("last_event_at"),
                                 data.get("status"), data.get("kind"), data.get("last_seen_at"),
                                 data.get("requested_since"))

    def advance_subscription(self, subscription: str, *, kind: str, status: str | None, top: int | None,
                             event: bool, after: redis.client.Pipeline | None = None) -> None:
        """Record a notification: highest event number (never lowered), when it was heard from,
        the status the server reported. Called after the work is queued (see the route)."""
        keys = [subscription_key(subscription), SUBSCRIPTIONS]
        args = [top if top is not None else -1, _now(), "last_event_at" if event else f"last_{kind}_at",
                status or "", subscription]
        if after is not None:
            self._advance(keys=keys, args=args, client=after)
        else:
            self._redis(self._advance, keys=keys, args=args)

    def track_subscription(self, subscription: str, *, kind: str, status: str | None = None,
                           reset: bool = False, requested_since: str | None = None) -> None:
        """`spinewatch subscribe` registers what it created, so the watchdog looks after it. A new
        backport Subscription starts at event 0 (reset), so event 1 is not mistaken for a first
        contact. `last_seen_at` is set only the first time: the watchdog's fallback sweep starts
        there, so running `subscribe` again must not move it on."""
        key = subscription_key(subscription)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, "kind", kind)
        pipe.hsetnx(key, "last_seen_at", _now())
        if status:
            _status_fields(pipe, key, status, requested_since)
        if reset:
            pipe.hsetnx(key, "highest", 0)
        pipe.sadd(SUBSCRIPTIONS, subscription)
        self._redis(pipe.execute)

    def untrack_subscription(self, subscription: str) -> None:
        self._redis(self.redis.srem, SUBSCRIPTIONS, subscription)

    def tracked_subscriptions(self) -> list[str]:
        return sorted(self._redis(self.redis.smembers, SUBSCRIPTIONS) or [])

    def record_subscription_status(self, subscription: str, status: str, *, requested_since: str | None = None,
                                   **fields) -> None:
        """The status the server reports, with other fields (e.g. last_seen_at)."""
        key = subscription_key(subscription)
        pipe = self.redis.pipeline(transaction=False)
        if fields:
            pipe.hset(key, mapping=fields)
        _status_fields(pipe, key, status, requested_since)
        self._redis(pipe.execute)

    def set_subscription_fields(self, subscription: str, **fields) -> None:
        self._redis(self.redis.hset, subscription_key(subscription),
                    mapping={k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in fields.items()})

    # ---------------- reconciliation ----------------

    def reconcile_since(self) -> str | None:
        return self._redis(self.redis.get, RECONCILE_SINCE)

    def set_reconcile_since(self, instant: str) -> None:
        self._redis(self.redis.set, RECONCILE_SINCE, instant)

    def request_reconcile(self, reason: str) -> str:
        """One sweep at a time is enough: a ping while one is queued adds nothing."""
        if not self._redis(self.redis.set, RECONCILE_PENDING, reason, nx=True,
                           ex=max(60, int(self.settings.coalesce_seconds) + 60)):
            return "coalesced"
        try:
            self.send(TASK_RECONCILE, kwargs={"reason": reason}, countdown=self.settings.coalesce_seconds)
        except QueueUnavailable:
            try:
                self.redis.delete(RECONCILE_PENDING)
            except redis.RedisError:
                pass
            raise
        return "queued"

    def reconcile_started(self) -> None:
        self._redis(self.redis.delete, RECONCILE_PENDING)
