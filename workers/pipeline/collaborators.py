"""What the pipeline works with, made once per worker process and handed to every pipeline function.

workers/celery_app.py makes the set in worker_process_init, after the prefork (Celery docs, "Signals"
> worker_process_init), so no connection is shared between processes; tests make their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from service.core.settings import Settings
from service.infra.assessments import AssessmentStore
from service.infra.audit.writer import AuditLog
from service.infra.fhir.sync import FHIRClient
from service.infra.fhir.terminology import TerminologyServer
from service.infra.queue import WorkQueue, redis_client
from service.infra.redis import redis_client as bytes_redis_client

REDIS_TIMEOUT_SECONDS = 5.0


@dataclass
class Collaborators:
    settings: Settings
    fhir: FHIRClient
    queue: WorkQueue
    store: AssessmentStore
    audit: AuditLog
    alert_redis: redis.Redis  # the alerts' de-duplication record and locks (workers/alerts.py)
    terminology: TerminologyServer | None = None  # SPINEWATCH_TERMINOLOGY_URL unset: none

    @classmethod
    def from_settings(cls, settings: Settings) -> "Collaborators":
        conn = redis_client(settings.redis_url, timeout=REDIS_TIMEOUT_SECONDS)
        fhir = FHIRClient.from_settings(settings)
        return cls(settings, fhir, WorkQueue(settings, conn), AssessmentStore(conn), AuditLog(settings),
                   bytes_redis_client(settings.redis_url, REDIS_TIMEOUT_SECONDS),
                   TerminologyServer.from_settings(settings, auth=fhir.auth))
