"""The reviewer page: GET /audit (filters, events, a per-patient timeline, card feedback counts) and
its token form, POST /audit/login and /audit/logout. A browser without a session gets the form (401).
The session cookie is HttpOnly, SameSite=Strict, Secure in production, and lasts
SPINEWATCH_REVIEWER_SESSION_SECONDS (Max-Age, and checked server-side); signing out revokes it
(service/api/reviewer.py; OWASP Session Management cheat sheet). Every page served is audited (kind
`audit-access`); every response under /audit carries pages.REVIEW_HEADERS (no-store, CSP)."""

from __future__ import annotations

import hmac
import re
import time
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from service.api.deps import AuditDep, SettingsDep
from service.api.models.audit import AuditFilters
from service.api import throttle
from service.api.pages import reviewer_page
from service.api.reviewer import (SESSION_COOKIE, SURFACE, Session, authorised, read_session, refuse, revocations,
                                  session_value)
from service.usecases.audit_review import KINDS, review, summarise

router = APIRouter(tags=["audit"])


# Where a sign-in may return: the review pages themselves, never another site (an open redirect) or
# path (OWASP Unvalidated Redirects and Forwards cheat sheet).
_RETURN_TO = re.compile(r"/audit(/report)?")


def sign_in_form(request: Request) -> HTMLResponse:
    """The token form (401) for a browser without a live session, on every page under /audit; signing
    in returns to the page asked for."""
    response = reviewer_page("audit_login.html", 401, failed=request.query_params.get("failed") == "1",
                             next_path=request.url.path)
    if request.cookies.get(SESSION_COOKIE):  # expired, revoked or forged: the browser stops sending it
        response.delete_cookie(SESSION_COOKIE, path="/audit")
    return response


@router.get("/audit", response_class=HTMLResponse)
def review_page(request: Request, filters: AuditFilters, settings: SettingsDep, audit: AuditDep):
    if not authorised(request, settings, audit):
        return sign_in_form(request)
    found = review(audit.store, filters)
    audit.record("audit-access", "success", actor="reviewer", patient=filters.patient,
                 detail={"action": "page", "filters": filters.audit_detail(), "count": len(found.records)})
    base = {k: v for k, v in {"patient": filters.patient, "outcome": filters.outcome,
                              "since": request.query_params.get("since"),
                              "until": request.query_params.get("until"), "limit": filters.limit}.items() if v}
    kinds = [("kind", k) for k in filters.kinds or []]

    def page_url(offset: int) -> str:
        return "/audit?" + urlencode(list(base.items()) + kinds + [("offset", offset)])

    after = filters.offset + filters.limit
    return reviewer_page("audit.html", records=found.records, total=found.total, filters=filters, kinds=KINDS,
                         timeline=found.timeline, feedback=found.feedback, query=request.query_params,
                         summarise=summarise,
                         prev_url=page_url(max(filters.offset - filters.limit, 0)) if filters.offset else None,
                         next_url=page_url(after) if after < found.total else None)


@router.post("/audit/login")
def login(request: Request, token: Annotated[str, Form(max_length=500)], settings: SettingsDep, audit: AuditDep,
          next_path: Annotated[str, Form(alias="next", max_length=100)] = "/audit"):
    throttle.check(request, SURFACE, audit.record)  # 429, the token unchecked, past the failure limit
    back = next_path if _RETURN_TO.fullmatch(next_path) else "/audit"
    if not hmac.compare_digest(token.encode(), settings.reviewer_token.get_secret_value().encode()):
        refuse(request, audit, "bad-token")
        return RedirectResponse(back + "?failed=1", status_code=303)
    response = RedirectResponse(back, status_code=303)
    response.set_cookie(SESSION_COOKIE, session_value(settings.reviewer_token.get_secret_value()),
                        max_age=settings.reviewer_session_seconds, httponly=True, samesite="strict",
                        secure=settings.environment == "production", path="/audit")
    return response


@router.post("/audit/logout")
def logout(request: Request, settings: SettingsDep):
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        now = time.time()
        revoked = revocations(settings)
        found = read_session(cookie, settings.reviewer_token.get_secret_value(), settings.reviewer_session_seconds, now,
                             revoked)
        if isinstance(found, Session):  # only a genuine, live session is remembered as revoked
            revoked.revoke(found, now)
    response = RedirectResponse("/audit", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/audit")
    return response
