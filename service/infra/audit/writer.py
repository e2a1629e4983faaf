"""The audit log: an `AuditLog` made once by each process's composition root (create_app, the Celery
app's worker process, a CLI command) and handed to whatever records.

    audit.event("card", "success", actor="https://ehr.example.org", patient="Patient/123",
                detail={"hook": "patient-view", "hookInstance": "...", "cards": ["uuid", ...]})

Every record goes to the append-only, hash-chained store in service/infra/audit/store.py
(SPINEWATCH_AUDIT_DB_URL; SQLite file by default). Kinds used across SpineWatch (each maps to an
IHE BALP AuditEvent profile on export, see fhir_mappings/fhir/audit_events.py):

    notification   a Subscription notification received           (actor: subscription / notifier)
    evaluation     a patient evaluated: inputs+versions, rules, tier (actor: worker or hook)
    card           cards served (hook, hookInstance, card uuids)  (actor: CDS client iss)
    evidence-view  a card's full-evidence page opened (hook, hookInstance, tier; never the link's token)
                                                                   (actor: the CDS client iss it was issued to)
    feedback       CDS Hooks feedback (card uuid, outcome, override reason code)
    alert          a care-team alert sent or failed (Communication reference, channel)
    auth-failure   a rejected caller (surface, reason code)       (HIPAA 164.312(b), ATNA)
    dead-letter    a task given up on (task, error class)
    audit-access   a reviewer read or exported the audit log      (BALP: audit access is audited)

Outcomes: success | failure (| a kind-specific code such as "accepted" or "overridden").

Where the write happens:
- in a process that serves the API (create_app makes its log with `background=True`),
  `event` hands the record to one writer thread, which appends what has queued up in one
  transaction: the request path pays for a queue put, and the chain lock is taken once per batch
  rather than once per record. A record waits at most LINGER_SECONDS (50 ms) plus the write in
  memory; `flush()` runs at exit.
- everywhere else (workers, the CLI), and whenever the log is given a store (tests), `event`
  appends before it returns.

Recording must never break clinical care: a failed write is logged (without the record's content)
and counted (spinewatch_audit_writes_total{outcome="error"}), and the caller carries on.
SPINEWATCH_AUDIT_ENABLED=false switches recording off (the benchmark comparison); production
should never do that.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time

import structlog

from service.infra.audit.records import AuditRecord
from service.infra.audit.store import AuditStore, settings_store

log = structlog.get_logger("spinewatch.audit")

BATCH = 500  # records per transaction at most
# How long the writer lets records gather after the first one: one transaction then carries many
# records, and the serving thread is interrupted (GIL hand-offs, thread wake-ups) once per batch
# rather than once per record. It is also the longest a record waits in memory before its commit.
LINGER_SECONDS = 0.05


class AuditLog:
    """The audit log of one process, made once by its composition root (create_app, the Celery app
    factory, a CLI command) and handed to whatever records.

    background=True (a serving process): `event` hands the record to this log's writer thread and
    returns; otherwise, or with an explicit `store` (tests), it appends before returning."""

    def __init__(self, settings, *, background: bool = False, store: AuditStore | None = None):
        self.settings = settings
        self.background = background and store is None
        self._store = store
        self._resolved: tuple[int, AuditStore] | None = None
        self._writer = _Writer(self)

    @property
    def store(self) -> AuditStore:
        """The store for SPINEWATCH_AUDIT_DB_URL with SPINEWATCH_AUDIT_HMAC_KEY and
        SPINEWATCH_AUDIT_HEAD_EXPORT_PATH (or the one given); looked up once per process."""
        if self._store is not None:
            return self._store
        resolved = self._resolved
        if resolved is None or resolved[0] != os.getpid():
            resolved = self._resolved = (os.getpid(), settings_store(self.settings))
        return resolved[1]

    @property
    def enabled(self) -> bool:
        return self._store is not None or self.settings.audit_enabled

    def event(self, kind: str, outcome: str, *, actor: str, patient: str | None = None,
              detail: dict | None = None) -> None:
        """Append one audit record. kind: notification|evaluation|card|feedback|alert|auth-failure|...;
        outcome: success|failure|...; actor: who acted (client iss, subscription id, worker);
        patient: "Patient/id" or None; detail: references, codes, versions; never free text or tokens.
        Do not change `detail` after the call (a serving process writes it a moment later)."""
        if self.background:
            if not self.enabled:
                return
            try:
                store = self.store
            except Exception as exc:  # noqa: BLE001 - an unusable URL: counted like any failed write
                _failed(kind, exc)
                return
            if self._writer.submit(store, (kind, outcome, actor or "unknown", patient, detail)):
                return
            # Queue full (the store is stuck or slow): write here rather than lose the record.
        self.record(kind, outcome, actor=actor, patient=patient, detail=detail)

    def record(self, kind: str, outcome: str, *, actor: str, patient: str | None = None,
               detail: dict | None = None) -> AuditRecord | None:
        """As `event`, synchronously, returning the stored record (None when switched off or on failure)."""
        if not self.enabled:
            return None
        from service.core.metrics import AUDIT_WRITES

        try:
            record = self.store.append(kind, outcome, actor=actor or "unknown", patient=patient, detail=detail)
        except Exception as exc:  # never let the audit log take clinical care down with it
            _failed(kind, exc)
            return None
        AUDIT_WRITES.labels(kind=kind, outcome="ok").inc()
        return record

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the background writer has appended everything queued so far (tests, shutdown)."""
        self._writer.flush(timeout)


