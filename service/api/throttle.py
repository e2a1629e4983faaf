"""Refused callers over HTTP (service/usecases/auth_failures.py holds the logic): `check` before a
credential is looked at (429 with `Retry-After` and an OperationOutcome past the limit), `refused`
when one is refused (counted in spinewatch_auth_failures_total, audited one by one or summarised).
The limiter is the one create_app keeps on `app.state.auth_failures`: per process."""

from __future__ import annotations

from fastapi import Request
from starlette.exceptions import HTTPException

from service.core.metrics import AUTH_FAILURES
from service.usecases.auth_failures import RATE_LIMITED, AuthFailures, Write


def client_host(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def failures(request: Request) -> AuthFailures:
    return request.app.state.auth_failures


def check(request: Request, surface: str, write: Write) -> None:
    """429 when this client, or this surface, has been refused too often in the last minute."""
    wait = failures(request).retry_after(surface, client_host(request), write)
    if wait is not None:
        AUTH_FAILURES.labels(surface=surface, reason=RATE_LIMITED).inc()
        raise HTTPException(429, "too many refused attempts; retry later", headers={"Retry-After": str(wait)})


def refused(request: Request, write: Write, surface: str, reason: str, *, actor: str, detail: dict) -> None:
    AUTH_FAILURES.labels(surface=surface, reason=reason).inc()
    failures(request).refused(write, surface, reason, client_host(request), actor=actor, detail=detail)
