"""Redis Sentinel: the redis+sentinel:// URL every Redis setting accepts (service/infra/redis.py), what
the Celery configuration makes of it (service/infra/queue/celery.py), and real clients, sync and
asyncio, following a real failover (tests/support/sentinel_servers.py)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from pydantic import ValidationError

from service.core.settings import Settings
from service.infra.queue.celery import celery_config
from service.infra.redis import (SentinelGroup as Group, async_redis_client, is_sentinel_url, redis_client,
                                 sentinel_group)
from tests.support.sentinel_servers import SentinelGroup, group  # noqa: F401 - group: the fixture

URL = "redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2,10.0.0.3:26380/mymaster/2"


# ---------------------------------------------------------------- the URL


def test_a_sentinel_url_names_the_sentinels_the_master_the_db_and_the_password():
    assert sentinel_group(URL) == Group(sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)),
                                        master="mymaster", db=2, password="s@cret")


def test_the_db_defaults_to_0_and_the_password_to_none():
    assert sentinel_group("redis+sentinel://h:1/m") == Group(sentinels=(("h", 1),), master="m", db=0, password=None)


@pytest.mark.parametrize("url, says", [
    ("redis+sentinel:///mymaster/0", "at least one sentinel"),
    ("redis+sentinel://h1:26379", "master name"),
    ("redis+sentinel://h1:26379/", "master name"),
    ("redis+sentinel://h1:26379/m/zero", "must be a number"),
    ("redis+sentinel://h1:port/m", "host or host:port"),
    ("redis://h1:6379/0", "not a redis+sentinel:// URL"),
])
def test_a_malformed_sentinel_url_is_refused_saying_why(url, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        sentinel_group(url)


def test_kombu_gets_one_sentinel_url_per_sentinel_with_the_db_and_password():
    assert sentinel_group(URL).kombu_url() == ("sentinel://:s%40cret@10.0.0.1:26379/2;"
                                               "sentinel://:s%40cret@10.0.0.2:26379/2;"
                                               "sentinel://:s%40cret@10.0.0.3:26380/2")


def test_a_group_gives_back_its_url():
    group = sentinel_group(URL)
    assert sentinel_group(group.url()) == group


@pytest.mark.parametrize("field", ["redis_url", "cds_jti_redis_url", "evidence_link_redis_url"])
def test_every_redis_setting_accepts_a_sentinel_url(field):
    assert getattr(Settings(environment="test", **{field: URL}), field) == URL


def test_kombus_own_sentinel_spelling_is_refused_naming_ours():
    with pytest.raises(ValidationError, match=r"redis\+sentinel://host1:26379"):
        Settings(environment="test", redis_url="sentinel://h1:26379;sentinel://h2:26379")


# ---------------------------------------------------------------- Celery


@pytest.mark.parametrize("worker", [False, True])
def test_celery_uses_kombus_sentinel_transport_with_the_master_name(worker):
    config = celery_config(Settings(environment="test", redis_url=URL), worker=worker)
    assert config["broker_url"] == sentinel_group(URL).kombu_url()
    assert config["broker_transport_options"]["master_name"] == "mymaster"
    assert config["broker_transport_options"]["visibility_timeout"] == 900


def test_a_plain_redis_url_goes_to_celery_unchanged_without_sentinel_options():
    config = celery_config(Settings(environment="test", redis_url="redis://r:6379/1"), worker=True)
    assert config["broker_url"] == "redis://r:6379/1"
    assert "master_name" not in config["broker_transport_options"]


def test_the_worker_app_uses_the_sentinel_variant_of_its_broker_transport():
    from workers.celery_app import create_celery_app

    sentinel_app = create_celery_app(Settings(environment="test", redis_url=URL))
    plain_app = create_celery_app(Settings(environment="test", redis_url="redis://r:6379/1"))
    assert sentinel_app.conf.broker_transport == "workers.broker:SentinelTransport"
    assert plain_app.conf.broker_transport == "workers.broker:Transport"
    assert sentinel_app.conf.broker_url == sentinel_group(URL).kombu_url()


def test_plain_urls_are_not_sentinel_urls():
    assert not is_sentinel_url("redis://h:6379/0") and not is_sentinel_url("rediss://h:6379/0")


# ---------------------------------------------------------------- real processes


@pytest.mark.integration
def test_sync_and_asyncio_clients_follow_a_failover_to_the_promoted_replica(group):
    sync = redis_client(group.url, 0.5, decode_responses=True)
    sync.set("before", "kept")
    assert sync.wait(1, 1000) == 1  # replicated before the kill: a kill loses unreplicated writes
    old = group.kill_primary()
    started = time.monotonic()

    def write_after_failover():
        while time.monotonic() - started < 15:
            try:
                return sync.set("after", "written")
            except Exception:  # noqa: BLE001 - redis ConnectionError/TimeoutError while no primary exists
                time.sleep(0.2)
        return False

    assert write_after_failover(), "no write succeeded within 15 s of the kill"
    assert group.master_port() not in (None, old)
    assert sync.get("before") == "kept"

    async def read_async():
        client = async_redis_client(group.url, 0.5)
        try:
            return await client.get("after")
        finally:
            await client.aclose()

    assert asyncio.run(read_async()) == b"written"


def _sentinel_clients(group: SentinelGroup) -> int:
    import redis

    client = redis.Redis(port=group.sentinel_ports[0])
    try:
        return client.info("clients")["connected_clients"]
    finally:
        client.close()


@pytest.mark.integration
def test_closing_a_client_closes_its_connections_to_the_sentinels_too(group):
    """/readyz and the metrics scrape make a client per call: each must leave no sentinel connection."""
    async def use_and_close():
        client = async_redis_client(group.url, 0.5)
        await client.ping()
        await client.aclose()

    def sync_use_and_close():
        client = redis_client(group.url, 0.5)
        client.ping()
        client.close()

    before = _sentinel_clients(group)
    for _ in range(5):
        asyncio.run(use_and_close())
        sync_use_and_close()
    time.sleep(0.2)  # the sentinel notices a closed socket on its next event loop turn
    assert _sentinel_clients(group) <= before + 1


@pytest.mark.integration
def test_the_workers_broker_channel_reconnects_through_the_same_sentinel_group(group):
    """The URL of workers/broker.py's own connections (its restore after a failover) names the
    same group as SPINEWATCH_REDIS_URL, password and db included."""
    from kombu import Connection

    url = group.url.replace("/0", "/3").replace("redis+sentinel://", "redis+sentinel://:pw@")
    config = celery_config(Settings(environment="test", redis_url=url), worker=True)
    connection = Connection(config["broker_url"], transport="workers.broker:SentinelTransport",
                            transport_options=config["broker_transport_options"])
    try:
        assert sentinel_group(connection.default_channel._spinewatch_broker_url) == sentinel_group(url)
    finally:
        connection.release()
