"""GET /audit/verify: walk the audit log's hash chain (with SPINEWATCH_AUDIT_HMAC_KEY when set);
{"ok": true, "checked": n, ...} or the first broken record. `expect_head=SEQ:HASH` (repeatable): heads
kept outside the database, as `spinewatch audit head` prints them. Needs the reviewer token; audited
(kind `audit-access`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import StringConstraints

from service.api.deps import AuditDep, Reviewer

router = APIRouter(tags=["audit"])

Head = Annotated[str, StringConstraints(pattern=r"^\d+:[0-9a-f]{64}$")]  # SEQ:HASH


@router.get("/audit/verify")
def verify_chain(reviewer: Reviewer, audit: AuditDep,
                 expect_head: Annotated[list[Head] | None, Query()] = None):
    expect = {int(seq): digest for seq, digest in (value.split(":", 1) for value in expect_head or [])}
    result = audit.store.verify(expect=expect)
    audit.record("audit-access", "success", actor=reviewer,
                 detail={"action": "verify", "ok": result.ok, "expected_heads": len(expect)})
    return {"ok": result.ok, "checked": result.checked, "broken_seq": result.broken_seq, "reason": result.reason,
            "head_hash": result.head_hash, "head_seq": result.head_seq, "keyed_from": result.keyed_from}
