"""Audit review: `GET /audit/events` (JSON, or FHIR AuditEvents) and the reviewer page `GET /audit`.

Both need the reviewer token (SPINEWATCH_REVIEWER_TOKEN): `Authorization: Bearer <token>`, or for
the page a session cookie set by the token form (`POST /audit/login`). A refused caller is audited
(kind `auth-failure`, HIPAA 164.312(b)); every successful read is audited too (kind
`audit-access`, BALP Query pattern), after the read, so a view never lists itself.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from service.infra.audit.writer import configure, current_store, record_event
from service.core.errors import InvalidRequest, Unauthorized
from service.core.metrics import AUTH_FAILURES

router = APIRouter(tags=["audit"])

SESSION_COOKIE = "spinewatch_review"
TIMELINE_KINDS = ("notification", "evaluation", "card", "feedback", "alert")
KINDS = TIMELINE_KINDS + ("evidence-view", "auth-failure", "audit-access")
_templates = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
                         autoescape=select_autoescape(["html"]))


def normalise_patient(value: str | None) -> str | None:
    """A patient filter as stored ("Patient/id"): the page, the API and `spinewatch audit` accept a bare id."""
    value = (value or "").strip() or None
    return f"Patient/{value}" if value and "/" not in value else value


def normalise_time(value: str) -> str:
    """ISO-8601 date or date-time → the store's UTC string form (records compare as strings)."""
    from service.infra.audit.store import utc_iso

    moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return utc_iso(moment)


def _session_value(token: str) -> str:
    # The cookie carries a MAC of the token, not the token itself.
    return hmac.new(token.encode("utf-8"), b"spinewatch-review-session", hashlib.sha256).hexdigest()


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _store(request: Request):
    return current_store(request.app.state.settings)


def _record(request: Request, kind: str, outcome: str, **kwargs) -> None:
    record_event(kind, outcome, settings=request.app.state.settings, **kwargs)


def _refuse(request: Request, reason: str) -> None:
    AUTH_FAILURES.labels(surface="audit", reason=reason).inc()
    _record(request, "auth-failure", "failure", actor=_client(request),
            detail={"surface": "audit", "reason": reason, "path": request.url.path})


def _authorised(request: Request) -> bool:
    token = request.app.state.settings.reviewer_token
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True
        _refuse(request, "bad-token")
        return False
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        if hmac.compare_digest(cookie.encode(), _session_value(token).encode()):
            return True
        _refuse(request, "bad-session")
        return False
    return False


def require_reviewer(request: Request) -> str:
    if not _authorised(request):
        if not request.headers.get("authorization") and not request.cookies.get(SESSION_COOKIE):
            _refuse(request, "missing-token")
        raise Unauthorized("reviewer token required")
    return "reviewer"


Reviewer = Annotated[str, Depends(require_reviewer)]


class Filters:
    def __init__(self, patient: str | None = None, kind: list[str] | None = None, type: list[str] | None = None,
                 outcome: str | None = None, since: str | None = None, until: str | None = None,
                 limit: int = 50, offset: int = 0):
        self.patient = normalise_patient(patient)
        self.kinds = [k for k in (kind or []) + (type or []) if k] or None
        self.outcome = (outcome or "").strip() or None
        try:
            self.since = normalise_time(since) if since else None
            self.until = normalise_time(until) if until else None
        except ValueError:
            raise InvalidRequest("since/until: ISO-8601 date or date-time expected")
        self.limit, self.offset = limit, offset

    def query(self) -> dict:
        return {"patient": self.patient, "kinds": self.kinds, "outcome": self.outcome, "since": self.since,
                "until": self.until}

    def audit_detail(self) -> dict:
        return {k: v for k, v in self.query().items() if v}


