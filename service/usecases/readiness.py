"""Readiness checks and the queue-depth gauge, for /readyz and /metrics.

A check is an async callable that returns on success (optionally a dict of details shown with the
result, e.g. a warning) and raises on failure. `default_checks` builds the standard ones from the
settings (Redis, the audit store, the FHIR server). Failure reasons are short error class names:
URLs may carry passwords, so they are never echoed; a NotReady says its own (safe) reason.

The Redis check also asks whether Redis keeps what it is given (service/infra/queue/durability.py:
appendonly, maxmemory-policy): in production one that does not is not ready, with the reason;
elsewhere ready, with a warning in the detail.

The Subscriptions check never fails: a Subscription that sends nothing leaves the CDS Hooks path
working, so the API stays in the load balancer; the detail says it is degraded and why.

The configuration check never fails either: it shows the last configuration problem a worker met
(service/infra/config_problems.py: a FHIR interaction the token's scopes do not allow, a refused
token) as a warning with the scope it needed; the API itself is not affected by it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from service.core.metrics import QUEUE_DEPTH, SUBSCRIPTIONS
from service.core.settings import Settings
from service.infra import config_problems
from service.infra.fhir.subscriptions import delivery_problem, parse_instant
from service.infra.queue import QUEUE
from service.infra.queue.durability import aread_durability
from service.infra.queue.keys import SUBSCRIPTIONS as TRACKED_SUBSCRIPTIONS, subscription_key
from service.infra.redis import async_redis_client

Check = Callable[[], Awaitable[Any]]


class NotReady(Exception):
    """A check's failure whose message is a safe reason to show (no URL, no secret)."""


def redis_check(url: str, timeout: float, require_durable: bool = False) -> Check:
    """PING, then persistence and eviction: not durable is a failure where `require_durable`
    (production), a warning otherwise; what Redis would not say is reported as unknown."""
    async def check() -> dict:
        client = async_redis_client(url, timeout)
        try:
            await client.ping()
            durability = await aread_durability(client)
        finally:
            await client.aclose()
        if durability.problems and require_durable:
            raise NotReady("; ".join(durability.problems))
        detail = {"durability": durability.summary}
        if durability.problems:
            detail["warning"] = "; ".join(durability.problems)
        return detail
    return check


def fhir_check(base_url: str, timeout: float) -> Check:
    """The FHIR server answers GET [base]/metadata (FHIR R4 §3.1.0.12, capabilities: no auth needed).
    Any answer below 500 proves it is reachable; a 5xx means it is not serving."""
    async def check() -> None:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.get(f"{base_url.rstrip('/')}/metadata", headers={"Accept": "application/fhir+json"})
        if r.status_code >= 500:
            raise RuntimeError(f"HTTP {r.status_code}")
    return check


def audit_store_check(url: str) -> Check:
    """The audit store's database accepts a connection and `SELECT 1` (through the store's own engine,
    which picks the driver for the URL)."""
    def ping() -> None:
        from sqlalchemy import text

        from service.infra.audit.store import store_for

        with store_for(url).engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def check() -> None:
        await asyncio.to_thread(ping)
    return check


async def subscription_states(client) -> dict[str, dict[str, str]]:
    """The watched Subscriptions' ledger hashes (service/infra/queue/ledger.py), by reference."""
    refs = sorted(r.decode() for r in await client.smembers(TRACKED_SUBSCRIPTIONS))
    pipe = client.pipeline(transaction=False)
    for ref in refs:
        pipe.hgetall(subscription_key(ref))
    hashes = await pipe.execute()
    return {ref: {k.decode(): v.decode() for k, v in h.items()} for ref, h in zip(refs, hashes)}


