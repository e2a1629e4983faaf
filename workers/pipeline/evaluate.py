"""One evaluation: the record from FHIR, the pure assessment, stored, audited, alerted; and, when a
record an earlier decision rested on has been deleted or marked entered-in-error since, the audit
says so and the care team that was alerted on it is told (docs/alerts.md, "Retractions")."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import structlog

from fhir_mappings.cds.alerts import (Retraction, alert_input, current_assessment, retraction_for, retraction_reason,
                                      unreported_basis)
from fhir_mappings.clinical.evaluate import Assessment, assess
from service.core.metrics import EVALUATION_SECONDS, EVALUATIONS
from service.core.settings import evaluation_settings
from service.infra import config_problems
from service.infra.assessments import cited_references
from service.infra.fhir.terminology import consult_sync
from workers.alerts import ClientAdapter, alert_if_needed, send_retraction, sent_alerts
from workers.pipeline.mri_clock import after_evaluation
from workers.pipeline.collaborators import Collaborators
from workers.pipeline.record import current_resources, fetch_record

log = structlog.get_logger("spinewatch.pipeline")
TRIGGER_FIELDS = ("kind", "subscription", "event", "source", "interaction", "deleted")


@dataclass(frozen=True)
class Retractions:
    """What no longer stands: in the stored assessment (reference -> reason), and in sent alerts."""
    stored: dict[str, str]
    follow_up: Retraction | None


def trigger_summary(trigger: dict) -> dict:
    """The trigger as the audit records it: what notified us, never a payload."""
    return {k: v for k, v in trigger.items() if k in TRIGGER_FIELDS}


def evaluate_patient(c: Collaborators, patient: str, focus: list[str], trigger: dict, now: datetime) -> Assessment:
    # Clear the coalescing marker before reading: an event arriving from here on queues a new
    # evaluation, and every event before it is covered by the reads below.
    focus = sorted(set(focus) | set(c.queue.take_pending(patient)))
    started = time.perf_counter()
    previous = c.store.get(patient)
    unread: list[str] = []  # what a very large record left unread: named in `problems`
    refusals: list = []  # note Binaries our token may not read: a configuration problem, not the note's
    resources = fetch_record(c.fhir, patient, now, c.settings.lookback_days, focus,
                             note_max_bytes=c.settings.note_max_bytes,
                             max_binary_reads=c.settings.note_max_binary_reads,
                             max_per_search=c.settings.record_max_resources_per_search, unread=unread,
                             scope_refusals=refusals)
    if refusals:  # one record per evaluation: /readyz, check-config and the metric then say what to grant
        config_problems.record(c.queue.redis, config_problems.find(refusals[0]), task="spinewatch.evaluate_patient")
    consulted = consult_sync(c.terminology, resources)  # bounded; on failure the local sets alone
    if consulted.refused:  # codes the local sets do not know go unresolved until it is set up right
        config_problems.record(c.queue.redis, config_problems.terminology_refused(consulted.problem),
                               task="spinewatch.evaluate_patient")
    assessment = assess(resources, now, evaluation_settings(c.settings), terminology=consulted.terminology)
    consulted.note(assessment)
    assessment.problems += unread
    if assessment.patient is None:
        assessment.patient = patient
    retractions = find_retractions(c, patient, previous, assessment, resources)
    revision = c.store.save(assessment.to_json(), seen=assessment.seen, index_ttl_seconds=citation_ttl(c))
    EVALUATION_SECONDS.labels(origin="worker").observe(time.perf_counter() - started)
    EVALUATIONS.labels(tier=assessment.urgency, origin="worker").inc()
    detail = {
        "inputs": assessment.seen, "rule_versions": assessment.rule_versions, "tier": assessment.urgency,
        "flags": assessment.red_flags, "suppressed_by": assessment.suppressed_by, "problems": len(assessment.problems),
        "trigger": trigger_summary(trigger), "stored_revision": revision}
    if retractions.stored:
        detail |= {"retracted": [{"reference": ref, "reason": why} for ref, why in sorted(retractions.stored.items())],
                   "previous_tier": previous.get("urgency")}
    c.audit.event("evaluation", "success", actor="worker", patient=patient, detail=detail)
    log.info("evaluation", patient=patient, tier=assessment.urgency, flags=len(assessment.red_flags),
             resource_count=len(resources), revision=revision, retracted=len(retractions.stored))
    if revision:
        if retractions.follow_up:
            retract(c, retractions.follow_up, assessment)
        alert(c, assessment)
    # Every evaluation, changed or not: an MRI order or study may change nothing the assessment keeps.
    after_evaluation(c, assessment, resources, bool(retractions.stored or retractions.follow_up), now)
    return assessment


def citation_ttl(c: Collaborators) -> int:
    """How long a stored assessment's citations stay findable: while its evidence can still count
    (the lookback) and while an alert sent on it is remembered, whichever is longer."""
    return max(c.settings.lookback_days, c.settings.alert_dedup_days) * 86400


def find_retractions(c: Collaborators, patient: str, previous: dict | None, assessment: Assessment,
                     resources: list[dict]) -> Retractions:
    """References the stored assessment or a sent alert rested on that the new assessment no
    longer cites, checked on the server: deleted (404/410), entered-in-error, or another patient's
    now. Computed from Redis and the server, not from the trigger: a delete's notification may have
    been coalesced into another event's evaluation, or be retried after the assessment was stored."""
    cited_now = cited_references(assessment.to_json())
    sent = sent_alerts(c.alert_redis, patient)
    from_store = cited_references(previous) - cited_now if previous else set()
    candidates = from_store | unreported_basis(sent, cited_now)
    if not candidates:
        return Retractions({}, None)
    current = current_resources(c.fhir, candidates, resources)
    reasons = {ref: why for ref, found in current.items() if (why := retraction_reason(found, patient))}
    return Retractions({ref: reasons[ref] for ref in from_store if ref in reasons},
                       retraction_for(patient, sent, reasons, current_assessment(assessment)))


def retract(c: Collaborators, retraction: Retraction, assessment: Assessment) -> None:
    """The follow-up step, before the alerting step: when it already says all the current alert
    would, it records that alert as sent rather than letting it repeat the earlier one."""
    send_retraction(retraction, c.settings, fhir=ClientAdapter(c.fhir), redis_client=c.alert_redis, audit=c.audit,
                    current_alert=alert_input(assessment))


def alert(c: Collaborators, assessment: Assessment) -> None:
    """The alerting step. Stored first: an alert that fails and is retried re-evaluates, and the
    alert's own de-duplication keeps it from telling the care team twice."""
    alert_if_needed(assessment, c.settings, fhir=ClientAdapter(c.fhir), redis_client=c.alert_redis, audit=c.audit)
