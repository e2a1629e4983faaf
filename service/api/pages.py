"""HTML pages from service/api/templates/ (Jinja2, auto-escaped: patient text is never markup)."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from pathlib import Path

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

templates = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
                        autoescape=select_autoescape(["html"]))


def page(template: str, status: int = 200, headers: dict | None = None, **values) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(**values), status_code=status, headers=headers)


# ---- the full-evidence page (GET /evidence/{token}) ----------------------------------------------
# No login: the token is the capability, so the page is never cached, never sent on as a referrer,
# never indexed, and framed only by this origin (OWASP Session Management cheat sheet, "Web Content
# Caching"; Referrer-Policy, W3C Referrer Policy). Its Content-Security-Policy (W3C CSP Level 3)
# allows nothing but its own style block, by hash, so no 'unsafe-inline'.
EVIDENCE_CSS = (
    "body { font: 15px/1.45 system-ui, sans-serif; margin: 0 1.5rem 2rem; color: #1d2330; max-width: 60rem; } "
    "header { display: flex; align-items: baseline; gap: 1rem; border-bottom: 2px solid #2d5d8a; "
    "margin-bottom: 1rem; } "
    "h1 { font-size: 1.3rem; margin: .8rem 0 .5rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; } "
    "table { border-collapse: collapse; width: 100%; } "
    "th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #dde; vertical-align: top; } "
    "th { background: #e8edf3; font-weight: 600; } .muted { color: #667; } "
    ".tier { padding: .6rem .8rem; border-left: 6px solid #5bc0de; background: #f2f5f9; } "
    ".tier-emergency { border-left-color: #d9534f; } .tier-urgent { border-left-color: #f0ad4e; }")
_CSS_HASH = base64.b64encode(hashlib.sha256(EVIDENCE_CSS.encode("utf-8")).digest()).decode("ascii")
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'self'")
EVIDENCE_HEADERS = {
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


def evidence_page(template: str, status: int, **values) -> HTMLResponse:
    return page(template, status, EVIDENCE_HEADERS, css=EVIDENCE_CSS, **values)


def notice_page(status: int, notice: tuple[str, str]) -> HTMLResponse:
    heading, message = notice
    return evidence_page("evidence_expired.html", status, heading=heading, message=message)


def when(value: str | None) -> str:
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M UTC") if value else "at an unknown time"
    except ValueError:
        return "at an unknown time"
