"""Operations endpoints: /healthz (the process is alive), /readyz (its dependencies answer), /metrics.

Kubernetes-style probes: a failing /healthz means "restart me"; a failing /readyz means "send me no
traffic for now" (Redis, the audit store or the FHIR server is unreachable) and must never restart
the process, so /healthz checks nothing outside it.

Readiness checks are pluggable: `app.state.readiness_checks` maps a name to an async callable that
returns on success and raises on failure. `default_checks(settings)` builds the three standard ones
from the settings; other modules or tests can add or replace checks with `register_check`. Failure
reasons are short error class names: URLs may carry passwords, so they are never echoed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from service.core.metrics import QUEUE_DEPTH
from service.infra.redis import async_redis_client

Check = Callable[[], Awaitable[None]]

router = APIRouter(tags=["operations"])


# ---------------- checks ----------------

def redis_check(url: str, timeout: float) -> Check:
    async def check() -> None:
        client = async_redis_client(url, timeout)
        try:
            await client.ping()
        finally:
            await client.aclose()
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


def default_checks(settings: Any) -> dict[str, Check]:
    """Redis, audit store and FHIR server, each only when its setting exists (the modules that own
    those settings land separately)."""
    timeout = getattr(settings, "readiness_timeout_seconds", 2.0)
    checks: dict[str, Check] = {}
    redis_url = getattr(settings, "redis_url", None)
    if redis_url:
        checks["redis"] = redis_check(redis_url, timeout)
    audit_url = getattr(settings, "audit_db_url", None)
    if audit_url and getattr(settings, "audit_enabled", True):
        checks["audit_store"] = audit_store_check(audit_url)
    fhir_url = getattr(settings, "fhir_base_url", None)
    if fhir_url:
        checks["fhir"] = fhir_check(fhir_url, timeout)
    return checks


def register_check(app: FastAPI, name: str, check: Check | None) -> None:
    """Add or replace a readiness check (None removes it)."""
    checks = readiness_checks(app)
    if check is None:
        checks.pop(name, None)
    else:
        checks[name] = check


def readiness_checks(app: FastAPI) -> dict[str, Check]:
    if not hasattr(app.state, "readiness_checks"):
        app.state.readiness_checks = default_checks(app.state.settings)
    return app.state.readiness_checks


async def _run(check: Check, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), timeout)
        result: dict = {"ok": True}
    except asyncio.TimeoutError:
        result = {"ok": False, "error": f"no answer within {timeout:g} s"}
    except Exception as exc:  # any failure means unready; the class name says which kind
        result = {"ok": False, "error": type(exc).__name__}
    result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


# ---------------- routes ----------------

@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    checks = readiness_checks(request.app)
    timeout = getattr(request.app.state.settings, "readiness_timeout_seconds", 2.0)
    results = await asyncio.gather(*(_run(check, timeout) for check in checks.values()))
    by_name = dict(zip(checks, results))
    ready = all(r["ok"] for r in results)
    return JSONResponse({"status": "ready" if ready else "unready", "checks": by_name},
                        status_code=200 if ready else 503)


async def _refresh_queue_depth(settings: Any) -> None:
    """Set the queue-depth gauge from Redis at scrape time (Celery's Redis transport keeps each
    queue as a list named after it). Best effort: a scrape never fails because Redis is down."""
    url = getattr(settings, "redis_url", None)
    if not url:
        return
    queues = getattr(settings, "celery_queues", None) or ["celery"]
    timeout = getattr(settings, "readiness_timeout_seconds", 2.0)
    try:
        client = async_redis_client(url, timeout)
        try:
            for queue in queues:
                QUEUE_DEPTH.labels(queue=queue).set(await client.llen(queue))
        finally:
            await client.aclose()
    except Exception:
        pass


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    await _refresh_queue_depth(request.app.state.settings)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
