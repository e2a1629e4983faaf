"""GET /audit/events: audit records matching the filters, newest first, with paging; JSON, or with
`format=fhir` a FHIR R4 searchset Bundle of IHE BALP AuditEvents. Needs the reviewer token; the
read is itself audited (kind `audit-access`, BALP Query pattern), after the read, so a listing
never lists itself."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from fhir_mappings.fhir.audit_events import ExportContext, audit_event
from service.api.deps import AuditDep, Reviewer
from service.api.errors import FHIR_JSON
from service.api.models.audit import AuditFilters

router = APIRouter(tags=["audit"])


@router.get("/audit/events")
def list_events(request: Request, reviewer: Reviewer, filters: AuditFilters, audit: AuditDep,
                format: Annotated[str, Query(pattern="^(json|fhir)$")] = "json"):
    records, total = audit.store.query(**filters.query(), limit=filters.limit, offset=filters.offset)
    audit.record("audit-access", "success", actor=reviewer, patient=filters.patient,
                 detail={"action": "list", "filters": filters.audit_detail(), "count": len(records)})
    if format == "fhir":
        ctx = ExportContext(site=request.url.hostname or "spinewatch", service_url=str(request.base_url).rstrip("/"))
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": total,
                  "entry": [{"resource": audit_event(r.to_json(), ctx)} for r in records]}
        return JSONResponse(bundle, media_type=FHIR_JSON)
    return {"total": total, "limit": filters.limit, "offset": filters.offset,
            "events": [r.to_json() for r in records]}