def subscriptions_check(url: str, timeout: float, grace_seconds: int) -> Check:
    """Each watched Subscription as last seen: one that sends no notifications (error, off,
    `requested` past the grace period) is a warning and `degraded`, never a failure."""
    async def check() -> dict:
        client = async_redis_client(url, timeout)
        try:
            states = await subscription_states(client)
        except Exception as exc:  # Redis down: the redis check fails; this one only cannot tell
            return {"warning": f"Subscription states unknown ({type(exc).__name__})"}
        finally:
            await client.aclose()
        now, grace = datetime.now(timezone.utc), timedelta(seconds=grace_seconds)
        problems = [f"{ref}: {problem}" for ref, state in states.items()
                    if (problem := delivery_problem(state.get("status") or None,
                                                    parse_instant(state.get("requested_since")), now, grace))]
        if not states:
            problems.append("none registered: no notifications will arrive; run `spinewatch subscribe`")
        detail: dict = {"by_status": dict(Counter(state.get("status") or "unknown" for state in states.values()))}
        if problems:
            detail |= {"degraded": True, "warning": "; ".join(problems)}
        return detail
    return check


def configuration_check(url: str, timeout: float) -> Check:
    """The last configuration problem recorded by any worker (kept in Redis for a day), if any."""
    async def check() -> dict:
        client = async_redis_client(url, timeout)
        try:
            problem = await config_problems.alast(client)
        except Exception as exc:  # Redis down: the redis check fails; this one only cannot tell
            return {"warning": f"last configuration problem unknown ({type(exc).__name__})"}
        finally:
            await client.aclose()
        return {"last_problem": problem, "warning": problem["message"]} if problem else {}
    return check


def default_checks(settings: Settings) -> dict[str, Check]:
    """Redis (and the Subscriptions it tracks), audit store and FHIR server, each only when it is
    configured (and the audit log on)."""
    timeout = settings.readiness_timeout_seconds
    checks: dict[str, Check] = {}
    if settings.redis_url:
        checks["redis"] = redis_check(settings.redis_url, timeout,
                                      require_durable=settings.environment == "production")
        checks["subscriptions"] = subscriptions_check(settings.redis_url, timeout,
                                                      settings.subscription_activation_grace_seconds)
        checks["configuration"] = configuration_check(settings.redis_url, timeout)
    if settings.audit_db_url and settings.audit_enabled:
        checks["audit_store"] = audit_store_check(settings.audit_db_url)
    if settings.fhir_base_url:
        checks["fhir"] = fhir_check(settings.fhir_base_url, timeout)
    return checks


async def run_checks(checks: dict[str, Check], timeout: float) -> tuple[bool, dict[str, dict]]:
    """Every check at once, each within `timeout`: (all passed, the result by name)."""
    results = await asyncio.gather(*(_run(check, timeout) for check in checks.values()))
    return all(r["ok"] for r in results), dict(zip(checks, results))


async def _run(check: Check, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check(), timeout)
        result: dict = {"ok": True} | (detail if isinstance(detail, dict) else {})
    except asyncio.TimeoutError:
        result = {"ok": False, "error": f"no answer within {timeout:g} s"}
    except NotReady as exc:
        result = {"ok": False, "error": str(exc)}
    except Exception as exc:  # any failure means unready; the class name says which kind
        result = {"ok": False, "error": type(exc).__name__}
    result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


SUBSCRIPTION_STATUSES = ("requested", "active", "error", "off", "unknown")  # R4 Subscription.status, or not known


async def refresh_queue_depth(settings: Settings) -> None:
    """Set the gauges read from Redis at scrape time: the queue depth (Celery's Redis transport
    keeps each queue as a list named after it) and the watched Subscriptions by status. Best
    effort: a scrape never fails because Redis is down."""
    if not settings.redis_url:
        return
    try:
        client = async_redis_client(settings.redis_url, settings.readiness_timeout_seconds)
        try:
            QUEUE_DEPTH.labels(queue=QUEUE).set(await client.llen(QUEUE))
            by_status = Counter(s.get("status") if s.get("status") in SUBSCRIPTION_STATUSES else "unknown"
                                for s in (await subscription_states(client)).values())
            for status in SUBSCRIPTION_STATUSES:
                SUBSCRIPTIONS.labels(status=status).set(by_status[status])
        finally:
            await client.aclose()
    except Exception:
        pass
