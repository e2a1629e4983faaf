"""`spinewatch report`: the MRI standards (NICE QS56 statement 3: 24 h; CG75/NG234: 1 week) per month
and tier, from the audit log, as one JSON document or CSV (docs/report.md). The report names the
patients of breaches, so reading it is audited like an export (kind `audit-access`)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from service.cli.audit import DbOption, fail_unreadable, open_store, cli_user


def _month(value: str | None, name: str) -> str | None:
    from service.usecases.report import parse_month

    if value is None:
        return None
    try:
        return parse_month(value)
    except ValueError as exc:
        typer.echo(f"spinewatch: --{name}: {exc}", err=True)
        raise typer.Exit(2)


def report(db: DbOption = None,
           since: Annotated[Optional[str], typer.Option(help="first month, YYYY-MM (default: the first with data)")] = None,
           until: Annotated[Optional[str], typer.Option(help="last month, YYYY-MM, included (default: this month)")] = None,
           format: Annotated[str, typer.Option("--format", help="json (one document) or csv (a row per month and tier)")] = "json",
           output: Annotated[Optional[str], typer.Option("--output", help="file to write (default: stdout)")] = None
           ) -> None:
    """The MRI standards per month and tier: time to alert, order and MRI, the share within 24 h / 7 days,
    breaches, escalations, card acceptance."""
    from service.core.settings import get_settings
    from service.usecases.report import access_detail, build_report, read_records, render

    if format not in ("json", "csv"):
        typer.echo(f"spinewatch: --format: json or csv, not {format!r}", err=True)
        raise typer.Exit(2)
    first, last = _month(since, "since"), _month(until, "until")
    if first and last and first > last:
        typer.echo(f"spinewatch: --since {first} is after --until {last}", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    store = open_store(db)
    try:
        records = list(read_records(store, first))
    except Exception as exc:  # noqa: BLE001
        fail_unreadable(exc)
    result = build_report(records, now=datetime.now(timezone.utc), since=first, until=last,
                          review_base=settings.public_base_url or "")
    text = render(result, format)
    try:
        if output:
            with open(output, "w", encoding="utf-8", newline="") as stream:
                stream.write(text)
        else:
            typer.echo(text, nl=False)
    except OSError as exc:
        typer.echo(f"spinewatch: cannot write {output}: {exc.strerror}", err=True)
        raise typer.Exit(2)
    if settings.audit_enabled:  # the report names patients: reading it is recorded in the log it came from
        store.append("audit-access", "success", actor=f"cli:{cli_user()}",
                     detail=access_detail(result, format))
