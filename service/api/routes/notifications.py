"""Subscription notifications from the EHR's FHIR server, accepted by service/usecases/intake.py.

    POST /fhir/notifications                  backport notification Bundles (R4 Parameters or R4B
                                              SubscriptionStatus first entry); an empty body (or `{}`)
                                              is an R4 rest-hook ping; a bare resource an R4 rest-hook
                                              payload; `{}` with Medplum's delete headers a delete
    PUT|POST /fhir/notifications/{type}/{id}  R4 rest-hook payload (R4 Subscription §2.46.7.1)
    DELETE /fhir/notifications/{type}/{id}    HAPI FHIR's rest-hook delivery of a delete

First the secret (401), then the body (413 over the size limit), its signature when one is
configured (401), then the body and headers (400 with an OperationOutcome when malformed), then the
intake: 200 once recorded or queued, 503 when Redis cannot take it.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.body import parse_json, read_body
from service.api.deps import AuditDep, SettingsDep, VerifiedNotifier, WorkQueueDep
from service.api.errors import FHIR_JSON, operation_outcome
from service.usecases.intake import (Intake, accept, parse_notification, parse_rest_hook_delete,
                                     parse_rest_hook_payload, read_delivery)

router = APIRouter(prefix="/fhir/notifications", tags=["notifications"])


async def _body(request: Request, limit: int, check_signature: Callable[[bytes], None]) -> object | None:
    """Read once: the signature is checked over the exact bytes received, then they are parsed."""
    raw = await read_body(request, limit, f"notification larger than {limit} bytes")
    check_signature(raw)
    return parse_json(raw, "notification body") if raw.strip() else None


def _answer(result: Intake) -> JSONResponse:
    outcome = operation_outcome(result.message, code="informational", severity="information")
    return JSONResponse(outcome, status_code=200, media_type=FHIR_JSON)


@router.post("")
async def notification(request: Request, check_signature: VerifiedNotifier, settings: SettingsDep,
                       queue: WorkQueueDep, audit: AuditDep) -> JSONResponse:
    body = await _body(request, settings.notification_max_bytes, check_signature)
    note = parse_notification(body, read_delivery(request.headers))
    return _answer(await run_in_threadpool(accept, note, queue, audit))


@router.put("/{resource_type}/{resource_id}", operation_id="rest_hook_put")
@router.post("/{resource_type}/{resource_id}", operation_id="rest_hook_post")
async def rest_hook(resource_type: str, resource_id: str, request: Request, check_signature: VerifiedNotifier,
                    settings: SettingsDep, queue: WorkQueueDep, audit: AuditDep) -> JSONResponse:
    body = await _body(request, settings.notification_max_bytes, check_signature)
    note = parse_rest_hook_payload(resource_type, resource_id, body, read_delivery(request.headers))
    return _answer(await run_in_threadpool(accept, note, queue, audit))


# HAPI FHIR (SubscriptionDeliveringRestHookSubscriber, payload set, the Subscription carrying
# http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages) delivers a delete as
# its generic client's `delete().resourceById(...)`: DELETE {endpoint}/{type}/{id}, no body.
@router.delete("/{resource_type}/{resource_id}", operation_id="rest_hook_delete")
async def rest_hook_delete(resource_type: str, resource_id: str, request: Request, check_signature: VerifiedNotifier,
                           settings: SettingsDep, queue: WorkQueueDep, audit: AuditDep) -> JSONResponse:
    body = await _body(request, settings.notification_max_bytes, check_signature)
    note = parse_rest_hook_delete(resource_type, resource_id, body, read_delivery(request.headers))
    return _answer(await run_in_threadpool(accept, note, queue, audit))
