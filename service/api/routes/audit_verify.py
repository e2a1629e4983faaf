"""GET /audit/verify: walk the audit log's hash chain; {"ok": true, "checked": n} or the first broken
record. Needs the reviewer token; audited (kind `audit-access`)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import AuditDep, Reviewer

router = APIRouter(tags=["audit"])


@router.get("/audit/verify")
def verify_chain(reviewer: Reviewer, audit: AuditDep):
    result = audit.store.verify()
    audit.record("audit-access", "success", actor=reviewer, detail={"action": "verify", "ok": result.ok})
    return {"ok": result.ok, "checked": result.checked, "broken_seq": result.broken_seq, "reason": result.reason,
            "head_hash": result.head_hash}
