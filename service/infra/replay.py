"""The jti replay cache: a JWT seen once is refused again while it is valid (CDS Hooks 2.0 best
practices: "short-term storage of JWTs previously processed"). In memory for one process; in Redis
(SET NX EX, one atomic check-and-record) for several."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol

import structlog

from service.core.errors import ReplayCacheUnavailable  # noqa: F401 - re-exported
log = structlog.get_logger("spinewatch.security")



class ReplayCache(Protocol):
    async def first_use(self, key: str, ttl_seconds: int) -> bool:
        """Record `key` for `ttl_seconds`; False when it was already recorded and still live."""


class MemoryReplayCache:
    """Per process. Enough for one process; several processes need the Redis cache."""

    def __init__(self):
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0

    async def first_use(self, key: str, ttl_seconds: int) -> bool:
        now = time.monotonic()
        with self._lock:
            if now >= self._next_prune:
                self._seen = {k: until for k, until in self._seen.items() if until > now}
                self._next_prune = now + 60
            until = self._seen.get(key)
            if until is not None and until > now:
                return False
            self._seen[key] = now + ttl_seconds
            return True


class RedisReplayCache:
    """Shared by every API process: SET NX EX is one atomic check-and-record."""

    def __init__(self, url: str, prefix: str = "spinewatch:cds:jti:"):
        self._url = url
        self._prefix = prefix
        self._clients: dict[int, object] = {}  # one client per event loop (TestClient, uvicorn)

    def _client(self):
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            from service.infra.redis import async_redis_client

            client = self._clients[loop_id] = async_redis_client(self._url, 2.0)
        return client

    async def first_use(self, key: str, ttl_seconds: int) -> bool:
        try:
            return bool(await self._client().set(self._prefix + key, b"1", nx=True, ex=max(1, ttl_seconds)))
        except Exception as exc:
            log.error("cds.replay_cache_unavailable", error=type(exc).__name__)
            raise ReplayCacheUnavailable(f"the JWT replay cache is unavailable ({type(exc).__name__})") from None
