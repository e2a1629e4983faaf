"""Whether Redis keeps the queue (service/infra/queue/durability.py), on a real redis-server of the
test's own: the readiness check (service/usecases/readiness.py) and the worker's start-up check
(workers/celery_app.py check_redis_durability)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import redis

from service.core.settings import Settings
from service.infra.queue.durability import read_durability
from service.usecases.readiness import default_checks, redis_check, run_checks
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis():
    """A redis-server of this test's own: its configuration is changed here."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is required for integration tests")
    with RedisServer() as server:
        yield server


def configure(url: str, **config: str) -> None:
    client = redis.Redis.from_url(url)
    for name, value in config.items():
        client.config_set(name.replace("_", "-"), value)
    client.close()


def readiness(url: str, production: bool) -> dict:
    ok, results = asyncio.run(run_checks({"redis": redis_check(url, 2.0, require_durable=production)}, 2.0))
    assert ok == results["redis"]["ok"]
    return results["redis"]


def worker_check(url: str, environment: str) -> str | None:
    from workers.celery_app import check_redis_durability

    return check_redis_durability(Settings(environment="test", redis_url=url).model_copy(
        update={"environment": environment}))  # production's secrets are beside the point here


def test_the_test_and_demo_redis_is_durable(own_redis):
    durability = read_durability(redis.Redis.from_url(own_redis.url))
    assert durability.durable and durability.appendonly == "yes" and durability.policy == "noeviction"
    result = readiness(own_redis.url, production=True)
    assert result["ok"] and "warning" not in result and "appendonly yes" in result["durability"]
    assert worker_check(own_redis.url, "production") is None


@pytest.mark.parametrize("config, words", [
    ({"appendonly": "no"}, "appendonly no (and no RDB save points)"),
    ({"appendonly": "no", "save": "900 1"}, "appendonly no (RDB snapshots only)"),
    ({"maxmemory_policy": "allkeys-lru"}, "maxmemory-policy allkeys-lru"),
])
def test_without_persistence_or_with_eviction_production_refuses_and_elsewhere_warns(own_redis, config, words):
    configure(own_redis.url, **config)
    unready = readiness(own_redis.url, production=True)
    assert unready["ok"] is False and words in unready["error"]
    ready = readiness(own_redis.url, production=False)
    assert ready["ok"] is True and words in ready["warning"]
    refused = worker_check(own_redis.url, "production")
    assert refused and "\n" not in refused and words in refused
    assert worker_check(own_redis.url, "development") is None and worker_check(own_redis.url, "test") is None


def test_default_checks_require_durability_in_production_only(own_redis):
    configure(own_redis.url, appendonly="no")
    base = Settings(environment="test", redis_url=own_redis.url, readiness_timeout_seconds=2.0)
    for environment, ready in (("production", False), ("development", True), ("test", True)):
        checks = {"redis": default_checks(base.model_copy(update={"environment": environment}))["redis"]}
        assert asyncio.run(run_checks(checks, 2.0))[0] is ready, environment


def test_config_forbidden_falls_back_to_info_then_says_unknown(own_redis):
    admin = redis.Redis.from_url(own_redis.url)
    admin.execute_command("ACL", "SETUSER", "noconfig", "on", ">pw", "~*", "&*", "+@all", "-config")
    admin.execute_command("ACL", "SETUSER", "blind", "on", ">pw", "~*", "&*", "+@all", "-config", "-info")
    base = own_redis.url.replace("redis://", "redis://{user}:pw@")

    via_info = read_durability(redis.Redis.from_url(base.format(user="noconfig")))
    assert via_info.source == "info" and via_info.appendonly == "yes" and via_info.policy == "noeviction"
    admin.config_set("maxmemory-policy", "volatile-lru")
    result = readiness(base.format(user="noconfig"), production=True)
    assert result["ok"] is False and "maxmemory-policy volatile-lru" in result["error"]

    blind = read_durability(redis.Redis.from_url(base.format(user="blind")))
    assert blind.source == "none" and blind.appendonly == "unknown" and blind.durable
    result = readiness(base.format(user="blind"), production=True)
    assert result["ok"] is True and "unknown" in result["durability"]  # managed Redis: say so, not guess
    assert worker_check(base.format(user="blind"), "production") is None


def test_redis_down_is_a_warning_at_worker_start_not_a_refusal(own_redis):
    url = own_redis.url
    own_redis.stop()
    assert worker_check(url, "production") is None
    assert readiness(url, production=True)["ok"] is False  # unreachable: not ready, as before
