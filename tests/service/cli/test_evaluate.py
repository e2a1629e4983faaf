"""`spinewatch evaluate PATH [--now]` as the README documents: one JSON object, exit 0; exit 2 + one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.paths import ROOT

EXAMPLE = ROOT / "examples" / "emergency-breast-cancer-leg-weakness.json"


def run(*args):
    return subprocess.run([sys.executable, "-m", "service.cli.main", "evaluate", *map(str, args)],
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


def _note_bundle(text: str) -> dict:
    """A known cancer and an ED note whose text is a Binary named by the Bundle's urn:uuid fullUrl."""
    import base64

    binary_url = "urn:uuid:5b0c6d0e-1f6a-4b39-9a53-6d1f1c0a0b01"
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "n1"}},
        {"resource": {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/n1"},
                      "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                                   "condition-ver-status", "code": "confirmed"}]},
                      "code": {"coding": [{"system": "http://snomed.info/sct", "code": "399068003",
                                           "display": "Malignant tumor of prostate"}]},
                      "onsetDateTime": "2024-01-01"}},
        {"resource": {"resourceType": "DocumentReference", "id": "d1", "status": "current",
                      "subject": {"reference": "Patient/n1"}, "date": "2026-05-31T10:00:00Z",
                      "content": [{"attachment": {"contentType": "text/plain", "url": binary_url}}]}},
        {"fullUrl": binary_url, "resource": {"resourceType": "Binary", "id": "b1", "contentType": "text/plain",
                                             "data": base64.b64encode(text.encode()).decode()}}]}


def test_a_note_in_the_bundle_is_read_with_the_note_cap_from_the_settings(tmp_path):
    path = tmp_path / "note.json"
    note = "2/52 thoracic back pain, new BLE weakness 3/5 since yesterday, PVR 900 ml."
    path.write_text(json.dumps(_note_bundle(note)))
    out = json.loads(run(path, "--now", "2026-06-01T12:00:00Z").stdout)
    assert out["patient"] == "Patient/n1" and out["urgency"] == "emergency" and not out["problems"]

    path.write_text(json.dumps(_note_bundle("Seen in clinic. " * 100 + note)))  # the finding past the cap
    proc = subprocess.run([sys.executable, "-m", "service.cli.main", "evaluate", str(path), "--now",
                           "2026-06-01T12:00:00Z"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "SPINEWATCH_NOTE_MAX_CHARS": "1000"})
    out = json.loads(proc.stdout)
    assert out["urgency"] != "emergency"
    assert any("DocumentReference/d1" in p and "1000" in p for p in out["problems"]), out["problems"]


# -- unreadable input is one line and exit 2, never a traceback or a hang -------

def _bad_inputs(tmp_path):
    import bz2
    import gzip
    import os

    good = EXAMPLE.read_bytes()
    corrupt_gz = bytearray(gzip.compress(good))
    corrupt_gz[20:40] = b"\xff" * 20  # the deflate stream, not the header
    (tmp_path / "corrupt.json.gz").write_bytes(bytes(corrupt_gz))
    (tmp_path / "truncated.json.gz").write_bytes(gzip.compress(good)[:-30])
    (tmp_path / "truncated.json.bz2").write_bytes(bz2.compress(good)[:-30])
    (tmp_path / "garbled.json.bz2").write_bytes(b"BZh9" + b"\x00" * 200)
    (tmp_path / "latin1.json").write_bytes(b'{"resourceType": "Patient", "id": "\xe9"}')
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "file.json").write_bytes(good)
    return {"corrupt gzip": tmp_path / "corrupt.json.gz", "truncated gzip": tmp_path / "truncated.json.gz",
            "truncated bz2": tmp_path / "truncated.json.bz2", "garbled bz2": tmp_path / "garbled.json.bz2",
            "not UTF-8": tmp_path / "latin1.json", "FIFO": tmp_path / "fifo.json",
            "symlink to /dev/zero": tmp_path / "zero.json", "/dev/zero": Path("/dev/zero"),
            "under a file": tmp_path / "file.json" / "x.json", "a directory": tmp_path}


@pytest.mark.parametrize("case", ["corrupt gzip", "truncated gzip", "truncated bz2", "garbled bz2", "not UTF-8",
                                  "FIFO", "symlink to /dev/zero", "/dev/zero", "under a file", "a directory"])
def test_unreadable_input_is_one_line_and_exit_2(tmp_path, case):
    proc = subprocess.run([sys.executable, "-m", "service.cli.main", "evaluate", str(_bad_inputs(tmp_path)[case])],
                          capture_output=True, text=True, cwd=ROOT, timeout=20)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("spinewatch: ") and "Traceback" not in proc.stderr
    assert "Error" not in line, "the reason is said in words, not as an exception class"


def test_input_is_read_with_a_size_cap(tmp_path):
    import gzip

    from fhir_mappings.fhir.bundle import MAX_INPUT_BYTES, InputError, read_path

    assert MAX_INPUT_BYTES == 200 * 1024 * 1024
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(gzip.compress(b" " * 5_000_000))
    with pytest.raises(InputError, match="larger than"):
        read_path(bomb, max_bytes=1_000_000)
    plain = tmp_path / "big.json"
    plain.write_bytes(b" " * 2_000_000)
    with pytest.raises(InputError, match="larger than"):
        read_path(plain, max_bytes=1_000_000)
