"""The one place Redis clients are made (sync and asyncio), so every client has bounded timeouts:
when Redis is down a caller must hear so quickly (a notifier gets 503, a hook card goes without its
evidence link), never hang.

Timeouts by use, in seconds: the work queue 2 (QUEUE_TIMEOUT), the hook path's stores 0.5-1 (a
hook call has a budget of about 1.5 s), readiness checks their own setting. `decode_responses` only
where the caller reads strings (the queue's bookkeeping).

Every Redis URL setting may also name a Redis Sentinel group instead of one server:

    redis+sentinel://[:password@]host1:26379,host2:26379,host3:26379/<master name>[/<db>]

A client for it asks the sentinels for the current primary (redis-py `Sentinel.master_for`, which
asks again whenever a connection to it fails), so a failover moves every client to the promoted
replica without a restart (Redis docs "High availability with Redis Sentinel"). The password is the
primary's (`requirepass`); the sentinels themselves are reached without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

import redis
import redis.asyncio as redis_asyncio
import redis.asyncio.sentinel as redis_asyncio_sentinel
import redis.sentinel as redis_sentinel

QUEUE_TIMEOUT = 2.0
SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelGroup:
    """A `redis+sentinel://` URL, parsed: where the sentinels are and which primary they watch."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    password: str | None = None

    def url(self) -> str:
        """Back to the `redis+sentinel://` URL (sentinel_group parses it to this group again)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"{SENTINEL_SCHEME}{auth}{hosts}/{self.master}/{self.db}"

    def kombu_url(self) -> str:
        """The same group as kombu's Redis Sentinel transport spells it: one `sentinel://` URL per
        sentinel, `;`-separated (the master name goes in broker_transport_options["master_name"])."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def sentinel_group(url: str) -> SentinelGroup:
    """Parse a `redis+sentinel://` URL; ValueError saying what is wrong (no secret in it)."""
    if not is_sentinel_url(url):
        raise ValueError(f"not a {SENTINEL_SCHEME} URL")
    netloc, _, path = url.removeprefix(SENTINEL_SCHEME).partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    password = unquote(userinfo.partition(":")[2]) or None
    sentinels = tuple(_host_port(h) for h in hosts.split(",") if h.strip())
    master, _, db = path.strip("/").partition("/")
    if not sentinels:
        raise ValueError("a redis+sentinel:// URL needs at least one sentinel host:port")
    if not master:
        raise ValueError("a redis+sentinel:// URL needs the master name: redis+sentinel://host:26379/<master>/<db>")
    if db and not db.isdigit():
        raise ValueError("the database after the master name must be a number")
    return SentinelGroup(sentinels, master, int(db or 0), password)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError("each sentinel must be host or host:port")
    return host, int(port or SENTINEL_PORT)


class _SentinelMaster(redis.Redis):
    """The primary's client. Closing it closes its connections to the sentinels too: a caller that
    makes a client per use (a readiness check) would otherwise leave one open each time."""

    def close(self) -> None:
        super().close()
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            sentinel.close()


class _AsyncSentinelMaster(redis_asyncio.Redis):
    """As _SentinelMaster, for asyncio."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def redis_client(url: str, timeout: float = QUEUE_TIMEOUT, *, connect_timeout: float | None = None,
                 decode_responses: bool = False, health_check_interval: int = 0) -> redis.Redis:
    """A synchronous client for `url` (redis://, rediss://, unix:// or redis+sentinel://)."""
    options = {"socket_timeout": timeout,
               "socket_connect_timeout": timeout if connect_timeout is None else connect_timeout,
               "decode_responses": decode_responses, "health_check_interval": health_check_interval}
    if is_sentinel_url(url):
        group = sentinel_group(url)
        sentinels = redis_sentinel.Sentinel(list(group.sentinels), sentinel_kwargs=_sentinel_options(options))
        return sentinels.master_for(group.master, _SentinelMaster, db=group.db, password=group.password, **options)
    return redis.Redis.from_url(url, **options)


def async_redis_client(url: str, timeout: float = QUEUE_TIMEOUT, *,
                       connect_timeout: float | None = None) -> redis_asyncio.Redis:
    """An asyncio client for `url`: one per event loop (a client is bound to the loop it first ran on)."""
    options = {"socket_timeout": timeout,
               "socket_connect_timeout": timeout if connect_timeout is None else connect_timeout}
    if is_sentinel_url(url):
        group = sentinel_group(url)
        sentinels = redis_asyncio_sentinel.Sentinel(list(group.sentinels), sentinel_kwargs=dict(options))
        return sentinels.master_for(group.master, _AsyncSentinelMaster, db=group.db, password=group.password,
                                    **options)
    return redis_asyncio.from_url(url, **options)


def _sentinel_options(options: dict) -> dict:
    """The sentinels are asked with the same timeouts; they answer plain RESP (no decoding)."""
    return {k: v for k, v in options.items() if k.startswith("socket_")}