def _filters(patient: Annotated[str | None, Query(max_length=200)] = None,
             kind: Annotated[list[str] | None, Query(max_length=40)] = None,
             type: Annotated[list[str] | None, Query(max_length=40)] = None,
             outcome: Annotated[str | None, Query(max_length=40)] = None,
             since: Annotated[str | None, Query(max_length=40)] = None,
             until: Annotated[str | None, Query(max_length=40)] = None,
             limit: Annotated[int, Query(ge=1, le=500)] = 50,
             # bounded: a larger offset overflowed SQLite's 64-bit INTEGER (a 500; issue 7, schemathesis)
             offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> Filters:
    return Filters(patient, kind, type, outcome, since, until, limit, offset)


AuditFilters = Annotated[Filters, Depends(_filters)]


@router.get("/audit/events")
def list_events(request: Request, reviewer: Reviewer, filters: AuditFilters,
                format: Annotated[str, Query(pattern="^(json|fhir)$")] = "json"):
    """Audit records matching the filters, newest first, with paging (total, limit, offset)."""
    records, total = _store(request).query(**filters.query(), limit=filters.limit, offset=filters.offset)
    _record(request, "audit-access", "success", actor=reviewer, patient=filters.patient,
                 detail={"action": "list", "filters": filters.audit_detail(), "count": len(records)})
    if format == "fhir":
        from fhir_mappings.fhir.audit_events import ExportContext, audit_event

        ctx = ExportContext(site=request.url.hostname or "spinewatch", service_url=str(request.base_url).rstrip("/"))
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": total,
                  "entry": [{"resource": audit_event(r.to_json(), ctx)} for r in records]}
        return JSONResponse(bundle, media_type="application/fhir+json")
    return {"total": total, "limit": filters.limit, "offset": filters.offset,
            "events": [r.to_json() for r in records]}


def feedback_counts(records, card_records=()) -> dict:
    """Cards accepted and overridden, and the override reasons, from feedback records; and the
    same per card type (hook and tier), which the feedback reaches through its card's `card`
    record (CDS Hooks feedback names only the card's uuid)."""
    kind_of = {uuid: (d.get("hook") or "?", d.get("tier") or "?")
               for r in card_records for d in [r.detail or {}] for uuid in d.get("cards") or []}
    outcomes, reasons = Counter(), Counter()
    by_kind: dict[tuple[str, str], dict] = {}
    for r in records:
        d = r.detail or {}
        outcome = d.get("outcome") or r.outcome
        outcomes[outcome] += 1
        row = by_kind.setdefault(kind_of.get(d.get("card"), ("unknown card", "?")),
                                 {"accepted": 0, "overridden": 0, "reasons": Counter()})
        if outcome in ("accepted", "overridden"):
            row[outcome] += 1
        if outcome == "overridden":
            reasons[_reason_label(d)] += 1
            row["reasons"][_reason_label(d)] += 1
    per_card = [{"hook": hook, "tier": tier, "accepted": row["accepted"], "overridden": row["overridden"],
                 "reasons": row["reasons"].most_common()} for (hook, tier), row in sorted(by_kind.items())]
    return {"accepted": outcomes.get("accepted", 0), "overridden": outcomes.get("overridden", 0),
            "other": sum(n for k, n in outcomes.items() if k not in ("accepted", "overridden")),
            "reasons": reasons.most_common(), "per_card": per_card}


def _reason_label(detail: dict) -> str:
    # CDS Hooks 2.0 feedback: overrideReason.reason is a Coding (stored as system and code); the
    # free-text userComment is never stored. Our own codes are shown with their display.
    from fhir_mappings.cds.cards import OVERRIDE_REASONS

    reason = detail.get("overrideReason") or detail.get("override_reason") or detail.get("reason")
    if isinstance(reason, dict):
        reason = reason.get("reason", reason)
        if isinstance(reason, dict):
            code = reason.get("code")
            known = next((r["display"] for r in OVERRIDE_REASONS
                          if r["code"] == code and reason.get("system") in (None, r["system"])), None)
            return str(reason.get("display") or known or code or "unspecified")
    return str(reason) if reason else "unspecified"


def _patient_feedback(store, filters: Filters, cards) -> list:
    """Feedback on this patient's cards. CDS Hooks feedback names the card, not the patient, so it
    is matched to the patient through the card uuids of the patient's `card` records."""
    uuids = {u for r in cards for u in (r.detail or {}).get("cards") or []}
    if not uuids:
        return []
    q = filters.query() | {"patient": None, "kinds": ["feedback"]}
    records, _ = store.query(**q, limit=20000, newest_first=False)
    return [r for r in records if (r.detail or {}).get("card") in uuids]


