"""CDS Hooks 2.0 service (https://cds-hooks.hl7.org/2.0/): discovery, patient-view, order-select,
order-sign and feedback.

    GET  /cds-services                     discovery (index.html#discovery)
    POST /cds-services/spinewatch-patient-view   patient-view: the tier card (fhir_mappings.cds.cards)
    POST /cds-services/spinewatch-order-imaging  order-select / order-sign: challenge a spine X-ray
    POST /cds-services/{id}/feedback       feedback (index.html#feedback) → audit log

A card may carry a "Full evidence" link (service/infra/evidence_links.py; the page: service/api/routes/evidence.py).

Every call is authenticated first (service/infra/jwt.py, "Trusting CDS Clients"; failures are a bare
401). A hook call then reads its data (service/infra/fhir/fetch.py: prefetch, else fhirServer, else a
stored assessment), evaluates at the request time with the pure core (SNOMED CT codes the local
value sets do not know first asked of the optional terminology server, service/infra/fhir/terminology.py,
within its time budget), and answers cards; data that cannot be had is a 412 with an
OperationOutcome, never "no cards".

Logs carry ids, reasons and statuses only; the request body, the bearer JWT and the
fhirAuthorization access token are never logged or stored.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import httpx
import structlog
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from fhir_mappings.fhir.bundle import patient_key
from fhir_mappings.cds.cards import cards_for, evidence_view, xray_card
from fhir_mappings.clinical.evaluate import Assessment, assess
from fhir_mappings.clinical.orders import MRI_SPINE, XRAY_SPINE, classify_order, draft_resources, reference
from service.infra.audit import writer as audit
from service.core.errors import (InvalidRequest, NotFound, PayloadTooLarge, PreconditionFailed, ServiceUnavailable,
                            SpineWatchError, Unauthorized)
from service.infra.evidence_links import EvidenceLinks, MemoryEvidenceStore
from service.infra.fhir.fetch import PREFETCH_TEMPLATES, FhirAccessError, FhirClient, gather, parse_hosts
from service.core.metrics import AUTH_FAILURES, CARDS_SERVED, EVALUATION_SECONDS, EVALUATIONS
from service.infra.fhir.binaries import referenced_binaries
from service.infra.jwt import (AuthError, CdsClient, JwksCache, JwtVerifier, MemoryReplayCache, RedisReplayCache,
                              ReplayCacheUnavailable, parse_trusted_issuers)
from service.core.settings import Settings, card_settings, evaluation_settings
from service.infra.stored_assessments import StoredAssessments, default_source, fresh_assessment
from service.infra.fhir.terminology import TerminologyServer, consult

log = structlog.get_logger("spinewatch.cds_hooks")

PATIENT_VIEW = "spinewatch-patient-view"
ORDER_IMAGING = "spinewatch-order-imaging"
KNOWN_HOOKS = ("patient-view", "order-select", "order-sign")
HOOKS_BY_SERVICE = {PATIENT_VIEW: ("patient-view",), ORDER_IMAGING: ("order-select", "order-sign")}
_USAGE = ("Needs the prefetch data, or a fhirServer in SPINEWATCH_FHIR_ALLOWED_HOSTS with a "
          "fhirAuthorization token able to read it; otherwise it answers 412.")
# One service id may be listed once per hook (2.0 §Discovery: "multiple entries of CDS service with
# the same id for different hooks").
SERVICES = [
    {"hook": "patient-view", "id": PATIENT_VIEW, "title": "SpineWatch: spinal metastasis red flags",
     "description": "When a chart opens: a patient with a known cancer and back pain or cord-compression "
                    "symptoms gets a card with the NICE NG234 tier (emergency: whole-spine MRI within 24 h; "
                    "urgent: within 1 week; routine: MRI, not X-ray) and a suggestion that proposes the MRI.",
     "prefetch": PREFETCH_TEMPLATES, "usageRequirements": _USAGE},
] + [
    {"hook": hook, "id": ORDER_IMAGING, "title": "SpineWatch: MRI, not X-ray, for spinal metastasis",
     "description": "When a plain X-ray of the spine is ordered for a patient with a known cancer and back pain, "
                    "a card following the tier (critical and 24 h for suspected cord compression, warning and 1 week, "
                    "info) saying why an X-ray cannot exclude metastasis, and a suggestion that replaces it with a "
                    "whole-spine MRI.",
     "prefetch": PREFETCH_TEMPLATES, "usageRequirements": _USAGE}
    for hook in ("order-select", "order-sign")
]
# A record this large is evaluated in a worker thread, so one big chart does not stall the event
# loop for every other caller; small ones run inline (no thread hop on the latency path).
_INLINE_EVALUATION_MAX_RESOURCES = 500
_SERVICE_REQUEST_INTENTS = {"proposal", "plan", "directive", "order", "original-order", "reflex-order",
                            "filler-order", "instance-order", "option"}

router = APIRouter(tags=["cds-hooks"])



# ---------------------------------------------------------------------------------------------
# Wiring


@dataclass
class HookRuntime:
    settings: Settings
    verifier: JwtVerifier | None  # None: verification switched off (development only)
    allowed_hosts: frozenset[str]
    stored: StoredAssessments | None = None
    fhir_transport: httpx.AsyncBaseTransport | None = None  # tests and the bench may inject one
    terminology: TerminologyServer | None = None  # SPINEWATCH_TERMINOLOGY_URL unset: none
    evidence: EvidenceLinks | None = None  # the cards' "Full evidence" links; None: no links


def register(app: FastAPI) -> None:
    """Mount the CDS Hooks routes and their CORS policy on `app` (called once by create_app)."""
    settings: Settings = app.state.settings
    issuers = parse_trusted_issuers(settings.cds_trusted_issuers, settings.environment)
    verifier = None
    if settings.cds_verify_jwt:
        replay = RedisReplayCache(settings.cds_jti_redis_url) if settings.cds_jti_redis_url else MemoryReplayCache()
        verifier = JwtVerifier(issuers, jwks=JwksCache(ttl=settings.cds_jwks_cache_seconds), replay=replay,
                               clock_skew=settings.jwt_clock_skew_seconds,
                               max_lifetime=settings.jwt_max_lifetime_seconds)
        if not issuers:
            log.warning("cds.no_trusted_issuers", detail="every CDS Hooks call will be refused (401); "
                                                          "set SPINEWATCH_CDS_TRUSTED_ISSUERS")
    else:  # settings.py refuses this in production
        log.warning("cds.jwt_verification_off", detail="DEVELOPMENT ONLY: CDS Hooks callers are NOT authenticated "
                                                       "(SPINEWATCH_CDS_VERIFY_JWT=false)")
    if settings.environment == "production" and not settings.public_base_url:
        log.warning("cds.public_base_url_unset", detail="JWT aud is checked against the Host header; set "
                                                        "SPINEWATCH_PUBLIC_BASE_URL")
    app.state.cds_hooks = HookRuntime(settings, verifier, parse_hosts(settings.fhir_allowed_hosts),
                                      stored=default_source(settings),
                                      terminology=TerminologyServer.from_settings(settings),
                                      evidence=EvidenceLinks.from_settings(settings))
    app.include_router(router)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # 2.0 §Cross-Origin Resource Sharing: browser-based CDS clients need it
        app.add_middleware(_CdsHooksCors, origins=origins)


class _CdsHooksCors:
    """CORS for /cds-services only: the rest of the API is not for browser-based CDS clients."""

    def __init__(self, app, origins: list[str]):
        self.app = app
        # No credentials: CDS clients authenticate with a bearer JWT, never cookies (OWASP HTML5
        # cheat sheet, CORS).
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                                   allow_headers=["Authorization", "Content-Type"], max_age=600)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/cds-services"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def runtime(request: Request) -> HookRuntime:
    return request.app.state.cds_hooks


# ---------------------------------------------------------------------------------------------
# Authentication (service/infra/jwt.py does the checking)


def expected_audience(request: Request, public_base_url: str | None) -> str:
    """2.0 "Trusting CDS Clients": `aud` is the URL of the endpoint being invoked. Behind a proxy the
    URL the client called is SPINEWATCH_PUBLIC_BASE_URL + the path under this app."""
    path = request.scope["path"]
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    base = public_base_url or str(request.base_url)
    return base.rstrip("/") + path


async def cds_client(request: Request) -> CdsClient:
    """FastAPI dependency: the authenticated CDS client, or a bare 401."""
    rt = runtime(request)
    if rt.verifier is None:
        return CdsClient(iss="unverified", verified=False)
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    try:
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthError("no-bearer")
        return await rt.verifier.verify(credentials.strip(), expected_audience(request, rt.settings.public_base_url))
    except AuthError as exc:
        # The route template, not the raw path: the caller chose the path, and it may carry any text.
        route = getattr(request.scope.get("route"), "path", "/cds-services")
        log.warning("cds.auth_failed", reason=exc.reason, path=route, iss=exc.iss)
        AUTH_FAILURES.labels(surface="cds-hooks", reason=exc.reason).inc()
        audit.audit_event("auth-failure", "failure", actor=exc.iss or "unknown",
                          detail={"surface": "cds-hooks", "reason": exc.reason, "path": route})
        raise Unauthorized(exc.reason) from None  # the handler answers a bare 401: the reason stays here
    except ReplayCacheUnavailable:
        raise ServiceUnavailable("the JWT replay cache is unavailable; retry") from None


Client = Depends(cds_client)


# ---------------------------------------------------------------------------------------------
# Request bodies (unknown fields and `extension` are accepted: 2.0 §Extensions)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FhirAuthorization(_Open):
    access_token: str = Field(min_length=1, repr=False)
    token_type: str = Field(pattern="(?i)^bearer$")
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class HookRequest(_Open):
    hook: str = Field(min_length=1, max_length=100)
    hookInstance: str = Field(min_length=1, max_length=200)
    fhirServer: str | None = Field(None, min_length=1)
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _server_with_authorization(self) -> "HookRequest":
        # CDSHooksRequest invariant cds-r-1: fhirAuthorization implies fhirServer.
        if self.fhirAuthorization is not None and not self.fhirServer:
            raise ValueError("fhirAuthorization requires fhirServer")
        return self


FHIR_ID = r"^[A-Za-z0-9\-.]{1,64}$"  # FHIR R4 id: also keeps the id safe inside a FHIR URL


class PatientViewContext(_Open):
    userId: str = Field(min_length=1)
    patientId: str = Field(pattern=FHIR_ID)
    encounterId: str | None = None


class OrderSignContext(PatientViewContext):
    draftOrders: dict[str, Any]

    @model_validator(mode="after")
    def _bundle(self):
        if self.draftOrders.get("resourceType") != "Bundle":
            raise ValueError("draftOrders must be a FHIR Bundle")
        return self


class OrderSelectContext(OrderSignContext):
    selections: list[str] = Field(min_length=1)


CONTEXTS = {"patient-view": PatientViewContext, "order-select": OrderSelectContext, "order-sign": OrderSignContext}


class Coding(_Open):
    code: str = Field(min_length=1)
    system: str | None = None
    display: str | None = None


class OverrideReason(_Open):
    reason: Coding | None = None
    userComment: str | None = None  # free text: accepted, never stored


class AcceptedSuggestion(_Open):
    id: str = Field(min_length=1)


class Feedback(_Open):
    card: str = Field(min_length=1, max_length=200)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: datetime

    @model_validator(mode="after")
    def _consistent(self) -> "Feedback":
        if self.outcome == "accepted" and not self.acceptedSuggestions:
            raise ValueError("acceptedSuggestions is required for accepted outcomes")
        if self.outcome == "overridden" and self.acceptedSuggestions:
            raise ValueError("an overridden card has no accepted suggestions")
        if self.outcomeTimestamp.tzinfo is None:
            raise ValueError("outcomeTimestamp must be UTC (RFC 3339 with Z or an offset)")
        return self


class FeedbackRequest(_Open):
    feedback: list[Feedback] = Field(min_length=1)


def _validate(model: type[BaseModel], data: object, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Name the fields and the rule, never the values (they may be patient data or tokens).
        problems = sorted({".".join([where, *map(str, e["loc"])]).rstrip(".") + ": " + e["msg"] for e in exc.errors()})
        raise InvalidRequest("; ".join(problems[:5])) from None


async def read_json(request: Request, limit: int) -> object:
    """The JSON body, refusing more than `limit` bytes before reading it all (413)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:  # nested deeper than the parser's recursion limit: a 400, not a 500
        raise InvalidRequest("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None


# ---------------------------------------------------------------------------------------------
# Routes


@router.get("/cds-services")
async def discovery(client: CdsClient = Client) -> dict:
    return {"services": SERVICES}


_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _loggable_id(value: str) -> str:
    """hookInstance is a UUID (2.0 §HTTP Request); anything else may be free text: not logged."""
    return value if _ID.match(value) else "(not an id)"


@router.post("/cds-services/{service_id}")
async def call_service(service_id: str, request: Request, client: CdsClient = Client) -> JSONResponse:
    now = datetime.now(timezone.utc)  # the evaluation time is the request time, passed to the pure core
    started = time.perf_counter()
    hook = hook_instance = None
    service = service_id if service_id in HOOKS_BY_SERVICE else "(unknown)"  # never log the caller's text
    try:
        if service_id not in HOOKS_BY_SERVICE:
            raise NotFound("no such CDS service here; see GET /cds-services")
        rt = runtime(request)
        body = await read_json(request, rt.settings.max_body_bytes)
        req: HookRequest = _validate(HookRequest, body, "")
        # Logged and audited: only values we recognise (a caller can put anything in these strings).
        hook, hook_instance = (req.hook if req.hook in KNOWN_HOOKS else "(unknown)"), _loggable_id(req.hookInstance)
        if req.hook not in KNOWN_HOOKS:
            raise InvalidRequest(f"unknown hook; this server answers {', '.join(KNOWN_HOOKS)}")
        if req.hook not in HOOKS_BY_SERVICE[service_id]:
            raise InvalidRequest(f"service {service_id} does not answer {req.hook}")
        context = _validate(CONTEXTS[req.hook], req.context, "context")
        patient = f"Patient/{context.patientId}"
        # Who a full-evidence link is issued to: its page's audit record names them (never the token).
        issued = {"iss": client.iss, "service": service_id, "hook": req.hook, "hookInstance": hook_instance,
                  "patient": patient}
        if req.hook == "patient-view":
            assessment, source = await _assessment(rt, req, context.patientId, now)
            link = await _evidence_url(rt, assessment, now, issued)
            cards = cards_for(assessment, now, rt.settings.card_intent, settings=card_settings(rt.settings),
                              evidence_url=link)
        else:
            cards, assessment, source, link = await _order_cards(rt, req, context, now, issued)
    except SpineWatchError as exc:
        log.info("cds.hook_refused", service=service, hook=hook, hookInstance=hook_instance,
                 status=exc.status_code, reason=exc.message)
        raise

    for card in cards:
        CARDS_SERVED.labels(hook=req.hook, indicator=card["indicator"]).inc()
    if cards:  # a queue put in a serving process: service/infra/audit/writer.py writes it off the request path
        audit.audit_event("card", "success", actor=client.iss, patient=patient, detail={
            "service": service_id, "hook": req.hook, "hookInstance": hook_instance,
            "cards": [c["uuid"] for c in cards],
            "suggestions": [s["uuid"] for c in cards for s in c.get("suggestions", [])],
            "tier": assessment.urgency if assessment else None, "source": source,
        } | ({"evidence_link": True} if link and cards else {}))
    log.info("cds.hook", service=service_id, hook=req.hook, hookInstance=hook_instance, status=200,
             cards=len(cards), tier=assessment.urgency if assessment else None, source=source,
             ms=round((time.perf_counter() - started) * 1000, 1))
    return JSONResponse({"cards": cards})


@router.post("/cds-services/{service_id}/feedback")
async def feedback(service_id: str, request: Request, client: CdsClient = Client) -> Response:
    if service_id not in HOOKS_BY_SERVICE:
        raise NotFound("no such CDS service here; see GET /cds-services")  # the caller's text is not echoed
    body = await read_json(request, runtime(request).settings.max_body_bytes)
    items: FeedbackRequest = _validate(FeedbackRequest, body, "")
    for item in items.feedback:
        detail: dict[str, Any] = {"service": service_id, "card": item.card,
                                  "outcomeTimestamp": item.outcomeTimestamp.isoformat()}
        if item.acceptedSuggestions:
            detail["acceptedSuggestions"] = [s.id for s in item.acceptedSuggestions]
        if item.overrideReason and item.overrideReason.reason:
            reason = item.overrideReason.reason
            detail["overrideReason"] = {"system": reason.system, "code": reason.code}
        audit.audit_event("feedback", item.outcome, actor=client.iss, detail=detail)
    log.info("cds.feedback", service=service_id, items=len(items.feedback), status=200)
    return Response(status_code=200)


# ---------------------------------------------------------------------------------------------
# Data and evaluation


async def _assessment(rt: HookRuntime, req: HookRequest, patient_id: str, now: datetime) -> tuple[Assessment, str]:
    """The patient's assessment at `now` and where its data came from (prefetch, fhir, stored)."""
    patient = f"Patient/{patient_id}"
    client, unusable = None, None
    if req.fhirServer:
        try:
            client = FhirClient(req.fhirServer, req.fhirAuthorization.access_token if req.fhirAuthorization else None,
                                rt.allowed_hosts, require_https=rt.settings.environment == "production",
                                transport=rt.fhir_transport, timeout=rt.settings.hook_timeout_seconds)
        except FhirAccessError as exc:  # matters only if the prefetch is incomplete
            unusable = str(exc)
    try:
        gathered = await gather(req.prefetch, patient_id, client, timeout=rt.settings.hook_timeout_seconds,
                                binary_reads=rt.settings.note_max_binary_reads,
                                binary_max_bytes=rt.settings.note_max_bytes)
    except PreconditionFailed as exc:
        raise PreconditionFailed(f"{exc.message} ({unusable})" if unusable else exc.message) from None
    finally:
        if client is not None:
            await client.aclose()

    if gathered is None:
        if req.fhirServer:  # a fhirServer was given but cannot be used, and nothing was prefetched
            raise PreconditionFailed(f"no prefetch, and fhirServer cannot be used ({unusable})")
        return await _stored_assessment(rt, patient, now), "stored"

    # Only this patient's resources: prefetch and search results must be about the patient in context.
    # A Binary names no patient: it goes with this patient's notes that point at it.
    resources, seen = [], set()
    for resource in gathered.resources:
        if patient_key(resource) != patient:
            continue
        key = (resource.get("resourceType"), resource.get("id"))
        if key[1] is not None and key in seen:
            continue
        seen.add(key)
        resources.append(resource)
    wanted = referenced_binaries(resources)
    for resource in gathered.resources:
        key = ("Binary", resource.get("id"))
        if resource.get("resourceType") == "Binary" and f"Binary/{key[1]}" in wanted and key not in seen:
            seen.add(key)
            resources.append(resource)
    settings = evaluation_settings(rt.settings)
    consulted = await consult(rt.terminology, resources)  # bounded; on failure the local sets alone
    started = time.perf_counter()
    if len(resources) <= _INLINE_EVALUATION_MAX_RESOURCES:
        assessment = assess(resources, now, settings, terminology=consulted.terminology)
    else:
        assessment = await run_in_threadpool(assess, resources, now, settings, terminology=consulted.terminology)
    consulted.note(assessment)
    EVALUATION_SECONDS.labels(origin="hook").observe(time.perf_counter() - started)
    EVALUATIONS.labels(tier=assessment.urgency, origin="hook").inc()
    assessment.patient = patient  # the context names the patient (clinical identifiers get no defaults)
    return assessment, gathered.source


async def _stored_assessment(rt: HookRuntime, patient: str, now: datetime) -> Assessment:
    max_age = rt.settings.stored_assessment_max_age_seconds
    data = None
    if rt.stored is not None and max_age > 0:
        try:
            data = await run_in_threadpool(rt.stored.get, patient)
        except Exception as exc:  # Redis down: same as having none
            log.warning("cds.stored_assessment_unavailable", error=type(exc).__name__)
    assessment = fresh_assessment(data, now, max_age)
    if assessment is None or assessment.patient not in (None, patient):
        raise PreconditionFailed(f"no prefetch and no fhirServer, and no stored assessment of the patient younger "
                                 f"than {max_age} s")
    assessment.patient = patient
    return assessment


async def _evidence_url(rt: HookRuntime, assessment: Assessment, now: datetime, issued: dict,
                        xray: bool = False) -> str | None:
    """The card's full-evidence link: the page stored under a new token. None when links are off
    (or SPINEWATCH_PUBLIC_BASE_URL unset), for tier none, or when the store fails (logged there)."""
    if rt.evidence is None or assessment.urgency == "none":
        return None
    view = evidence_view(assessment, now, xray=xray, settings=card_settings(rt.settings))
    if isinstance(rt.evidence.store, MemoryEvidenceStore):  # no I/O: no thread hop on the latency path
        return rt.evidence.issue(view, issued)
    return await run_in_threadpool(rt.evidence.issue, view, issued)


async def _order_cards(rt: HookRuntime, req: HookRequest, context: OrderSignContext, now: datetime,
                       issued: dict) -> tuple[list[dict], Assessment | None, str | None, str | None]:
    """order-select / order-sign: a warning when a plain spine X-ray is being ordered for an
    in-scope patient (NG234: X-ray must not be used to diagnose or exclude spinal metastases).
    Answers (cards, assessment, source, the full-evidence link or None)."""
    patient = f"Patient/{context.patientId}"
    drafts = [r for r in draft_resources(context.draftOrders) if patient_key(r) in (None, patient)]
    kinds = [classify_order(r) for r in drafts]
    if MRI_SPINE in kinds:  # the right test is already being ordered
        return [], None, None, None
    # order-select: "selections" are the orders just chosen; the others were seen by earlier calls.
    chosen = set(context.selections) if isinstance(context, OrderSelectContext) else None
    xrays = [r for r, kind in zip(drafts, kinds)
             if kind == XRAY_SPINE and (chosen is None or reference(r) in chosen)]
    if not xrays:  # nothing to challenge: no data needed, so none is fetched
        return [], None, None, None
    assessment, source = await _assessment(rt, req, context.patientId, now)
    if assessment.urgency == "none":  # out of scope, or an MRI done since the evidence
        return [], assessment, source, None
    refs = [ref for ref in (reference(r) for r in xrays) if ref]
    intent = xrays[0].get("intent")
    intent = intent if intent in _SERVICE_REQUEST_INTENTS else "order"  # the MRI replaces the X-ray in kind
    link = await _evidence_url(rt, assessment, now, issued, xray=True)
    card = xray_card(assessment, refs, now, intent, settings=card_settings(rt.settings), evidence_url=link)
    return [card], assessment, source, link