def _failed(kind: str, exc: Exception, n: int = 1) -> None:
    from service.core.metrics import AUDIT_WRITES

    AUDIT_WRITES.labels(kind=kind, outcome="error").inc(n)
    log.error("audit.write_failed", kind=kind, records=n, error=type(exc).__name__)


class _Writer:
    """One daemon thread per process appending queued records in batches, in the order queued."""

    def __init__(self, owner: AuditLog, maxsize: int = 20_000):
        self._owner = owner
        self._queue: queue.Queue | None = None
        self._maxsize = maxsize
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> queue.Queue:
        if self._pid != os.getpid():  # first use, or a forked child: threads do not survive fork
            with self._lock:
                if self._pid != os.getpid():
                    self._queue = queue.Queue(self._maxsize)
                    threading.Thread(target=self._run, args=(self._queue,), name="audit-writer", daemon=True).start()
                    if self._pid is None:
                        atexit.register(self._owner.flush)
                    self._pid = os.getpid()
        return self._queue

    def submit(self, store: AuditStore, event: tuple) -> bool:
        try:
            self._ensure().put_nowait((store, event))
            return True
        except queue.Full:
            log.warning("audit.queue_full")
            return False

    def flush(self, timeout: float) -> None:
        if self._pid != os.getpid() or self._queue is None:
            return
        done = threading.Event()
        try:
            self._queue.put((None, done), timeout=timeout)
        except queue.Full:
            return
        done.wait(timeout)

    def _run(self, q: queue.Queue) -> None:
        from service.core.metrics import AUDIT_WRITES

        while True:
            items = [q.get()]
            if not isinstance(items[0][1], threading.Event):  # a flush does not wait
                time.sleep(LINGER_SECONDS)
            while len(items) < BATCH:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            # Consecutive records for the same store go in one transaction; a flush marker is
            # released once everything before it is written.
            batch: list[tuple] = []
            store = None
            for item_store, event in items + [(None, None)]:
                if batch and item_store is not store:
                    try:
                        store.append_many(batch)
                        for kind, *_ in batch:
                            AUDIT_WRITES.labels(kind=kind, outcome="ok").inc()
                    except Exception as exc:  # noqa: BLE001 - logged and counted; the thread goes on
                        _failed(batch[0][0], exc, len(batch))
                    batch = []
                if item_store is None:
                    if isinstance(event, threading.Event):
                        event.set()
                    continue
                store = item_store
                batch.append(event)

