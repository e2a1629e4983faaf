"""The one place Redis clients are made (sync and asyncio), so every client has bounded timeouts:
when Redis is down a caller must hear so quickly (a notifier gets 503, a hook card goes without its
evidence link), never hang.

Timeouts by use, in seconds: the work queue 2 (QUEUE_TIMEOUT), the hook path's stores 0.5-1 (a
hook call has a budget of about 1.5 s), readiness checks their own setting. `decode_responses` only
where the caller reads strings (the queue's bookkeeping).
"""

from __future__ import annotations

import redis
import redis.asyncio as redis_asyncio

QUEUE_TIMEOUT = 2.0


def redis_client(url: str, timeout: float = QUEUE_TIMEOUT, *, connect_timeout: float | None = None,
                 decode_responses: bool = False, health_check_interval: int = 0) -> redis.Redis:
    """A synchronous client for `url` (redis:// or rediss://)."""
    return redis.Redis.from_url(url, socket_timeout=timeout,
                                socket_connect_timeout=timeout if connect_timeout is None else connect_timeout,
                                decode_responses=decode_responses, health_check_interval=health_check_interval)


def async_redis_client(url: str, timeout: float = QUEUE_TIMEOUT, *,
                       connect_timeout: float | None = None) -> redis_asyncio.Redis:
    """An asyncio client for `url`: one per event loop (a client is bound to the loop it first ran on)."""
    return redis_asyncio.from_url(url, socket_timeout=timeout,
                                  socket_connect_timeout=timeout if connect_timeout is None else connect_timeout)
