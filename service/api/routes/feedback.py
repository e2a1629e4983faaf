"""POST /cds-services/{id}/feedback: CDS Hooks 2.0 feedback (index.html#feedback), one `feedback`
audit record per item (card uuid, outcome, override reason code; never the free-text comment)."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Request, Response

from service.api.body import read_json, validate
from service.api.deps import AuditDep, SettingsDep, VerifiedClient
from service.api.models.discovery import HOOKS_BY_SERVICE
from service.api.models.feedback import FeedbackRequest
from service.core.errors import NotFound

log = structlog.get_logger("spinewatch.cds_hooks")
router = APIRouter(tags=["cds-hooks"])


@router.post("/cds-services/{service_id}/feedback")
async def feedback(service_id: str, request: Request, client: VerifiedClient, settings: SettingsDep,
                   audit: AuditDep) -> Response:
    if service_id not in HOOKS_BY_SERVICE:
        raise NotFound("no such CDS service here; see GET /cds-services")  # the caller's text is not echoed
    items: FeedbackRequest = validate(FeedbackRequest, await read_json(request, settings.max_body_bytes), "")
    for item in items.feedback:
        audit.event("feedback", item.outcome, actor=client.iss, detail=item.audit_detail(service_id))
    log.info("cds.feedback", service=service_id, items=len(items.feedback), status=200)
    return Response(status_code=200)
