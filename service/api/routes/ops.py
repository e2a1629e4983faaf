"""Operations: /healthz (the process is alive), /readyz (its dependencies answer), /metrics.

Kubernetes-style probes (https://kubernetes.io/docs/concepts/configuration/liveness-readiness-startup-probes/):
a failing /healthz means "restart me", so it checks nothing outside the process; a failing /readyz
means "send me no traffic for now" (Redis, the audit store or the FHIR server is unreachable). The
checks are service/usecases/readiness.py's, kept on the services object; `register_check` adds,
replaces or removes one.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import ReadinessChecksDep, SettingsDep
from service.core.metrics import exposition_registry
from service.usecases.readiness import Check, refresh_queue_depth, run_checks

router = APIRouter(tags=["operations"])


def register_check(app: FastAPI, name: str, check: Check | None) -> None:
    """Add or replace a readiness check (None removes it)."""
    checks = app.state.services.readiness
    if check is None:
        checks.pop(name, None)
    else:
        checks[name] = check


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(checks: ReadinessChecksDep, settings: SettingsDep) -> JSONResponse:
    ready, by_name = await run_checks(checks, settings.readiness_timeout_seconds)
    return JSONResponse({"status": "ready" if ready else "unready", "checks": by_name},
                        status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(settings: SettingsDep) -> Response:
    await refresh_queue_depth(settings)
    return Response(generate_latest(exposition_registry()), media_type=CONTENT_TYPE_LATEST)
