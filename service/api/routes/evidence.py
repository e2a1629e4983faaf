"""`GET /evidence/{token}`: the page a card's "Full evidence" link opens (service/infra/evidence_links.py).

Every finding of the card's assessment in clinical words, the tier and what to do, as stored when
the card was made. No login: the token is the capability (docs/cards.md, "Full evidence link"), so
the page is never cached (`Cache-Control: no-store`), never sent on as a referrer, never indexed,
and framed only by this origin; its Content-Security-Policy allows nothing but its own style block
(by hash). Patient text is escaped (Jinja2 auto-escaping). An unknown or expired link is a 404
page that says so and nothing else.

Logs say `evidence.viewed` / `evidence.expired`, with neither the token nor patient data; a page
served is audited (kind `evidence-view`: who the link was issued to, the patient, hook instance).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from pathlib import Path

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from service.infra.audit import writer as audit
from service.infra.evidence_links import EvidenceLinks, EvidenceStoreUnavailable, MemoryEvidenceStore

log = structlog.get_logger("spinewatch.evidence")
router = APIRouter(tags=["evidence"])

_templates = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
                         autoescape=select_autoescape(["html"]))

# The page's only style (audit_base.html's look); allowed by its hash, so no 'unsafe-inline'.
CSS = ("body { font: 15px/1.45 system-ui, sans-serif; margin: 0 1.5rem 2rem; color: #1d2330; max-width: 60rem; } "
       "header { display: flex; align-items: baseline; gap: 1rem; border-bottom: 2px solid #2d5d8a; "
       "margin-bottom: 1rem; } "
       "h1 { font-size: 1.3rem; margin: .8rem 0 .5rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; } "
       "table { border-collapse: collapse; width: 100%; } "
       "th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #dde; vertical-align: top; } "
       "th { background: #e8edf3; font-weight: 600; } .muted { color: #667; } "
       ".tier { padding: .6rem .8rem; border-left: 6px solid #5bc0de; background: #f2f5f9; } "
       ".tier-emergency { border-left-color: #d9534f; } .tier-urgent { border-left-color: #f0ad4e; }")
_CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode("utf-8")).digest()).decode("ascii")
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'self'")
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
}
EXPIRED = ("This link has expired",
           "A SpineWatch card's full-evidence link can be opened for a limited time only. Reopen the patient's "
           "record to see the current card and its evidence.")
UNAVAILABLE = ("The evidence cannot be shown just now",
               "Try again in a moment, or reopen the patient's record to see the current card.")


def _page(template: str, status: int, **values) -> HTMLResponse:
    body = _templates.get_template(template).render(css=CSS, **values)
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def _links(request: Request) -> EvidenceLinks | None:
    runtime = getattr(request.app.state, "cds_hooks", None)
    return getattr(runtime, "evidence", None)


def _when(value: str | None) -> str:
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M UTC") if value else "at an unknown time"
    except ValueError:
        return "at an unknown time"


@router.get("/evidence/{token}", response_class=HTMLResponse, include_in_schema=False)
async def evidence_page(token: str, request: Request) -> HTMLResponse:
    links = _links(request)
    stored = None
    if links is not None:
        try:
            if isinstance(links.store, MemoryEvidenceStore):
                stored = links.resolve(token)
            else:
                stored = await run_in_threadpool(links.resolve, token)
        except EvidenceStoreUnavailable as exc:
            log.warning("evidence.unavailable", error=str(exc))
            heading, message = UNAVAILABLE
            return _page("evidence_expired.html", 503, heading=heading, message=message)
    if not stored or not isinstance(stored.get("view"), dict):
        log.info("evidence.expired")  # unknown or expired: one answer for both, and no token in the log
        heading, message = EXPIRED
        return _page("evidence_expired.html", 404, heading=heading, message=message)
    view, meta = stored["view"], stored.get("meta") or {}
    response = _page("evidence.html", 200, view=view, evaluated=_when(view.get("evaluated_at")))
    audit.audit_event("evidence-view", "success", actor=meta.get("iss") or "unknown",
                      patient=meta.get("patient") or view.get("patient"), detail={
                          "service": meta.get("service"), "hook": meta.get("hook"),
                          "hookInstance": meta.get("hookInstance"), "tier": view.get("tier"),
                          "findings": view.get("count"), "via": "evidence-link",
                          "client": request.client.host if request.client else "unknown"})
    log.info("evidence.viewed", tier=view.get("tier"), findings=view.get("count"))
    return response
