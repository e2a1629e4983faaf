"""`spinewatch evaluate PATH [--now]` as DESIGN.md specifies: one JSON object, exit 0; exit 2 + one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "emergency-breast-cancer-leg-weakness.json"


def run(*args):
    return subprocess.run([sys.executable, "-m", "service.cli", "evaluate", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_evaluate_prints_the_designed_object():
    proc = run(EXAMPLE, "--now", "2026-06-01T12:00:00Z")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"patient", "urgency", "red_flags", "evidence", "suppressed_by", "cards"} <= out.keys()
    assert out["patient"] == "Patient/example-emergency"
    assert out["urgency"] == "emergency"
    assert out["red_flags"][0] == "limb-weakness"
    assert out["cards"][0]["indicator"] == "critical"


def test_now_decides_recency():
    out = json.loads(run(EXAMPLE, "--now", "2027-06-01T00:00:00Z").stdout)
    assert out["urgency"] == "none" and out["cards"] == []


@pytest.mark.parametrize("content", ["{broken", '{"no": "resourceType"}', ""])
def test_bad_input_exits_2_with_one_line(tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = run(bad)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("spinewatch: ")


def test_bad_now_and_missing_file_exit_2(tmp_path):
    assert run(EXAMPLE, "--now", "yesterday").returncode == 2
    assert run(tmp_path / "missing.json").returncode == 2


def test_two_patients_in_one_file_is_refused(tmp_path):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}}, {"resource": {"resourceType": "Patient", "id": "b"}}]}
    path = tmp_path / "two.json"
    path.write_text(json.dumps(bundle))
    proc = run(path)
    assert proc.returncode == 2 and "2 patients" in proc.stderr
