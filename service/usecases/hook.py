"""A CDS Hooks call answered: gather the patient's data, assess it at the request time, build the
cards (CDS Hooks 2.0, https://cds-hooks.hl7.org/2.0/). Plain functions; the collaborators come in
a `HookServices` made once by the composition root.

Data, in order (service/infra/fhir/fetch.py): the prefetch, else the CDS client's `fhirServer`, else
a stored assessment younger than SPINEWATCH_STORED_ASSESSMENT_MAX_AGE_SECONDS. Data that cannot be
had, or is not FHIR R4 (a DSTU2 prefetch or fhirServer: fhir_mappings/fhir/versions.py), is
PreconditionFailed (2.0: "the service SHALL respond with an HTTP 412"), never "no cards".

Time budgets, one per stage, so a hook call never hangs the EHR: fetching (SPINEWATCH_HOOK_TIMEOUT_
SECONDS), the terminology server (SPINEWATCH_TERMINOLOGY_BUDGET_SECONDS: then the local sets alone),
and the evaluation itself (SPINEWATCH_HOOK_EVALUATION_TIMEOUT_SECONDS): `assess` is CPU-bound and runs
in a worker thread; past its budget the call is answered 412 with an OperationOutcome naming the
budget (docs/cds-hooks.md). Python cannot stop a thread: the abandoned evaluation runs on to its end
in the background, in anyio's bounded thread pool, and its result is dropped.
SNOMED CT codes the local value sets do not know are first asked of the optional terminology
server (service/infra/fhir/terminology.py), within its time budget.

    patient-view               the tier card (fhir_mappings.cds.cards.cards_for)
    order-select / order-sign  a card challenging a plain spine X-ray for an in-scope patient
                               (NICE NG234: X-ray must not be used to diagnose or exclude spinal
                               metastases), with a suggestion that replaces it with a whole-spine MRI

A card may carry a "Full evidence" link (service/infra/evidence_links.py); a card never fails for
want of it. Cards served are audited (kind `card`); the fhirAuthorization token is never logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

import anyio
import httpx
import structlog
from anyio import to_thread

from fhir_mappings.cds.cards import cards_for, xray_card
from fhir_mappings.cds.evidence_view import evidence_view
from fhir_mappings.cds.wording import CardSettings
from fhir_mappings.clinical.evaluate import Assessment, EvaluationSettings, assess
from fhir_mappings.clinical.terminology import load_terminology
from fhir_mappings.clinical.orders import MRI_SPINE, XRAY_SPINE, classify_order, draft_resources, reference
from fhir_mappings.fhir.bundle import patient_key
from service.core.errors import PreconditionFailed
from service.core.metrics import CARDS_SERVED, EVALUATION_SECONDS, EVALUATIONS
from service.core.settings import Settings, card_settings, evaluation_settings
from service.infra.audit.writer import AuditLog
from service.infra.evidence_links import EvidenceLinks, MemoryEvidenceStore
from service.infra.fhir.binaries import referenced_binaries
from service.core.errors import FHIRAccessError
from service.infra.fhir.async_client import AsyncFHIRClient
from service.infra.fhir.fetch import ServerReleases, gather, refuse_pre_r4
from service.infra.fhir.terminology import TerminologyServer, consult
from service.infra.assessments import StoredAssessments, fresh_assessment

log = structlog.get_logger("spinewatch.cds_hooks")

# FHIR R4 ServiceRequest.intent codes: the MRI suggestion takes the X-ray's intent.
SERVICE_REQUEST_INTENTS = {"proposal", "plan", "directive", "order", "original-order", "reflex-order",
                           "filler-order", "instance-order", "option"}


@dataclass
class HookServices:
    settings: Settings
    allowed_hosts: frozenset[str]  # SPINEWATCH_FHIR_ALLOWED_HOSTS: the only fhirServer hosts called
    stored: StoredAssessments | None = None
    terminology: TerminologyServer | None = None  # SPINEWATCH_TERMINOLOGY_URL unset: none
    evidence: EvidenceLinks | None = None  # the cards' "Full evidence" links; None: no links
    fhir_transport: httpx.AsyncBaseTransport | None = None  # tests and the bench may inject one
    releases: ServerReleases = field(default_factory=ServerReleases)  # each fhirServer's FHIR release, remembered

    # Derived from the settings once per process, not once per call.
    @cached_property
    def card_wording(self) -> CardSettings:
        return card_settings(self.settings)

    @cached_property
    def evaluation_rules(self) -> EvaluationSettings:
        return evaluation_settings(self.settings)


@dataclass(frozen=True)
class HookCall:
    """One validated hook request, in plain values."""

    service_id: str
    hook: str  # patient-view | order-select | order-sign
    hook_instance: str  # as logged: the id, or "(not an id)"
    patient_id: str
    fhir_server: str | None = None
    access_token: str | None = field(default=None, repr=False)  # fhirAuthorization: never logged
    prefetch: dict | None = None
    draft_orders: dict | None = None  # order-select / order-sign
    selections: list[str] | None = None  # order-select only: the orders just chosen

    @property
    def patient(self) -> str:
        return f"Patient/{self.patient_id}"


@dataclass
class HookAnswer:
    cards: list[dict]
    assessment: Assessment | None = None
    source: str | None = None  # prefetch | fhir | stored
    link: str | None = None  # the full-evidence link, when a card carries one


async def answer(services: HookServices, audit: AuditLog, call: HookCall, *, iss: str, now: datetime) -> HookAnswer:
    """The cards for `call` from the CDS client `iss`, evaluated at `now`; counted and audited."""
    # Who a full-evidence link is issued to: its page's audit record names them (never the token).
    issued = {"iss": iss, "service": call.service_id, "hook": call.hook, "hookInstance": call.hook_instance,
              "patient": call.patient}
    if call.hook == "patient-view":
        assessment, source = await assess_patient(services, call, now)
        link = await evidence_url(services, assessment, now, issued)
        cards = cards_for(assessment, now, services.settings.card_intent, settings=services.card_wording,
                          evidence_url=link)
        result = HookAnswer(cards, assessment, source, link)
    else:
        result = await order_cards(services, call, now, issued)
    for card in result.cards:
        CARDS_SERVED.labels(hook=call.hook, indicator=card["indicator"]).inc()
    if result.cards:  # a serving process's AuditLog writes it off the request path
        audit.event("card", "success", actor=iss, patient=call.patient, detail={
            "service": call.service_id, "hook": call.hook, "hookInstance": call.hook_instance,
            "cards": [c["uuid"] for c in result.cards],
            "suggestions": [s["uuid"] for c in result.cards for s in c.get("suggestions", [])],
            "tier": result.assessment.urgency if result.assessment else None, "source": result.source,
        } | ({"evidence_link": True} if result.link else {}))
    return result


async def assess_patient(services: HookServices, call: HookCall, now: datetime) -> tuple[Assessment, str]:
    """The patient's assessment at `now` and where its data came from (prefetch, fhir, stored)."""
    settings = services.settings
    client, unusable = None, None
    if call.fhir_server:
        try:
            client = AsyncFHIRClient(call.fhir_server, call.access_token, services.allowed_hosts,
                                require_https=settings.environment == "production",
                                transport=services.fhir_transport, timeout=settings.hook_timeout_seconds)
        except FHIRAccessError as exc:  # matters only if the prefetch is incomplete
            unusable = str(exc)
    try:
        gathered = await gather(call.prefetch, call.patient_id, client, releases=services.releases,
                                timeout=settings.hook_timeout_seconds,
                                binary_reads=settings.note_max_binary_reads,
                                binary_max_bytes=settings.note_max_bytes)
    except PreconditionFailed as exc:
        raise PreconditionFailed(f"{exc.message} ({unusable})" if unusable else exc.message) from None
    finally:
        if client is not None:
            await client.aclose()

    if gathered is None:
        if call.fhir_server:  # a fhirServer was given but cannot be used, and nothing was prefetched
            raise PreconditionFailed(f"no prefetch, and fhirServer cannot be used ({unusable})")
        return await stored_assessment(services, call.patient, now), "stored"

    resources = patients_own(gathered.resources, call.patient)
    consulted = await consult(services.terminology, resources)  # bounded; on failure the local sets alone
    rules = services.evaluation_rules
    started = time.perf_counter()
    assessment = await evaluate_within_budget(
        lambda: assess(resources, now, rules, terminology=consulted.terminology),
        settings.hook_evaluation_timeout_seconds, len(resources))
    consulted.note(assessment)
    EVALUATION_SECONDS.labels(origin="hook").observe(time.perf_counter() - started)
    EVALUATIONS.labels(tier=assessment.urgency, origin="hook").inc()
    assessment.patient = call.patient  # the context names the patient (clinical identifiers get no defaults)
    return assessment, gathered.source


