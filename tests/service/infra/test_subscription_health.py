"""What /readyz and /metrics say about the watched Subscriptions, read from the ledger in a real
redis-server: one that sends nothing makes the service degraded (a warning), never unready, and the
gauge counts them by status."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta, timezone

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.ops import register_check
from service.core.settings import Settings
from service.infra.queue import WorkQueue
from service.usecases.readiness import subscriptions_check

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(redis_url, tmp_path):
    return Settings(environment="test", redis_url=redis_url, readiness_timeout_seconds=2.0,
                    subscription_activation_grace_seconds=600, audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")


@pytest.fixture
def queue(settings):
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield WorkQueue(settings, client)
    client.close()


def ago(**kw) -> str:
    return (datetime.now(timezone.utc) - timedelta(**kw)).isoformat()


def check(settings) -> dict:
    return asyncio.run(subscriptions_check(settings.redis_url, 2.0, settings.subscription_activation_grace_seconds)())


def test_all_active_is_healthy(settings, queue):
    queue.track_subscription("Subscription/a", kind="classic", status="active")
    queue.track_subscription("Subscription/b", kind="backport", status="active")
    assert check(settings) == {"by_status": {"active": 2}}


def test_stuck_or_broken_subscriptions_are_a_warning_each(settings, queue):
    queue.track_subscription("Subscription/ok", kind="classic", status="active")
    queue.track_subscription("Subscription/new", kind="classic", status="requested", requested_since=ago(minutes=1))
    queue.track_subscription("Subscription/stuck", kind="classic", status="requested", requested_since=ago(hours=1))
    queue.track_subscription("Subscription/broken", kind="backport", status="error")
    detail = check(settings)
    assert detail["by_status"] == {"active": 1, "requested": 2, "error": 1} and detail["degraded"] is True
    warnings = detail["warning"].split("; Subscription/")
    assert [w.split(":")[0].removeprefix("Subscription/") for w in warnings] == ["broken", "stuck"]
    assert "no notifications will arrive" in warnings[1] and "`requested` for 60 min" in warnings[1]


def test_nothing_registered_is_said(settings):
    detail = check(settings)
    assert detail["degraded"] is True and detail["warning"].startswith("none registered: no notifications")


def test_redis_down_is_the_redis_checks_failure_not_this_ones():
    detail = asyncio.run(subscriptions_check("redis://127.0.0.1:1/0", 0.5, 600)())
    assert detail == {"warning": "Subscription states unknown (ConnectionError)"}


def test_readyz_stays_ready_but_degraded_and_metrics_count_by_status(settings, queue):
    queue.track_subscription("Subscription/ok", kind="classic", status="active")
    queue.track_subscription("Subscription/broken", kind="classic", status="error")
    app = create_app(settings)
    register_check(app, "fhir", None)  # no FHIR server here
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready", r.text  # still in the load balancer
        sub = r.json()["checks"]["subscriptions"]
        assert sub["ok"] is True and sub["degraded"] is True
        assert sub["warning"].startswith("Subscription/broken: the server put it in `error`")

        text = client.get("/metrics").text
    counts = dict(re.findall(r'^spinewatch_subscriptions\{status="(\w+)"\} (\S+)$', text, re.M))
    assert counts == {"requested": "0.0", "active": "1.0", "error": "1.0", "off": "0.0", "unknown": "0.0"}
