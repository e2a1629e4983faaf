"""Subscription notifications from the EHR's FHIR server, accepted by service/usecases/intake.py.

    POST /fhir/notifications                  backport notification Bundles (R4 Parameters or R4B
                                              SubscriptionStatus first entry); an empty body is an R4
                                              rest-hook ping; a bare resource an R4 rest-hook payload
    PUT|POST /fhir/notifications/{type}/{id}  R4 rest-hook payload (R4 Subscription §2.46.7.1)

First the secret (401), then the body (413 over the size limit, 400 with an OperationOutcome when
malformed), then the intake: 200 once recorded or queued, 503 when Redis cannot take it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.body import parse_json, read_body
from service.api.deps import AuditDep, SettingsDep, VerifiedNotifier, WorkQueueDep
from service.api.errors import FHIR_JSON, operation_outcome
from service.usecases.intake import Intake, accept, parse_notification, parse_rest_hook_payload

router = APIRouter(prefix="/fhir/notifications", tags=["notifications"])


async def _body(request: Request, limit: int) -> object | None:
    raw = await read_body(request, limit, f"notification larger than {limit} bytes")
    return parse_json(raw, "notification body") if raw.strip() else None


def _answer(result: Intake) -> JSONResponse:
    outcome = operation_outcome(result.message, code="informational", severity="information")
    return JSONResponse(outcome, status_code=200, media_type=FHIR_JSON)


@router.post("")
async def notification(request: Request, _: VerifiedNotifier, settings: SettingsDep, queue: WorkQueueDep,
                       audit: AuditDep) -> JSONResponse:
    note = parse_notification(await _body(request, settings.notification_max_bytes))
    return _answer(await run_in_threadpool(accept, note, queue, audit))


@router.put("/{resource_type}/{resource_id}", operation_id="rest_hook_put")
@router.post("/{resource_type}/{resource_id}", operation_id="rest_hook_post")
async def rest_hook(resource_type: str, resource_id: str, request: Request, _: VerifiedNotifier,
                    settings: SettingsDep, queue: WorkQueueDep, audit: AuditDep) -> JSONResponse:
    note = parse_rest_hook_payload(resource_type, resource_id, await _body(request, settings.notification_max_bytes))
    return _answer(await run_in_threadpool(accept, note, queue, audit))
