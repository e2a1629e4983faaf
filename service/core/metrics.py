"""Prometheus metrics (exposed at /metrics). Labels carry kinds and outcomes, never patient data."""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

NOTIFICATIONS = Counter("spinewatch_notifications_total", "Subscription notifications received",
                        ["kind", "outcome"])  # kind: event|handshake|heartbeat|query-status|rest-hook|ping
EVALUATIONS = Counter("spinewatch_evaluations_total", "Patient evaluations", ["tier", "origin"])  # origin: worker|hook
EVALUATION_SECONDS = Histogram("spinewatch_evaluation_seconds", "Time to evaluate one patient", ["origin"])
CARDS_SERVED = Counter("spinewatch_cards_served_total", "CDS Hooks cards returned", ["hook", "indicator"])
ALERTS = Counter("spinewatch_alerts_total", "Care-team alerts", ["channel", "outcome"])
AUTH_FAILURES = Counter("spinewatch_auth_failures_total", "Rejected callers", ["surface", "reason"])
DEAD_LETTERS = Counter("spinewatch_dead_letters_total", "Tasks moved to the dead-letter list", ["task"])
AUDIT_WRITES = Counter("spinewatch_audit_writes_total", "Audit log writes", ["kind", "outcome"])  # outcome: ok|error
# Read from Redis at each scrape: with several api workers (multiprocess mode) the latest read is the value.
QUEUE_DEPTH = Gauge("spinewatch_queue_depth", "Messages waiting in the Celery queue", ["queue"],
                    multiprocess_mode="mostrecent")
# The Subscriptions `spinewatch subscribe` registered, by the status last seen (the watchdog and
# notifications keep it): anything but `active` for long means no notifications arrive.
SUBSCRIPTIONS = Gauge("spinewatch_subscriptions", "Watched Subscriptions by last seen status", ["status"],
                      multiprocess_mode="mostrecent")
CONFIGURATION_PROBLEMS = Counter("spinewatch_configuration_problems_total", "Failures no retry can fix: SpineWatch "
                                 "is set up wrong for a server it calls (service/infra/config_problems.py)",
                                 ["kind"])  # kind: fhir-scope|fhir-auth|terminology-auth


def exposition_registry():
    """What /metrics shows: this process's metrics, or, when `spinewatch serve --workers N` set
    PROMETHEUS_MULTIPROC_DIR, every worker's summed (prometheus_client multiprocess mode)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry
