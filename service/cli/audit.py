"""`spinewatch audit list|verify|head|export`: read, verify and export the hash-chained audit log.

`verify` walks the chain and names the first record that does not hold (exit 1), also against heads
kept outside the database (`--expect-head`, from `head` or the head export file); `export --format
fhir` writes IHE BALP-shaped FHIR R4 AuditEvents as NDJSON (or a Bundle with --bundle). Exports are
themselves audited (kind `audit-access`): ATNA expects access to the audit trail to be traceable.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import sys
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Read, verify and export the audit log.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)

DbOption = Annotated[Optional[str], typer.Option("--db", help="audit database URL (default: SPINEWATCH_AUDIT_DB_URL)")]
PatientOption = Annotated[Optional[str], typer.Option(help='only this patient: "Patient/123" or the bare id "123"')]
KindOption = Annotated[Optional[list[str]], typer.Option("--kind", "--type", help="only these kinds (repeatable)")]
OutcomeOption = Annotated[Optional[str], typer.Option(help="only this outcome (success, failure, ...)")]
SinceOption = Annotated[Optional[str], typer.Option(help="from this time (ISO-8601, inclusive)")]
UntilOption = Annotated[Optional[str], typer.Option(help="until this time (ISO-8601, exclusive)")]


def open_store(db: str | None):
    from service.core.settings import get_settings
    from service.infra.audit.store import settings_store, sqlite_path

    if db is None:
        return settings_store(get_settings())
    # These commands read an existing log: a mistyped SQLite path must not become a new, empty
    # (and so "intact") one.
    path = sqlite_path(db)
    if path is not None and not path.is_file():
        typer.echo(f"spinewatch: --db: no audit log at {path} (no such SQLite file)", err=True)
        raise typer.Exit(2)
    return settings_store(get_settings(), db)


def _patient(value: str | None) -> str | None:
    from service.usecases.audit_review import normalise_patient

    return normalise_patient(value)


def _time(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    from service.usecases.audit_review import normalise_time

    try:
        return normalise_time(value)
    except ValueError:
        typer.echo(f"spinewatch: --{name}: not an ISO-8601 date-time: {value!r}", err=True)
        raise typer.Exit(2)


def fail_unreadable(exc: Exception) -> None:
    # The URL may hold a password: name the error class only.
    typer.echo(f"spinewatch: cannot read the audit log ({type(exc).__name__})", err=True)
    raise typer.Exit(2)


@app.command("list")
def list_(db: DbOption = None, patient: PatientOption = None, kind: KindOption = None, outcome: OutcomeOption = None,
          since: SinceOption = None, until: UntilOption = None,
          limit: Annotated[int, typer.Option(min=1, max=100000)] = 50,
          as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False) -> None:
    """List records, newest first."""
    store = open_store(db)
    try:
        records, total = store.query(patient=_patient(patient), kinds=kind, outcome=outcome, since=_time(since, "since"),
                                          until=_time(until, "until"), limit=limit)
    except Exception as exc:  # noqa: BLE001
        fail_unreadable(exc)
    for r in records:
        if as_json:
            typer.echo(json.dumps(r.to_json(), sort_keys=True))
        else:
            typer.echo(f"{r.seq:>7}  {r.recorded}  {r.kind:<13} {r.outcome:<9} {r.patient or '-':<24} {r.actor}")
    typer.echo(f"{len(records)} of {total} records", err=True)


def _expected_heads(values: list[str] | None) -> dict[int, str]:
    """--expect-head values: SEQ:HASH, the JSON line of `audit head`, or a file of such lines (the
    head export file: every line in it is checked)."""
    from pathlib import Path

    from service.infra.audit.records import parse_head

    expect: dict[int, str] = {}
    for value in values or []:
        text = value.strip()
        if text.startswith("{") or re.fullmatch(r"\d+:\S*", text):
            lines = [("--expect-head", text)]
        else:
            try:
                lines = [(f"{value}:{n}", line) for n, line in enumerate(Path(value).read_text().splitlines(), 1)
                         if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                typer.echo(f"spinewatch: --expect-head: not SEQ:HASH, a head's JSON or a readable file: {value!r} "
                           f"({type(exc).__name__})", err=True)
                raise typer.Exit(2)
        for where, line in lines:
            try:
                seq, digest = parse_head(line)
            except ValueError as exc:
                typer.echo(f"spinewatch: {where}: {exc}", err=True)
                raise typer.Exit(2)
            if expect.get(seq, digest) != digest:
                typer.echo(f"spinewatch: {where}: two different hashes expected for record {seq}", err=True)
                raise typer.Exit(1)
            expect[seq] = digest
    return expect


@app.command()
def verify(db: DbOption = None,
           expect_head: Annotated[Optional[list[str]], typer.Option(
               "--expect-head", help="a head kept elsewhere: SEQ:HASH, the JSON of `audit head`, or the head "
                                     "export file (repeatable); fails if record SEQ lacks that hash or is gone")] = None
           ) -> None:
    """Verify the hash chain; name the first broken record and exit 1 when it does not hold."""
    expect = _expected_heads(expect_head)
    store = open_store(db)
    try:
        result = store.verify(expect=expect)
    except Exception as exc:  # noqa: BLE001
        fail_unreadable(exc)
    if result.ok:
        typer.echo(result.message())
        return
    typer.echo(result.message(), err=True)
    raise typer.Exit(1)


@app.command()
def head(db: DbOption = None) -> None:
    """Print the log's head as one JSON line ({"seq", "hash", ...}): keep it outside the database and
    check it later with `verify --expect-head`."""
    from datetime import datetime, timezone

    from service.infra.audit.records import utc_iso

    store = open_store(db)
    try:
        current = store.current_head()
    except Exception as exc:  # noqa: BLE001
        fail_unreadable(exc)
    typer.echo(json.dumps({**current.to_json(), "at": utc_iso(datetime.now(timezone.utc))}, sort_keys=True,
                          separators=(",", ":")))


@app.command()
def export(db: DbOption = None,
           format: Annotated[str, typer.Option("--format", help="fhir (BALP AuditEvent) or json (stored records)")] = "fhir",
           out: Annotated[Optional[str], typer.Option("--out", help="file to write (default: stdout)")] = None,
           as_bundle: Annotated[bool, typer.Option("--bundle", help="with --format fhir: one Bundle, not NDJSON")] = False,
           patient: PatientOption = None, kind: KindOption = None, outcome: OutcomeOption = None,
           since: SinceOption = None, until: UntilOption = None) -> None:
    """Export records in chain order as NDJSON (or a FHIR Bundle)."""
    from fhir_mappings.fhir.audit_events import ExportContext, audit_event, bundle
    from service.core.settings import get_settings

    if format not in ("fhir", "json"):
        typer.echo(f"spinewatch: --format: fhir or json, not {format!r}", err=True)
        raise typer.Exit(2)
    store = open_store(db)
    patient = _patient(patient)
    since_t, until_t = _time(since, "since"), _time(until, "until")
    ctx = ExportContext(site=socket.gethostname())
    filtered = any((patient, kind, outcome, since_t, until_t))
    try:
        if filtered:
            records = _all_matching(store, patient=patient, kinds=kind, outcome=outcome, since=since_t, until=until_t)
        else:
            records = store.iter_all()
        items = (audit_event(r.to_json(), ctx) if format == "fhir" else r.to_json() for r in records)
        stream = open(out, "w", encoding="utf-8") if out else sys.stdout
        count = 0
        try:
            if format == "fhir" and as_bundle:
                events = list(items)
                count = len(events)
                json.dump(bundle(events), stream, indent=2)
                stream.write("\n")
            else:
                for item in items:
                    stream.write(json.dumps(item, sort_keys=True, separators=(",", ":")) + "\n")
                    count += 1
        finally:
            if out:
                stream.close()
    except BrokenPipeError:  # the reader (e.g. `head`) closed the pipe: nothing to report
        sys.stderr.close()
        raise typer.Exit(0)
    except OSError as exc:
        typer.echo(f"spinewatch: cannot write {out or 'stdout'}: {exc.strerror}", err=True)
        raise typer.Exit(2)
    except Exception as exc:  # noqa: BLE001
        fail_unreadable(exc)
    filters = {k: v for k, v in {"patient": patient, "kind": kind, "outcome": outcome, "since": since_t,
                                 "until": until_t}.items() if v}
    # The export is recorded in the log it was read from.
    if get_settings().audit_enabled:
        store.append("audit-access", "success", actor=f"cli:{cli_user()}", patient=patient,
                     detail={"action": "export", "format": format, "count": count, "filters": filters})
    typer.echo(f"exported {count} records", err=True)


def _all_matching(store, **filters):
    offset, page = 0, 1000
    while True:
        records, total = store.query(limit=page, offset=offset, newest_first=False, **filters)
        yield from records
        offset += page
        if offset >= total or not records:
            return


def cli_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"
