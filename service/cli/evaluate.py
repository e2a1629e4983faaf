"""`spinewatch evaluate PATH`: one patient's record (a FHIR R4 Bundle or NDJSON, optionally gzip/bz2)
evaluated on this machine, printed as the assessment and its cards in one JSON object."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from service.cli.common import fail, parse_now


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
