"""`spinewatch subscribe [--check] [--json]`: the Subscriptions on the EHR's FHIR server, created
idempotently and reported (FHIR R4 Subscription, and the R5 Backport topic-based ones)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from service.cli.common import fail


def subscribe(
    check: Annotated[bool, typer.Option("--check", help="only report; create or change nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per Subscription")] = False,
) -> None:
    """Create (idempotently) one Subscription per type in SPINEWATCH_SUBSCRIPTION_TYPES (Condition and
    Observation by default; add DocumentReference for notes) on the FHIR server and report their
    status; re-request one the server put in error."""
    from service.core.errors import FHIRError
    from service.infra.fhir.sync import FHIRClient
    from service.infra.queue import QueueUnavailable, WorkQueue
    from service.core.settings import get_settings
    from service.infra.fhir.subscriptions import ensure

    from service.core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings)  # logs to stderr; stdout is the report
    try:
        with FHIRClient.from_settings(settings) as fhir:
            reports = ensure(fhir, settings, check_only=check)
    except FHIRError as exc:
        fail(f"FHIR server {settings.fhir_base_url}: {exc.message}")
    except ValueError as exc:  # authentication settings incomplete
        fail(str(exc))
    try:
        queue = WorkQueue(settings)
        for r in reports:
            if r.id:
                # The watchdog looks after what we created; a new backport Subscription counts events from 0.
                queue.track_subscription(f"Subscription/{r.id}", kind=r.mode, status=r.status or None,
                                         reset=r.mode == "backport" and r.action == "created")
    except QueueUnavailable as exc:
        typer.echo(f"spinewatch: warning: not registered with the watchdog ({exc})", err=True)
    for r in reports:
        if as_json:
            typer.echo(json.dumps(r.to_json()))
        else:
            error = f"  error: {r.error}" if r.error else ""
            typer.echo(f"{r.resource_type:<12} {r.mode:<9} Subscription/{r.id or '-':<12} "
                       f"{r.status or '-':<10} {r.action}  ({r.criteria}){error}")
    if any(r.action == "failed" for r in reports):
        raise typer.Exit(1)
