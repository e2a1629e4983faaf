"""What the tasks do: load from FHIR -> pure evaluation -> write back. Each function is safe to run
twice (a redelivered or retried task): it reads current data and overwrites its own outputs. Each
takes the worker process's Collaborators (collaborators.py) first.

    evaluate_patient   fetch the patient's record (record.py), (optionally) ask the terminology
                       server about unknown SNOMED CT codes, assess, store, alert (evaluate.py)
    resolve_focus      id-only notification: read the focus resource to learn whose it is (a
                       deleted one: its history, else the stored assessment that cited it)
    catch_up           missed or empty events: $events, else _lastUpdated since the last event seen
    reconcile          safety net: everything changed since the last sweep (_lastUpdated)
    watchdog           Subscriptions gone quiet: $status (backport) or a read (classic); re-request
                       one the server put in error, ask for active one left requested, sweep the
                       type of one without heartbeats; evaluations queued but never started: again
                       (the last four: sweeps.py)
    check_open_clocks  open MRI clocks due: re-read the patient's spine MRI orders and imaging;
                       escalate or breach when their time has come (mri_clock.py)
    record_declined    the patient declined the MRI a card recommended (CDS Hooks feedback): close
                       the episode the card was served for (mri_clock.py)

Errors propagate: service.infra.fhir errors say whether they are transient (service.core.errors
is_transient: workers/tasks.py retries those) or permanent (dead letter).
"""

from workers.pipeline.collaborators import Collaborators
from workers.pipeline.evaluate import evaluate_patient
from workers.pipeline.mri_clock import check_open_clocks, record_declined
from workers.pipeline.record import fetch_record, read_note_binaries, record_queries
from workers.pipeline.sweeps import catch_up, reconcile, resolve_focus, sweep, watchdog

__all__ = ["Collaborators", "catch_up", "check_open_clocks", "evaluate_patient", "fetch_record", "read_note_binaries",
           "reconcile", "record_declined", "record_queries", "resolve_focus", "sweep", "watchdog"]
