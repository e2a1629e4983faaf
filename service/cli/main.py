"""The `spinewatch` command line. Each command is a thin shell over a module that does the work.

Errors a user can fix are one line on stderr and exit code 2; nothing about a patient is printed.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="SpineWatch: red flags for spinal metastasis and cord compression in patients with cancer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """SpineWatch command line."""


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"spinewatch: {message}", err=True)
    raise typer.Exit(code)


def parse_now(value: Optional[str]) -> datetime:
    if value is None:
        return datetime.now(timezone.utc)
    try:
        now = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"--now: not an ISO-8601 date-time: {value!r}")
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)


@app.command()
def evaluate(
    path: Annotated[str, typer.Argument(help="FHIR R4 Bundle (any type) or NDJSON with one patient's resources")],
    now: Annotated[Optional[str], typer.Option(help="evaluation time, ISO-8601 (default: now)")] = None,
    lookback_days: Annotated[Optional[int], typer.Option(help="lookback window in days (default: SPINEWATCH_LOOKBACK_DAYS or 90)")] = None,
) -> None:
    """Evaluate one patient's record and print the assessment and cards as one JSON object."""
    from fhir_mappings.fhir.bundle import InputError, read_path, split_by_patient
    from fhir_mappings.cds.cards import cards_for
    from fhir_mappings.clinical.evaluate import assess
    from service.core.settings import card_settings, evaluation_settings, get_settings

    at = parse_now(now)
    try:
        resources = read_path(path)
    except InputError as exc:
        fail(str(exc))
    patients = [key for key in split_by_patient(resources) if key is not None]
    if len(patients) > 1:
        fail(f"{path}: holds resources of {len(patients)} patients; evaluate one patient's record at a time")
    try:  # SPINEWATCH_LOOKBACK_DAYS unless --lookback-days; SPINEWATCH_NOTE_MAX_CHARS
        settings = evaluation_settings(get_settings(), lookback_days=lookback_days)
    except ValueError as exc:
        fail(str(exc))
    assessment = assess(resources, at, settings)
    if assessment.patient is None and patients:
        assessment.patient = patients[0]
    out = assessment.to_json() | {"cards": cards_for(assessment, at, get_settings().card_intent,
                                                    settings=card_settings(get_settings()))}
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


# Commands that live in modules of their own.
from service.cli.demo_command import demo  # noqa: E402
from service.cli.config import check_config  # noqa: E402

app.command()(demo)
app.command("check-config")(check_config)
app.command()(__import__("service.cli.serve", fromlist=["serve"]).serve)  # spinewatch serve (issue 3)
app.add_typer(__import__("service.cli.audit", fromlist=["app"]).app, name="audit")  # audit list|verify|export
app.add_typer(__import__("service.cli.workers", fromlist=["app"]).app)  # worker, subscribe, dead-letters (issue 4)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
