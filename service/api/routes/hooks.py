"""POST /cds-services/{id}: a CDS Hooks 2.0 call (patient-view; order-select and order-sign), answered
by service/usecases/hook.py. Logs carry ids, reasons and statuses only: never the body, the bearer
JWT or the fhirAuthorization token. The call's one log line (`cds.hook`, `cds.hook_refused`) is
written by RequestIdMiddleware, with the status sent and the request's duration."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.body import read_json, validate
from service.api.deps import verify_cds_client
from service.api.middleware import log_request_as
from service.api.models.discovery import HOOKS_BY_SERVICE
from service.api.models.hooks import HookRequest
from service.api.services import Services
from service.core.errors import NotFound, SpineWatchError
from service.usecases.hook import answer

log = structlog.get_logger("spinewatch.cds_hooks")
router = APIRouter(tags=["cds-hooks"])


@router.post("/cds-services/{service_id}")
async def call_service(service_id: str, request: Request) -> JSONResponse:
    # The collaborators read and the caller verified by plain calls: as FastAPI dependencies they
    # cost more per call than the reads themselves (service/api/deps.py, docs/capacity.md M5).
    services: Services = request.app.state.services
    client = await verify_cds_client(request, services)
    now = datetime.now(timezone.utc)  # the evaluation time is the request time, passed to the pure core
    started = time.perf_counter()
    hook = hook_instance = None
    service = service_id if service_id in HOOKS_BY_SERVICE else "(unknown)"  # never log the caller's text
    try:
        if service_id not in HOOKS_BY_SERVICE:
            raise NotFound("no such CDS service here; see GET /cds-services")
        req: HookRequest = validate(HookRequest, await read_json(request, services.settings.max_body_bytes), "")
        hook, hook_instance = req.loggable()
        result = await answer(services.hooks, services.audit, req.call(service_id), iss=client.iss, now=now)
    except SpineWatchError as exc:
        log_request_as(request, log, "cds.hook_refused", service=service, hook=hook, hookInstance=hook_instance,
                       reason=exc.message)
        raise
    tier = result.assessment.urgency if result.assessment else None
    log_request_as(request, log, "cds.hook", service=service_id, hook=req.hook, hookInstance=hook_instance,
                   cards=len(result.cards), tier=tier, source=result.source,
                   ms=round((time.perf_counter() - started) * 1000, 1))
    return JSONResponse({"cards": result.cards})