def summarise(record) -> str:
    """One line for the timeline: codes and references only."""
    d = record.detail or {}
    if record.kind == "notification":
        parts = [d.get("kind") or d.get("type"), _n(d.get("events"), "event"), _n(d.get("focus"), "resource"),
                 d.get("outcome")]
    elif record.kind == "evaluation":
        flags = d.get("flags") or d.get("red_flags") or []
        parts = [f"tier {d.get('tier')}" if d.get("tier") else None, ", ".join(flags) if flags else None,
                 _n(d.get("inputs"), "input"), d.get("origin")]
    elif record.kind == "card":
        parts = [d.get("hook"), _n(d.get("cards"), "card"), d.get("indicator")]
    elif record.kind == "feedback":
        outcome = d.get("outcome") or record.outcome
        parts = [f"card {str(d.get('card'))[:8]}" if d.get("card") else None,
                 _reason_label(d) if outcome == "overridden" else None]
    elif record.kind == "alert":
        parts = [d.get("tier"), d.get("communication"), d.get("channel") or ", ".join(d.get("channels") or []),
                 d.get("error")]
    else:
        parts = [d.get("surface"), d.get("reason"), d.get("action")]
    return " · ".join(str(p) for p in parts if p) or "-"


def _n(value, noun: str) -> str | None:
    if not value:
        return None
    n = len(value) if isinstance(value, (list, dict)) else 1
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _page_records(store, kinds, filters: Filters, limit: int = 5000):
    q = filters.query() | {"kinds": kinds}
    records, _ = store.query(**q, limit=limit, newest_first=False)
    return records


@router.get("/audit", response_class=HTMLResponse)
def review_page(request: Request, filters: AuditFilters):
    """The reviewer page: filters, events, a per-patient timeline and card feedback counts."""
    if not _authorised(request):  # a browser without a session gets the token form
        html = _templates.get_template("audit_login.html").render(failed=request.query_params.get("failed") == "1")
        return HTMLResponse(html, status_code=401)
    store = _store(request)
    records, total = store.query(**filters.query(), limit=filters.limit, offset=filters.offset)
    if filters.patient:
        timeline = _page_records(store, list(TIMELINE_KINDS), filters)
        card_records = [r for r in timeline if r.kind == "card"]
        feedback_records = _patient_feedback(store, filters, card_records)
        timeline = sorted([r for r in timeline if r.kind != "feedback"] + feedback_records, key=lambda r: r.seq)
    else:
        timeline, feedback_records = [], _page_records(store, ["feedback"], filters)
        card_records = _page_records(store, ["card"], filters)  # a card before the window: "unknown card"
    feedback = feedback_counts(feedback_records, card_records)
    _record(request, "audit-access", "success", actor="reviewer", patient=filters.patient,
                 detail={"action": "page", "filters": filters.audit_detail(), "count": len(records)})
    base = {k: v for k, v in {"patient": filters.patient, "outcome": filters.outcome,
                              "since": request.query_params.get("since"),
                              "until": request.query_params.get("until"), "limit": filters.limit}.items() if v}
    kind_params = [("kind", k) for k in filters.kinds or []]

    def page_url(offset: int) -> str:
        return "/audit?" + urlencode(list(base.items()) + kind_params + [("offset", offset)])

    html = _templates.get_template("audit.html").render(
        records=records, total=total, filters=filters, kinds=KINDS, timeline=timeline, feedback=feedback,
        query=request.query_params, prev_url=page_url(max(filters.offset - filters.limit, 0)) if filters.offset else None,
        next_url=page_url(filters.offset + filters.limit) if filters.offset + filters.limit < total else None,
        summarise=summarise)
    return HTMLResponse(html)


@router.post("/audit/login")
def login(request: Request, token: Annotated[str, Form(max_length=500)]):
    settings = request.app.state.settings
    if not hmac.compare_digest(token.encode(), settings.reviewer_token.encode()):
        _refuse(request, "bad-token")
        return RedirectResponse("/audit?failed=1", status_code=303)
    response = RedirectResponse("/audit", status_code=303)
    response.set_cookie(SESSION_COOKIE, _session_value(settings.reviewer_token), httponly=True, samesite="strict",
                        secure=settings.environment == "production", path="/audit")
    return response


@router.post("/audit/logout")
def logout():
    response = RedirectResponse("/audit", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/audit")
    return response


@router.get("/audit/verify")
def verify_chain(request: Request, reviewer: Reviewer):
    """Walk the hash chain: {"ok": true, "checked": n} or the first broken record."""
    result = _store(request).verify()
    _record(request, "audit-access", "success", actor=reviewer, detail={"action": "verify", "ok": result.ok})
    return {"ok": result.ok, "checked": result.checked, "broken_seq": result.broken_seq, "reason": result.reason,
            "head_hash": result.head_hash}


def install(app) -> None:
    """Register the audit routes and point `audit_event` at this app's settings (service/api/app.py)."""
    configure(app.state.settings, background=True)
    app.include_router(router)
