"""Per-rule positive and negative FHIR fixtures (layout and citations in tests/fhir_mappings/clinical/rules/README.md).

Every fixture is one patient's FHIR R4 Bundle, evaluated at a fixed time so the 90-day lookback
window (NG234 1.1) is stable: 2026-03-03T12:00:00Z .. 2026-06-01T12:00:00Z.
What a fixture must produce is read from where it lives, never from inside the file.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
README = HERE / "README.md"
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)

# NICE NG234 Box 2 (emergency: suspected MSCC) and Box 1 (urgent: suspected spinal metastasis).
BOX2 = (
    "radicular-pain",
    "limb-weakness",
    "gait-disturbance",
    "sensory-deficit",
    "sphincter-dysfunction",
    "saddle-anaesthesia",
    "upper-motor-neuron-signs",
    "cord-compression",
)
BOX1 = (
    "thoracic-or-cervical-pain",
    "nocturnal-pain",
    "mechanical-pain",
    "pain-on-straining",
    "progressive-pain",
    "severe-unremitting-pain",
    "localised-tenderness",
    "known-bone-metastasis",
)
FLAGS = BOX2 + BOX1
TIERS = ("emergency", "urgent", "routine", "none")
TIER_DIRS = tuple(f"tier-{t}" for t in TIERS)
OTHER_DIRS = ("suppressed", "not-suppressed", "pending-mri")
ALL_DIRS = FLAGS + TIER_DIRS + OTHER_DIRS

SLUG = r"[a-z0-9]+(?:-[a-z0-9]+)*"
NAME_RULES = {
    **{d: re.compile(rf"(raises|quiet)__{SLUG}\.json") for d in FLAGS},
    **{d: re.compile(rf"{SLUG}\.json") for d in TIER_DIRS + ("suppressed", "not-suppressed")},
    "pending-mri": re.compile(rf"(emergency|urgent|routine)__{SLUG}\.json"),
}


def _rel(path: Path) -> str:
    return path.relative_to(FIXTURES).as_posix()


ALL_FILES = sorted(FIXTURES.rglob("*.json"))
IDS = [_rel(p) for p in ALL_FILES]


def _files(pattern: str) -> list[Path]:
    return sorted(FIXTURES.glob(pattern))


def _params(paths: list[Path]):
    return pytest.mark.parametrize("path", paths, ids=[_rel(p) for p in paths])


@lru_cache(maxsize=None)
def _assess(path: Path):
    # Imported here so the layout checks below still run (and say what is wrong) while the engine
    # is missing or broken; an ImportError fails every evaluation test rather than skipping it.
    from fhir_mappings.fhir.bundle import read_path
    from fhir_mappings.clinical.evaluate import assess

    return assess(read_path(path), NOW)


def _describe(a) -> str:
    return (
        f"urgency={a.urgency!r} red_flags={list(a.red_flags)!r} "
        f"suppressed_by={list(a.suppressed_by)!r} pending_mri={list(a.pending_mri)!r}"
    )


# --------------------------------------------------------------------------- layout


def test_fixture_tree_is_populated():
    assert ALL_FILES, f"no fixtures under {FIXTURES}"
    present = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert present <= set(ALL_DIRS), f"unknown fixture directories: {sorted(present - set(ALL_DIRS))}"
    empty = [d for d in ALL_DIRS if not _files(f"{d}/*.json")]
    assert not empty, f"directories without fixtures: {empty}"


@pytest.mark.parametrize("flag", FLAGS)
def test_every_flag_has_raises_and_quiet(flag):
    assert _files(f"{flag}/raises__*.json"), f"{flag}: no raises__ fixture"
    assert _files(f"{flag}/quiet__*.json"), f"{flag}: no quiet__ fixture"


def test_fixture_names_follow_the_layout():
    stray = [p for p in FIXTURES.rglob("*") if p.is_file() and p.suffix != ".json"]
    assert not stray, f"non-JSON files in fixtures: {stray}"
    bad = []
    for rel in IDS:
        directory, _, name = rel.partition("/")
        rule = NAME_RULES.get(directory)
        if "/" in name or rule is None or not rule.fullmatch(name):
            bad.append(rel)
    assert not bad, f"fixture paths not matching the layout in README.md: {bad}"


def test_readme_lists_exactly_the_fixtures():
    text = README.read_text()
    listed = set()
    section = None
    for line in text.splitlines():
        m = re.match(r"## `([^`]+)/`", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"\| `([^`]+\.json)` \|", line)
        if m and section:
            listed.add(f"{section}/{m.group(1)}")
    assert listed == set(IDS), (
        f"missing from README: {sorted(set(IDS) - listed)}; listed but absent: {sorted(listed - set(IDS))}"
    )


@_params(ALL_FILES)
def test_fixture_is_a_valid_r4_collection_for_one_patient(path):
    from fhir.resources.R4B.bundle import Bundle

    raw = json.loads(path.read_text())
    assert raw.get("resourceType") == "Bundle" and raw.get("type") == "collection"
    Bundle.model_validate(raw)  # raises on invalid R4 content
    entries = raw["entry"]
    assert all(e.get("fullUrl") and e.get("resource") for e in entries), "entry without fullUrl/resource"
    patients = [e["resource"] for e in entries if e["resource"]["resourceType"] == "Patient"]
    assert len(patients) == 1 and patients[0]["id"].startswith("p-"), "exactly one Patient with id p-..."
    ref = f"Patient/{patients[0]['id']}"
    for e in entries:
        res = e["resource"]
        if res["resourceType"] not in ("Patient", "Binary"):  # a Binary has no subject in R4
            where = f"{res['resourceType']}/{res['id']}"
            assert res.get("subject", {}).get("reference") == ref, f"{where}: subject is not {ref}"


# --------------------------------------------------------------------------- rules


@_params(_files("*/raises__*.json"))
def test_flag_raises(path):
    flag = path.parent.name
    a = _assess(path)
    assert flag in a.red_flags, f"{flag} not raised: {_describe(a)}"


@_params(_files("*/quiet__*.json"))
def test_flag_stays_quiet(path):
    flag = path.parent.name
    a = _assess(path)
    assert flag not in a.red_flags, f"{flag} raised: {_describe(a)}"


@_params(sorted(p for d in FLAGS for p in _files(f"{d}/*.json")))
def test_flag_fixture_tier_follows_flags(path):
    # Every flag fixture is in scope (cancer + recent back pain) and has no MRI, so the tier
    # follows from the flags alone (NICE NG234 1.4: Box 2 emergency, Box 1 urgent).
    a = _assess(path)
    flags = set(a.red_flags)
    expected = "emergency" if flags & set(BOX2) else "urgent" if flags & set(BOX1) else "routine"
    assert a.urgency == expected, f"expected {expected}: {_describe(a)}"


@_params(_files("tier-*/*.json"))
def test_tier(path):
    expected = path.parent.name.removeprefix("tier-")
    a = _assess(path)
    assert a.urgency == expected, f"expected {expected}: {_describe(a)}"


@_params(_files("suppressed/*.json"))
def test_suppressed_by_completed_spine_mri(path):
    a = _assess(path)
    assert a.urgency == "none" and a.suppressed_by, f"expected suppression: {_describe(a)}"


@_params(_files("not-suppressed/*.json"))
def test_not_suppressed(path):
    a = _assess(path)
    assert a.urgency != "none" and not a.suppressed_by, f"expected no suppression: {_describe(a)}"


@_params(_files("pending-mri/*.json"))
def test_pending_mri_keeps_tier(path):
    expected = path.name.split("__", 1)[0]
    a = _assess(path)
    assert a.urgency == expected and a.pending_mri, f"expected {expected} with a pending MRI: {_describe(a)}"


@_params([p for p in ALL_FILES if p.parent.name != "pending-mri"])
def test_no_pending_mri_outside_pending_dir(path):
    # Only an active ServiceRequest for a spine MRI is a pending MRI; none of these fixtures has one
    # (not-suppressed/ holds the revoked, completed and X-ray orders).
    a = _assess(path)
    assert not a.pending_mri, f"unexpected pending MRI: {_describe(a)}"
