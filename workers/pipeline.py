"""What the tasks do: load from FHIR → pure evaluation → write back. Each function is safe to run
twice (a redelivered or retried task): it reads current data and overwrites its own outputs.

    evaluate_patient   fetch the patient's record, (optionally) ask the terminology server about
                       unknown SNOMED CT codes, assess, store, hand to the alerting step
    resolve_focus      id-only notification: read the focus resource to learn whose it is
    catch_up           missed or empty events: $events, else _lastUpdated since the last event seen
    reconcile          safety net: everything changed since the last sweep (_lastUpdated)
    watchdog           Subscriptions gone quiet: $status (backport) or a read (classic); re-request
                       one the server put in error; evaluations queued but never started: again

Errors propagate: service.infra.fhir.client errors say whether they are transient (tasks.py retries
those) or permanent (dead letter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import structlog

from fhir_mappings.fhir.bundle import patient_key
from fhir_mappings.clinical.evaluate import Assessment, assess
from fhir_mappings.fhir.notifications import (NotificationError, event_key, missing_event_numbers, parse_notification,
                                         parse_status_bundle)
from service.infra.assessments import AssessmentStore
from service.infra.audit.writer import audit_event
from service.infra.fhir.client import FHIRBadRequest, FHIRClient, FHIRError, FHIRNotFound, FHIRNotSupported
from service.core.metrics import EVALUATION_SECONDS, EVALUATIONS
from service.infra.fhir.binaries import plan_binaries
from service.infra.queue import TASK_CATCH_UP, WorkQueue, redis_client
from service.core.settings import Settings, evaluation_settings, get_settings
from service.infra.fhir.terminology import TerminologyServer, consult_sync

log = structlog.get_logger("spinewatch.pipeline")

PAGE_SIZE = "200"
MAX_FOCUS_READS = 20
# Searched, but not every server offers them (sekmet-fhir 0.1.1 has no ClinicalImpression search
# parameters; several EHRs have no ClinicalImpression at all): a refusal leaves them out of the
# record rather than failing every evaluation. Everything else a refusal fails, as before.
OPTIONAL_TYPES = ("ClinicalImpression",)
# A server that does not know a search parameter may ignore it (R4 §3.1.1.5.7 lenient handling),
# answering with every patient's resources: these newer searches keep only the patient's own.
PATIENT_CHECKED_TYPES = ("DocumentReference", "ClinicalImpression")
# _lastUpdated sweeps start this much before the last event seen: the server's clock and ours
# differ, and an event is delivered some time after the write it reports.
SWEEP_MARGIN = timedelta(minutes=5)


@dataclass
class Deps:
    settings: Settings
    fhir: FHIRClient
    queue: WorkQueue
    store: AssessmentStore
    terminology: TerminologyServer | None = None  # SPINEWATCH_TERMINOLOGY_URL unset: none


_deps: Deps | None = None


def deps() -> Deps:
    """One set per worker process, made on first use (after the prefork, so no connection is
    shared between processes)."""
    global _deps
    if _deps is None:
        settings = get_settings()
        conn = redis_client(settings.redis_url, timeout=5)
        fhir = FHIRClient.from_settings(settings)
        _deps = Deps(settings, fhir, WorkQueue(settings, conn), AssessmentStore(conn),
                     TerminologyServer.from_settings(settings, auth=fhir.auth))
    return _deps


def _instant(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ---------------- the record ----------------

def record_queries(patient_id: str, window_start: datetime) -> list[tuple[str, list[tuple[str, str]]]]:
    """The searches that fetch everything the rules read (fhir_mappings/clinical/facts.py MODELS).

    Conditions and ServiceRequests at any date: a cancer counts "current or past" (NG234 Box 2), and
    an MRI ordered long ago may still be pending. Observations, DiagnosticReports, Procedures and the
    notes (DocumentReference, ClinicalImpression) are many, and only recent ones can count
    (NG234 1.1 (recent spinal pain)), so they are limited to the lookback window, twice: by clinical date
    (`date`) and by `_lastUpdated`, because the rules use the latest of several dates
    (Observation.issued, a note's context.period) and `date` searches only one of them (and a note
    without `date` is found only by the second)."""
    since = "ge" + _instant(window_start)
    common = [("patient", patient_id), ("_count", PAGE_SIZE)]
    return [
        ("Condition", common),
        ("ServiceRequest", common),
        ("ImagingStudy", common),
        ("Observation", common + [("date", since)]),
        ("Observation", common + [("_lastUpdated", since)]),
        ("DiagnosticReport", common + [("date", since)]),
        ("DiagnosticReport", common + [("_lastUpdated", since)]),
        ("Procedure", common + [("date", since)]),
        ("Procedure", common + [("_lastUpdated", since)]),
        ("DocumentReference", common + [("date", since)]),
        ("DocumentReference", common + [("_lastUpdated", since)]),
        ("ClinicalImpression", common + [("date", since)]),
        ("ClinicalImpression", common + [("_lastUpdated", since)]),
    ]


def _newer(a: dict, b: dict) -> dict:
    """The later of two copies of one resource (versionId when numeric, else lastUpdated)."""
    va, vb = (a.get("meta") or {}).get("versionId"), (b.get("meta") or {}).get("versionId")
    if isinstance(va, str) and isinstance(vb, str) and va.isdigit() and vb.isdigit():
        return a if int(va) >= int(vb) else b
    la, lb = (a.get("meta") or {}).get("lastUpdated") or "", (b.get("meta") or {}).get("lastUpdated") or ""
    return a if la >= lb else b


def fetch_record(fhir: FHIRClient, patient: str, now: datetime, lookback_days: int,
                 focus: list[str] | tuple[str, ...] = (), *, note_max_bytes: int = 2_000_000,
                 max_binary_reads: int = 50) -> list[dict]:
    """The patient's resources as the rules need them. The focus resources of the notifications are
    read again at their current version (a payload may be older than the server's present state, and
    a search index may lag behind a write); a focus that is gone (404/410) is left out. Last, the
    Binaries the notes name by URL on this FHIR server are read (read_note_binaries)."""
    patient_id = patient.split("/", 1)[1]
    by_ref: dict[str, dict] = {patient: fhir.read("Patient", patient_id)}
    window_start = now - timedelta(days=lookback_days)
    refused: set[str] = set()
    for rtype, params in record_queries(patient_id, window_start):
        if rtype in refused:
            continue
        try:
            for resource in fhir.search(rtype, params):
                if rtype in PATIENT_CHECKED_TYPES and resource.get("resourceType") == rtype \
                        and patient_key(resource) != patient:
                    continue
                ref = f"{resource.get('resourceType')}/{resource.get('id')}"
                by_ref[ref] = _newer(resource, by_ref[ref]) if ref in by_ref else resource
        except (FHIRBadRequest, FHIRNotFound, FHIRNotSupported) as exc:
            if rtype not in OPTIONAL_TYPES:
                raise
            refused.add(rtype)
            log.info("fetch.optional_search_refused", type=rtype, status=exc.status)
    for ref in sorted(set(focus))[:MAX_FOCUS_READS]:
        rtype, _, rid = ref.partition("/")
        if ref == patient or not rid:
            continue
        try:
            current = fhir.read(rtype, rid)
        except FHIRNotFound:
            by_ref.pop(ref, None)  # deleted since: it no longer counts
            continue
        if patient_key(current) == patient:
            by_ref[ref] = _newer(current, by_ref[ref]) if ref in by_ref else current
    resources = list(by_ref.values())
    return resources + read_note_binaries(fhir, patient, resources, note_max_bytes, max_binary_reads)


def read_note_binaries(fhir: FHIRClient, patient: str, resources: list[dict], max_bytes: int,
                       limit: int) -> list[dict]:
    """The Binaries the notes (and report presentedForms) name by `url` on this FHIR server, read
    with the client's authentication: newest notes first, at most `limit`, each at most `max_bytes`
    (service/infra/fhir/binaries.py says which URLs qualify). One that is gone, too large, or refused is
    left out, and the core names its note in `problems` as not read; a transient failure propagates
    (the task is retried, as for any read). Logs carry references and counts, never content."""
    plan = plan_binaries(resources, fhir.base_url, limit)
    found: list[dict] = []
    skipped: dict[str, int] = {}
    for target, key in plan.fetch:
        try:
            binary = fhir.read_binary(target, max_bytes)
        except FHIRError as exc:
            if exc.transient:
                raise
            reason = {"FHIRTooLarge": "too-large", "FHIRNotFound": "gone"}.get(type(exc).__name__, "refused")
            skipped[reason] = skipped.get(reason, 0) + 1
            log.info("fetch.binary_skipped", patient=patient, binary=key, reason=reason)
            continue
        if isinstance(binary.get("id"), str) and binary["id"] != key.split("/", 1)[1]:
            skipped["wrong-id"] = skipped.get("wrong-id", 0) + 1
            log.warning("fetch.binary_wrong_id", patient=patient, binary=key)
            continue
        found.append(binary | {"id": key.split("/", 1)[1]})
    if plan.fetch or plan.over_cap or plan.elsewhere:
        log.info("fetch.binaries", patient=patient, read=len(found), over_cap=plan.over_cap,
                 not_on_server=plan.elsewhere, **{f"skipped_{k.replace('-', '_')}": n for k, n in skipped.items()})
    return found


# ---------------- evaluate ----------------

def evaluate_patient(d: Deps, patient: str, focus: list[str], trigger: dict, now: datetime) -> Assessment:
    # Clear the coalescing marker before reading: an event arriving from here on queues a new
    # evaluation, and every event before it is covered by the reads below.
    focus = sorted(set(focus) | set(d.queue.take_pending(patient)))
    started = time.perf_counter()
    resources = fetch_record(d.fhir, patient, now, d.settings.lookback_days, focus,
                             note_max_bytes=d.settings.note_max_bytes,
                             max_binary_reads=d.settings.note_max_binary_reads)
    consulted = consult_sync(d.terminology, resources)  # bounded; on failure the local sets alone
    assessment = assess(resources, now, evaluation_settings(d.settings), terminology=consulted.terminology)
    consulted.note(assessment)
    if assessment.patient is None:
        assessment.patient = patient
    revision = d.store.save(assessment.to_json(), seen=assessment.seen)
    EVALUATION_SECONDS.labels(origin="worker").observe(time.perf_counter() - started)
    EVALUATIONS.labels(tier=assessment.urgency, origin="worker").inc()
    audit_event("evaluation", "success", actor="worker", patient=patient, detail={
        "inputs": assessment.seen, "rule_versions": assessment.rule_versions, "tier": assessment.urgency,
        "flags": assessment.red_flags, "suppressed_by": assessment.suppressed_by, "problems": len(assessment.problems),
        "trigger": {k: v for k, v in trigger.items() if k in ("kind", "subscription", "event", "source")},
        "stored_revision": revision})
    log.info("evaluation", patient=patient, tier=assessment.urgency, flags=len(assessment.red_flags),
             resource_count=len(resources), revision=revision)
    if revision:
        _alert(assessment, d.settings)
    return assessment


def _alert(assessment: Assessment, settings: Settings) -> None:
    # The alerting step (issue 5). Stored first: an alert that fails and is retried re-evaluates,
    # and the alert's own de-duplication keeps it from telling the care team twice.
    from workers.alerts import alert_if_needed

    alert_if_needed(assessment, settings)


# ---------------- resolve, catch up, reconcile ----------------

def resolve_focus(d: Deps, focus: list[str], trigger: dict) -> list[str]:
    """id-only payload without the patient: read each focus resource to learn whose it is."""
    patients = []
    for ref in focus:
        rtype, _, rid = ref.partition("/")
        if rtype == "Patient":
            patients.append(ref)
            continue
        try:
            resource = d.fhir.read(rtype, rid)
        except FHIRNotFound:
            log.info("resolve.gone", focus=ref)
            continue
        patient = patient_key(resource)
        if patient is None:
            log.info("resolve.no_patient", focus=ref)
            continue
        d.queue.schedule_evaluation(patient, [ref], trigger)
        patients.append(patient)
    return patients


def catch_up(d: Deps, subscription: str, numbers: list[int], since: str | None, only_missing: bool,
             now: datetime) -> dict:
    """Find out what events `numbers` of `subscription` were about and evaluate those patients.
    only_missing: a gap; numbers that arrived meanwhile (out of order) are skipped."""
    wanted = [n for n in numbers if not (only_missing and d.queue.seen(event_key(subscription, n)))]
    if numbers and not wanted:
        log.info("catch_up.nothing_missing", subscription=subscription)
        return {"events": 0, "swept": False}
    trigger = {"kind": "catch-up", "subscription": subscription}
    handled: set[int] = set()
    if wanted:
        handled = _events_operation(d, subscription, wanted, trigger)
    swept = False
    if not wanted or set(wanted) - handled:
        # The server lacks $events (sekmet answers 404) or left events out: ask instead for what
        # changed since the last event seen (IG "Handling Errors": query by _lastUpdated).
        start = _parse_instant(since) or now - timedelta(seconds=max(d.settings.heartbeat_watchdog_seconds, 3600))
        sweep(d, start - SWEEP_MARGIN, trigger)
        swept = True
    d.queue.mark_seen([event_key(subscription, n) for n in wanted])
    log.info("catch_up", subscription=subscription, events=len(wanted), via_events=len(handled), swept=swept)
    return {"events": len(wanted), "via_events": len(handled), "swept": swept}


def _events_operation(d: Deps, subscription: str, wanted: list[int], trigger: dict) -> set[int]:
    """Subscription/$events (IG OperationDefinition backport-subscription-events): the notifications
    of event numbers eventsSinceNumber..eventsUntilNumber, id-only, as a history Bundle."""
    params = {"eventsSinceNumber": str(min(wanted)), "eventsUntilNumber": str(max(wanted)), "content": "id-only"}
    try:
        bundle = d.fhir.get(f"{subscription}/$events", params=params, what="$events")
        note = parse_notification(bundle)
    except (FHIRNotFound, FHIRNotSupported, FHIRBadRequest):
        return set()
    except NotificationError as exc:
        log.warning("catch_up.events_unreadable", subscription=subscription, reason=str(exc))
        return set()
    handled = set()
    for item in note.work():
        if item.event_number not in wanted or item.catch_up:
            continue
        if item.patient:
            d.queue.schedule_evaluation(item.patient, item.focus, trigger | {"event": item.event_number})
        elif item.resolve:
            resolve_focus(d, list(item.focus), trigger | {"event": item.event_number})
        handled.add(item.event_number)
    return handled


def sweep(d: Deps, since: datetime, trigger: dict) -> list[str]:
    """Every patient with a resource of a subscribed type (SPINEWATCH_SUBSCRIPTION_TYPES) written
    since `since`: queue an evaluation."""
    patients: set[str] = set()
    for rtype in d.settings.subscribed_types:
        params = [("_lastUpdated", "ge" + _instant(since)), ("_count", PAGE_SIZE), ("_elements", "subject")]
        for resource in d.fhir.search(rtype, params):
            found = patient_key(resource)
            if found:
                patients.add(found)
    for patient in sorted(patients):
        d.queue.schedule_evaluation(patient, [], trigger | {"source": "sweep"})
    log.info("sweep", since=_instant(since), patients=len(patients))
    return sorted(patients)


def reconcile(d: Deps, now: datetime, reason: str) -> list[str]:
    """The safety net: whatever changed since the last sweep, however its notification fared."""
    d.queue.reconcile_started()
    previous = _parse_instant(d.queue.reconcile_since())
    interval = d.settings.reconciliation_interval_seconds or 3600
    start = previous or now - timedelta(seconds=interval)
    patients = sweep(d, start - SWEEP_MARGIN, {"kind": "reconcile", "source": reason})
    d.queue.set_reconcile_since(now.isoformat())  # only after the sweep succeeded
    return patients


# ---------------- watchdog ----------------

def watchdog(d: Deps, now: datetime) -> list[dict]:
    """Subscriptions we have not heard from for heartbeat_watchdog_seconds: ask the server.
    A backport Subscription has heartbeats, so silence means trouble: $status tells its state and
    its event count (a count above ours means missed events: catch up). A classic Subscription has
    no heartbeats; its status is read. Either one in `error` is re-requested."""
    from service.infra.fhir.subscriptions import re_request

    report = []
    # Evaluations queued long ago and never started: their message was lost (queue.recover_pending).
    for patient in d.queue.recover_pending():
        report.append({"patient": patient, "action": "evaluation sent again (queued, never started)"})
    limit = timedelta(seconds=d.settings.heartbeat_watchdog_seconds)
    for subscription in d.queue.tracked_subscriptions():
        state = d.queue.subscription_state(subscription)
        last = _parse_instant(state.last_seen_at)
        if last is not None and now - last < limit:
            continue
        rid = subscription.split("/", 1)[1]
        try:
            resource = d.fhir.read("Subscription", rid)
        except FHIRNotFound:
            d.queue.untrack_subscription(subscription)
            report.append({"subscription": subscription, "action": "untracked (deleted on the server)"})
            continue
        status = resource.get("status")
        entry = {"subscription": subscription, "status": status, "action": "checked"}
        if state.kind == "backport":
            entry |= _status_check(d, subscription, state)
        if status == "error":
            re_request(d.fhir, resource)
            entry["action"] = "re-requested"
        d.queue.set_subscription_fields(subscription, last_seen_at=now.isoformat(), status=status or "")
        log.warning("watchdog", subscription=subscription, status=status, action=entry["action"])
        report.append(entry)
    return report


def _status_check(d: Deps, subscription: str, state) -> dict:
    try:
        statuses = parse_status_bundle(d.fhir.get(f"{subscription}/$status", what="$status"))
    except (FHIRNotFound, FHIRNotSupported, FHIRBadRequest, NotificationError):
        return {"status_operation": "unavailable"}
    if not statuses:
        return {"status_operation": "empty"}
    server_count = statuses[0].events_since_start
    missing = missing_event_numbers(state.highest, [], server_count)
    if missing:
        d.queue.send(TASK_CATCH_UP, kwargs={"subscription": subscription, "numbers": missing[:500],
                                            "since": state.last_event_at, "only_missing": True})
    if server_count is not None:
        d.queue.advance_subscription(subscription, kind="query-status", status=statuses[0].status,
                                     top=server_count, event=False)
    return {"events_since_start": server_count, "missing": len(missing)}


def _parse_instant(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
