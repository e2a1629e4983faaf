"""HTML pages from service/api/templates/ (Jinja2, auto-escaped: patient text is never markup)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from service.api.headers import no_store_headers, sha256_source

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
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src {sha256_source(EVIDENCE_CSS)}; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'self'")
EVIDENCE_HEADERS = no_store_headers(CONTENT_SECURITY_POLICY)
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


# ---- the audit surface (/audit, /audit/login, /audit/logout, /audit/events, /audit/verify) ---------
# Every response under /audit (pages, JSON, errors, 401s, 429s) carries REVIEW_HEADERS (create_app:
# PathHeaders). The page's one style block is allowed by hash; it has no scripts and no style
# attributes, forms post only to this origin, and it may not be framed at all.
REVIEW_CSS = (
    "body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5rem 2rem; color: #1d2330; } "
    "header { display: flex; align-items: baseline; gap: 1rem; border-bottom: 2px solid #2d5d8a; "
    "margin-bottom: 1rem; } "
    "h1 { font-size: 1.3rem; margin: .8rem 0 .5rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; } "
    "form.filters { display: flex; flex-wrap: wrap; gap: .6rem 1rem; align-items: end; background: #f2f5f9; "
    "padding: .7rem; } "
    "form.filters label { display: flex; flex-direction: column; font-size: .8rem; color: #445; } "
    "form.signout { margin-left: auto; } "
    "table { border-collapse: collapse; width: 100%; } "
    "th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #dde; vertical-align: top; } "
    "table.compact { width: auto; margin-top: .5rem; } "
    "th { background: #e8edf3; font-weight: 600; } td.mono, .mono { font-family: ui-monospace, monospace; "
    "font-size: .8rem; } "
    ".outcome-failure, .outcome-error { color: #a11; font-weight: 600; } "
    ".kind { display: inline-block; padding: 0 .4rem; border-radius: .3rem; background: #e3e9f2; font-size: .8rem; } "
    ".kind-alert { background: #fde2c8; } .kind-card { background: #d9f0dc; } "
    ".kind-evaluation { background: #e6defa; } "
    ".kind-feedback { background: #d8eef7; } .kind-auth-failure { background: #f7d4d4; } "
    "ol.timeline { list-style: none; padding-left: 0; border-left: 3px solid #2d5d8a; margin-left: .5rem; } "
    "ol.timeline li { padding: .3rem .8rem; } .counts { display: flex; gap: 2rem; } "
    ".counts div strong { font-size: 1.4rem; display: block; } "
    ".muted { color: #667; } nav.paging a { margin-right: 1rem; }")
REVIEW_CSP = (f"default-src 'none'; style-src {sha256_source(REVIEW_CSS)}; base-uri 'none'; form-action 'self'; "
              "frame-ancestors 'none'")
REVIEW_HEADERS = no_store_headers(REVIEW_CSP, **{"X-Frame-Options": "DENY"})


def reviewer_page(template: str, status: int = 200, **values) -> HTMLResponse:
    return page(template, status, css=REVIEW_CSS, **values)
