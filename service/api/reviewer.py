"""The audit reviewer's credentials: the reviewer token (SPINEWATCH_REVIEWER_TOKEN) as
`Authorization: Bearer <token>`, or, for the page, a session cookie set by the token form. A refused
caller is audited (kind `auth-failure`: HIPAA Security Rule 45 CFR 164.312(b), audit controls)."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from service.core.metrics import AUTH_FAILURES
from service.core.settings import Settings
from service.infra.audit.writer import AuditLog

SESSION_COOKIE = "spinewatch_review"


def session_value(token: str) -> str:
    # The cookie carries a MAC of the token, not the token itself.
    return hmac.new(token.encode("utf-8"), b"spinewatch-review-session", hashlib.sha256).hexdigest()


def client_host(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def refuse(request: Request, audit: AuditLog, reason: str) -> None:
    AUTH_FAILURES.labels(surface="audit", reason=reason).inc()
    audit.record("auth-failure", "failure", actor=client_host(request),
                 detail={"surface": "audit", "reason": reason, "path": request.url.path})


def authorised(request: Request, settings: Settings, audit: AuditLog) -> bool:
    """The reviewer token or session, checked in constant time; a wrong one is refused and audited."""
    token = settings.reviewer_token.get_secret_value()
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True
        refuse(request, audit, "bad-token")
        return False
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        if hmac.compare_digest(cookie.encode(), session_value(token).encode()):
            return True
        refuse(request, audit, "bad-session")
        return False
    return False
