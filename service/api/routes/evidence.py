"""GET /evidence/{token}: the page a card's "Full evidence" link opens (service/infra/evidence_links.py).

Every finding of the card's assessment in clinical words, the tier and what to do, as stored when the
card was made; its headers are in service/api/pages.py. An unknown or expired link is a 404 page
that says so and nothing else. Logs name neither the token nor patient data; a page served is
audited (kind `evidence-view`: who the link was issued to, the patient, the hook instance).
"""

from __future__ import annotations

import logging

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import AuditDep, EvidenceLinksDep
from service.api.middleware import log_request_as
from service.api.pages import EXPIRED, UNAVAILABLE, evidence_page, notice_page, when
from service.infra.evidence_links import EvidenceStoreUnavailable, MemoryEvidenceStore

log = structlog.get_logger("spinewatch.evidence")
router = APIRouter(tags=["evidence"])


@router.get("/evidence/{token}", response_class=HTMLResponse, include_in_schema=False)
async def evidence(token: str, request: Request, links: EvidenceLinksDep, audit: AuditDep) -> HTMLResponse:
    stored = None
    if links is not None:
        try:  # the in-process store does no I/O: no thread hop
            in_process = isinstance(links.store, MemoryEvidenceStore)
            stored = links.resolve(token) if in_process else await run_in_threadpool(links.resolve, token)
        except EvidenceStoreUnavailable as exc:
            log_request_as(request, log, "evidence.unavailable", level=logging.WARNING, error=str(exc))
            return notice_page(503, UNAVAILABLE)
    if not stored or not isinstance(stored.get("view"), dict):
        log_request_as(request, log, "evidence.expired")  # unknown or expired: one answer; the log has no token
        return notice_page(404, EXPIRED)
    view, meta = stored["view"], stored.get("meta") or {}
    response = evidence_page("evidence.html", 200, view=view, evaluated=when(view.get("evaluated_at")))
    audit.event("evidence-view", "success", actor=meta.get("iss") or "unknown",
                patient=meta.get("patient") or view.get("patient"), detail={
                    "service": meta.get("service"), "hook": meta.get("hook"), "hookInstance": meta.get("hookInstance"),
                    "tier": view.get("tier"), "findings": view.get("count"), "via": "evidence-link",
                    "client": request.client.host if request.client else "unknown"})
    log_request_as(request, log, "evidence.viewed", tier=view.get("tier"), findings=view.get("count"))
    return response
