"""Whole-patient fixtures in clinical wording (tests/fhir_mappings/clinical/corpus/patients, labelled before the matcher
ran): each one's tier, the flags it must raise, and the flags it must not (MANIFEST.yaml)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from fhir_mappings.fhir.bundle import read_path
from fhir_mappings.clinical.evaluate import assess

HERE = Path(__file__).parent / "patients"
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
MANIFEST = yaml.safe_load((HERE / "MANIFEST.yaml").read_text())


def test_the_manifest_lists_exactly_the_fixtures_and_there_are_enough():
    files = {p.name for p in HERE.glob("*.json")}
    assert set(MANIFEST) == files
    assert len(files) >= 60
    for name, entry in MANIFEST.items():
        assert name.split("__")[0] == entry["tier"], name


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_patient(name):
    entry = MANIFEST[name]
    a = assess(read_path(HERE / name), NOW)
    raised = set(a.red_flags)
    missing = set(entry.get("must_raise") or []) - raised
    wrong = set(entry.get("must_not_raise") or []) & raised
    assert (a.urgency, missing, wrong) == (entry["tier"], set(), set()), (
        f"{name}: urgency {a.urgency} (expected {entry['tier']}), flags {sorted(raised)}; "
        f"not raised {sorted(missing)}, wrongly raised {sorted(wrong)} — {entry['why']}")
