"""`spinewatch subscribe [--check] [--json]`: the Subscriptions on the EHR's FHIR server, created
idempotently and reported (FHIR R4 Subscription, and the R5 Backport topic-based ones).

Exit codes: 0 every watched Subscription delivers (without --check: or was just written and the
server may still activate it within SPINEWATCH_SUBSCRIPTION_ACTIVATION_GRACE_SECONDS); 1 the FHIR
server refused or failed a read, create or update; 2 settings incomplete or the server unreachable;
3 at least one will send no notifications (missing, `error`, `off`, left `requested` past the grace
period; with --check, any that is not `active`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from service.cli.common import fail

NOT_DELIVERING = 3


def subscribe(
    check: Annotated[bool, typer.Option("--check", help="only report; create or change nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per Subscription")] = False,
) -> None:
    """Create (idempotently) one Subscription per type in SPINEWATCH_SUBSCRIPTION_TYPES (Condition and
    Observation by default; add DocumentReference for notes) on the FHIR server and report their
    status; re-request one the server put in error, ask for active one it left requested. Exit 3 when
    one will send no notifications (--check: any not active)."""
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
                                         reset=r.mode == "backport" and r.action == "created",
                                         requested_since=r.last_updated if r.status == "requested" else None)
    except QueueUnavailable as exc:
        typer.echo(f"spinewatch: warning: not registered with the watchdog ({exc})", err=True)
    for r in reports:
        if as_json:
            typer.echo(json.dumps(r.to_json()))
            continue
        error = f"  error: {r.error}" if r.error else ""
        typer.echo(f"{r.resource_type:<12} {r.mode:<9} Subscription/{r.id or '-':<12} "
                   f"{r.status or '-':<10} {r.action}  ({r.criteria}){error}")
        if r.problem:
            typer.echo(f"  ! {r.resource_type}: {r.problem}")
        elif check and r.status != "active":
            typer.echo(f"  ! {r.resource_type}: `{r.status}`, not yet activated by the server: no notifications "
                       "until it is")
    if any(r.action == "failed" for r in reports):
        raise typer.Exit(1)
    if any(r.problem or (check and r.status != "active") for r in reports):
        raise typer.Exit(NOT_DELIVERING)