# A record this small is evaluated inline, on the event loop: a few milliseconds, less than the
# thread hop costs, and far inside any budget. A larger one runs in a worker thread under the budget,
# so one big chart neither stalls the other callers nor hangs its own. (Running every evaluation in
# a thread also let concurrent first validations of a fresh process's FHIR models pile up in the
# pool until calls timed out: bench/hooks.py at 16 connections.)
INLINE_EVALUATION_MAX_RESOURCES = 500


async def evaluate_within_budget(evaluate, budget: float, resources: int) -> Assessment:
    """`evaluate()` in a worker thread (the event loop keeps serving other callers), or
    PreconditionFailed once `budget` seconds have passed: the EHR gets an answer, never a hang.
    The one-off compilation of the clinical vocabulary (done at start-up by the app's lifespan) is
    not the evaluation's: a process that has not compiled it yet does so first, outside the budget."""
    # On the event loop, so the first caller compiles (the app's lifespan normally has) and every
    # concurrent caller finds it compiled: the cache is not single-flight, and in threads each
    # concurrent first caller compiled its own copy until 16 connections timed out (bench/hooks.py).
    load_terminology()
    if resources <= INLINE_EVALUATION_MAX_RESOURCES:
        return evaluate()  # milliseconds: no thread hop on the latency path (see the constant)
    with anyio.move_on_after(budget) as scope:
        return await to_thread.run_sync(evaluate, abandon_on_cancel=True)
    if not scope.cancelled_caught:  # pragma: no cover - the body returns unless cancelled
        raise RuntimeError("evaluation neither finished nor timed out")
    log.warning("cds.evaluation_over_budget", budget_seconds=budget, resources=resources)
    raise PreconditionFailed(f"the evaluation did not finish within its time budget of {budget:g} s "
                             f"(SPINEWATCH_HOOK_EVALUATION_TIMEOUT_SECONDS); no decision could be made")


