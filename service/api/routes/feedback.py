"""POST /cds-services/{id}/feedback: CDS Hooks 2.0 feedback (index.html#feedback), one `feedback`
audit record per item (card uuid, outcome, override reason code; never the free-text comment).

A card overridden because the patient declined the MRI also goes to the workers (task
`spinewatch.mri_declined`), which close that patient's MRI clock episode. It is queued before
anything is audited: a queue that refuses is a 503 the EHR can resend, never a half-recorded answer."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api.body import read_json, validate
from service.api.deps import AuditDep, SettingsDep, VerifiedClient, WorkQueueDep
from service.api.middleware import log_request_as
from service.api.models.discovery import HOOKS_BY_SERVICE
from service.api.models.feedback import FeedbackRequest
from service.core.errors import NotFound
from service.infra.queue.keys import TASK_MRI_DECLINED

log = structlog.get_logger("spinewatch.cds_hooks")
router = APIRouter(tags=["cds-hooks"])


@router.post("/cds-services/{service_id}/feedback")
async def feedback(service_id: str, request: Request, client: VerifiedClient, settings: SettingsDep,
                   audit: AuditDep, queue: WorkQueueDep) -> Response:
    if service_id not in HOOKS_BY_SERVICE:
        raise NotFound("no such CDS service here; see GET /cds-services")  # the caller's text is not echoed
    items: FeedbackRequest = validate(FeedbackRequest, await read_json(request, settings.max_body_bytes), "")
    for item in items.feedback:
        if item.declined_mri():
            await run_in_threadpool(queue.send, TASK_MRI_DECLINED, (item.card, item.outcomeTimestamp.isoformat()))
    for item in items.feedback:
        audit.event("feedback", item.outcome, actor=client.iss, detail=item.audit_detail(service_id))
    log_request_as(request, log, "cds.feedback", service=service_id, items=len(items.feedback))
    return Response(status_code=200)
