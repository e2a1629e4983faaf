"""One evaluation: the record from FHIR, the pure assessment, stored, audited, alerted."""

from __future__ import annotations

import time
from datetime import datetime

import structlog

from fhir_mappings.clinical.evaluate import Assessment, assess
from service.core.metrics import EVALUATION_SECONDS, EVALUATIONS
from service.core.settings import evaluation_settings
from service.infra.fhir.terminology import consult_sync
from workers.alerts import ClientAdapter, alert_if_needed
from workers.pipeline.collaborators import Collaborators
from workers.pipeline.record import fetch_record

log = structlog.get_logger("spinewatch.pipeline")
TRIGGER_FIELDS = ("kind", "subscription", "event", "source")


def evaluate_patient(c: Collaborators, patient: str, focus: list[str], trigger: dict, now: datetime) -> Assessment:
    # Clear the coalescing marker before reading: an event arriving from here on queues a new
    # evaluation, and every event before it is covered by the reads below.
    focus = sorted(set(focus) | set(c.queue.take_pending(patient)))
    started = time.perf_counter()
    resources = fetch_record(c.fhir, patient, now, c.settings.lookback_days, focus,
                             note_max_bytes=c.settings.note_max_bytes,
                             max_binary_reads=c.settings.note_max_binary_reads)
    consulted = consult_sync(c.terminology, resources)  # bounded; on failure the local sets alone
    assessment = assess(resources, now, evaluation_settings(c.settings), terminology=consulted.terminology)
    consulted.note(assessment)
    if assessment.patient is None:
        assessment.patient = patient
    revision = c.store.save(assessment.to_json(), seen=assessment.seen)
    EVALUATION_SECONDS.labels(origin="worker").observe(time.perf_counter() - started)
    EVALUATIONS.labels(tier=assessment.urgency, origin="worker").inc()
    c.audit.event("evaluation", "success", actor="worker", patient=patient, detail={
        "inputs": assessment.seen, "rule_versions": assessment.rule_versions, "tier": assessment.urgency,
        "flags": assessment.red_flags, "suppressed_by": assessment.suppressed_by, "problems": len(assessment.problems),
        "trigger": {k: v for k, v in trigger.items() if k in TRIGGER_FIELDS},
        "stored_revision": revision})
    log.info("evaluation", patient=patient, tier=assessment.urgency, flags=len(assessment.red_flags),
             resource_count=len(resources), revision=revision)
    if revision:
        alert(c, assessment)
    return assessment


def alert(c: Collaborators, assessment: Assessment) -> None:
    """The alerting step. Stored first: an alert that fails and is retried re-evaluates, and the
    alert's own de-duplication keeps it from telling the care team twice."""
    alert_if_needed(assessment, c.settings, fhir=ClientAdapter(c.fhir), redis_client=c.alert_redis, audit=c.audit)