def patients_own(gathered: list[dict], patient: str) -> list[dict]:
    """Only this patient's resources, once each: prefetch and search results must be about the
    patient in context. A Binary names no patient: it goes with this patient's notes that point at it."""
    resources, seen = [], set()
    for resource in gathered:
        if patient_key(resource) != patient:
            continue
        key = (resource.get("resourceType"), resource.get("id"))
        if key[1] is not None and key in seen:
            continue
        seen.add(key)
        resources.append(resource)
    wanted = referenced_binaries(resources)
    for resource in gathered:
        key = ("Binary", resource.get("id"))
        if resource.get("resourceType") == "Binary" and f"Binary/{key[1]}" in wanted and key not in seen:
            seen.add(key)
            resources.append(resource)
    return resources


async def stored_assessment(services: HookServices, patient: str, now: datetime) -> Assessment:
    max_age = services.settings.stored_assessment_max_age_seconds
    data = None
    if services.stored is not None and max_age > 0:
        try:
            data = await to_thread.run_sync(services.stored.get, patient)
        except Exception as exc:  # Redis down: same as having none
            log.warning("cds.stored_assessment_unavailable", error=type(exc).__name__)
    assessment = fresh_assessment(data, now, max_age)
    if assessment is None or assessment.patient not in (None, patient):
        raise PreconditionFailed(f"no prefetch and no fhirServer, and no stored assessment of the patient younger "
                                 f"than {max_age} s")
    assessment.patient = patient
    return assessment


async def evidence_url(services: HookServices, assessment: Assessment, now: datetime, issued: dict,
                       xray: bool = False) -> str | None:
    """The card's full-evidence link: the page stored under a new token. None when links are off
    (or SPINEWATCH_PUBLIC_BASE_URL unset), for tier none, or when the store fails (logged there)."""
    links = services.evidence
    if links is None or assessment.urgency == "none":
        return None
    view = evidence_view(assessment, now, xray=xray, settings=services.card_wording)
    if isinstance(links.store, MemoryEvidenceStore):  # no I/O: no thread hop on the latency path
        return links.issue(view, issued)
    return await to_thread.run_sync(links.issue, view, issued)


async def order_cards(services: HookServices, call: HookCall, now: datetime, issued: dict) -> HookAnswer:
    """order-select / order-sign: a warning when a plain spine X-ray is being ordered for an
    in-scope patient. Draft orders of a release before R4 (a DSTU2 ProcedureRequest) are a 412: read
    as R4 they would never be challenged."""
    drafts = draft_resources(call.draft_orders)
    refuse_pre_r4(drafts, "context.draftOrders")
    drafts = [r for r in drafts if patient_key(r) in (None, call.patient)]
    kinds = [classify_order(r) for r in drafts]
    if MRI_SPINE in kinds:  # the right test is already being ordered
        return HookAnswer([])
    # order-select: "selections" are the orders just chosen; the others were seen by earlier calls.
    chosen = set(call.selections) if call.selections is not None else None
    xrays = [r for r, kind in zip(drafts, kinds)
             if kind == XRAY_SPINE and (chosen is None or reference(r) in chosen)]
    if not xrays:  # nothing to challenge: no data needed, so none is fetched
        return HookAnswer([])
    assessment, source = await assess_patient(services, call, now)
    if assessment.urgency == "none":  # out of scope, or an MRI done since the evidence
        return HookAnswer([], assessment, source)
    refs = [ref for ref in (reference(r) for r in xrays) if ref]
    intent = xrays[0].get("intent")
    intent = intent if intent in SERVICE_REQUEST_INTENTS else "order"  # the MRI replaces the X-ray in kind
    link = await evidence_url(services, assessment, now, issued, xray=True)
    card = xray_card(assessment, refs, now, intent, settings=services.card_wording, evidence_url=link)
    return HookAnswer([card], assessment, source, link)
