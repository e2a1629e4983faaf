"""Per-patient coalescing under concurrency, on a real Redis (service/infra/queue/work.py, scripts.py).

Two notifications for one patient in the same millisecond: the second finds the first's marker
still "claimed" (its task not yet sent). It must coalesce into that evaluation however long the
first takes to send, not queue a second one after a fixed wait."""

from __future__ import annotations

import base64
import collections
import json
import threading

import pytest
import redis

from service.core.settings import Settings
from service.infra.queue import WorkQueue
from service.infra.queue.keys import PENDING_DUE, pending_key

pytestmark = pytest.mark.integration
FROZEN_MS = 1_700_000_000_000  # every call in the same millisecond


class FrozenClock:
    def __call__(self) -> float:
        return FROZEN_MS / 1000


def _settings(redis_url: str) -> Settings:
    return Settings(environment="test", redis_url=redis_url, coalesce_seconds=0.5)


def _queue(settings: Settings) -> WorkQueue:
    q = WorkQueue(settings)
    q.clock = FrozenClock()  # ignored where the queue reads no clock
    return q


def _evaluations(r: redis.Redis) -> collections.Counter:
    per: collections.Counter = collections.Counter()
    for raw in r.lrange("celery", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] == "spinewatch.evaluate_patient":
            per[json.loads(base64.b64decode(message["body"]))[1]["patient"]] += 1
    return per


def _notify(q: WorkQueue, patient: str, number: int) -> None:
    """What service/usecases/intake.py does for one event."""
    keys, focus = [f"event:Subscription/s1:{number}"], [f"Condition/c{number}"]
    claim = q.claim(keys, patient, focus)
    assert claim.state == "new"
    after = q.pipeline()
    q.schedule_evaluation(patient, focus, {"event": number}, reserved=claim, after=after)
    q.confirm(keys, after=after)
    q.execute(after)


def test_same_millisecond_pairs_queue_one_evaluation_each(redis_url):
    settings = _settings(redis_url)
    first, second = _queue(settings), _queue(settings)
    pairs = 150
    for i in range(pairs):
        barrier = threading.Barrier(2)

        def go(q, n, patient=f"Patient/p{i}"):
            barrier.wait()
            _notify(q, patient, n)

        threads = [threading.Thread(target=go, args=(q, 2 * i + k)) for k, q in enumerate((first, second))]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
    per = _evaluations(redis.Redis.from_url(redis_url))
    assert len(per) == pairs and set(per.values()) == {1}, {p: n for p, n in per.items() if n != 1}


def test_a_slow_first_sender_still_absorbs_the_second_event(redis_url):
    """The first delivery claimed the patient, then is slow to send its task (a loaded API, a
    broker round trip): the second, in the same millisecond, must coalesce rather than give up
    waiting and queue its own."""
    settings = _settings(redis_url)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    slow, fast = _queue(settings), _queue(settings)
    send = slow.send
    pairs = 25
    for i in range(pairs):
        patient = f"Patient/s{i}"
        second_done = threading.Event()

        def delayed_send(*args, **kwargs):
            second_done.wait(2)  # the second delivery runs to its end before the first sends
            return send(*args, **kwargs)

        slow.send = delayed_send
        first = threading.Thread(target=_notify, args=(slow, patient, 2 * i))
        first.start()
        while not r.exists(pending_key(patient)):  # the first has claimed the patient
            pass
        _notify(fast, patient, 2 * i + 1)
        second_done.set()
        first.join(10)
        assert r.get(pending_key(patient)) == "queued"
        assert r.smembers(f"spinewatch:pending-focus:{patient}") == {f"Condition/c{2 * i}", f"Condition/c{2 * i + 1}"}
    per = _evaluations(r)
    assert len(per) == pairs and set(per.values()) == {1}, {p: n for p, n in per.items() if n != 1}
    assert r.zcard(PENDING_DUE) == pairs


def test_a_first_sender_that_fails_leaves_the_absorbed_event_to_recovery(redis_url):
    """The first delivery's send fails after a second event coalesced into it: the second was
    answered 200, so its evaluation must not be lost; recover_pending sends it."""
    from service.core.errors import QueueUnavailable

    settings = _settings(redis_url)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    failing, fast = _queue(settings), _queue(settings)
    patient = "Patient/f1"
    claim = failing.claim(["event:Subscription/s1:1"], patient, ["Condition/c1"])
    _notify(fast, patient, 2)  # coalesces into the first's claim

    def refuse(*_a, **_k):
        raise QueueUnavailable("cannot queue: ConnectionError")

    failing.send = refuse
    with pytest.raises(QueueUnavailable):
        failing.schedule_evaluation(patient, ["Condition/c1"], {}, reserved=claim)
    assert _evaluations(r) == collections.Counter()
    assert fast.recover_pending(late_seconds=-3600) == [patient]  # what the watchdog does once it is late
    assert _evaluations(r) == {patient: 1}
    assert fast.recover_pending(late_seconds=-3600) == [patient], "sent, not started: still owed (broker loss)"
    fast.take_pending(patient)
    assert fast.recover_pending(late_seconds=-3600) == []


def test_a_first_sender_that_fails_alone_leaves_nothing_behind(redis_url):
    from service.core.errors import QueueUnavailable

    settings = _settings(redis_url)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    failing = _queue(settings)
    patient = "Patient/f2"
    claim = failing.claim(["event:Subscription/s1:1"], patient, ["Condition/c1"])

    def refuse(*_a, **_k):
        raise QueueUnavailable("cannot queue: ConnectionError")

    failing.send = refuse
    with pytest.raises(QueueUnavailable):
        failing.schedule_evaluation(patient, ["Condition/c1"], {}, reserved=claim)
    assert not r.exists(pending_key(patient)) and r.zcard(PENDING_DUE) == 0
