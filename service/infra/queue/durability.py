"""Whether Redis keeps what the queue gives it: queued evaluations (the broker's lists), the claims
and pending markers live only in Redis, so a Redis that forgets on restart, or evicts under memory
pressure, loses notifications that were answered 200 (docs/resilience.md).

Read with CONFIG GET (appendonly, save, maxmemory-policy); where CONFIG is refused (managed Redis
often renames or forbids it) with INFO persistence / INFO memory (aof_enabled, maxmemory_policy);
what neither tells is "unknown", never a guess.

    appendonly no          a restart loses the writes since the last RDB snapshot (all of them
                           without `save` points): not durable
    maxmemory-policy != noeviction   under memory pressure Redis deletes keys, queued tasks among
                           them: not durable

Who acts on it: the worker refuses to start in production (workers/celery_app.py
check_redis_durability), and /readyz is unready there (service/usecases/readiness.py); elsewhere
(the demo, tests, a laptop) both warn and carry on.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Durability:
    appendonly: str = UNKNOWN  # yes | no | unknown
    save: str = UNKNOWN        # the RDB save points ("" none) | unknown
    policy: str = UNKNOWN      # maxmemory-policy | unknown
    source: str = "config"     # config | info | none (neither could be read)

    @property
    def problems(self) -> list[str]:
        found = []
        if self.appendonly == "no":
            rdb = "and no RDB save points" if self.save == "" else \
                "RDB snapshots only" if self.save != UNKNOWN else "RDB unknown"
            found.append(f"appendonly no ({rdb}): a Redis restart loses queued evaluations")
        if self.policy not in (UNKNOWN, "noeviction"):
            found.append(f"maxmemory-policy {self.policy}: Redis may evict queued evaluations "
                         f"(set noeviction)")
        return found

    @property
    def durable(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        return (f"appendonly {self.appendonly}, save {self.save if self.save else 'none'}, "
                f"maxmemory-policy {self.policy}" + ("" if self.source == "config" else f" (from {self.source})"))


def from_config(config: dict) -> Durability:
    def get(name: str) -> str:
        value = config.get(name, config.get(name.encode(), None))
        if value is None:
            return UNKNOWN
        return (value.decode() if isinstance(value, bytes) else str(value)).strip()
    return Durability(appendonly=get("appendonly"), save=get("save"), policy=get("maxmemory-policy"))


def from_info(persistence: dict | None, memory: dict | None) -> Durability:
    aof = (persistence or {}).get("aof_enabled")
    policy = (memory or {}).get("maxmemory_policy")
    if aof is None and policy is None:
        return Durability(source="none")
    return Durability(appendonly=UNKNOWN if aof is None else ("yes" if str(aof) == "1" else "no"),
                      policy=UNKNOWN if policy is None else (policy.decode() if isinstance(policy, bytes) else str(policy)),
                      source="info")


def _refused(exc: Exception) -> bool:
    """CONFIG or INFO refused (unknown/renamed command, ACL NOPERM), not Redis being down."""
    return isinstance(exc, redis.ResponseError)


def read_durability(client: redis.Redis) -> Durability:
    """What `client`'s Redis says about persistence and eviction. Redis down: its ConnectionError."""
    try:
        config = {}
        for name in ("appendonly", "save", "maxmemory-policy"):
            config.update(client.config_get(name))
        return from_config(config)
    except redis.RedisError as exc:
        if not _refused(exc):
            raise
    return from_info(_info(client, "persistence"), _info(client, "memory"))


def _info(client: redis.Redis, section: str) -> dict | None:
    try:
        return client.info(section)
    except redis.ResponseError:
        return None


async def aread_durability(client) -> Durability:
    """The same with a redis.asyncio client (readiness)."""
    try:
        config = {}
        for name in ("appendonly", "save", "maxmemory-policy"):
            config.update(await client.config_get(name))
        return from_config(config)
    except redis.RedisError as exc:
        if not _refused(exc):
            raise

    async def info(section: str) -> dict | None:
        try:
            return await client.info(section)
        except redis.ResponseError:
            return None
    return from_info(await info("persistence"), await info("memory"))
