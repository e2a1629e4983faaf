"""`spinewatch report` end to end: records written through the real AuditLog / AuditStore into an
SQLite file, the command run as a process; JSON, CSV, --output, and one-line errors with exit 2."""

import csv
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from service.core.settings import Settings
from service.infra.audit.store import AuditStore
from service.infra.audit.writer import AuditLog
from tests.support.paths import ROOT


def clock(log, patient, event, at, *, tier="emergency", first, alerted=None):
    log.event("mri-clock", "success", actor="worker", patient=patient,
              detail={"event": event, "episode": f"{patient}#1", "tier": tier, "first_evidence_at": first,
                      "alerted_at": alerted, "deadline": None, "at": at, "reason": None, "communication": None})


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.sqlite"
    store = AuditStore(url)
    log = AuditLog(Settings(audit_db_url=url), store=store)
    # emergency, November 2026: MRI at 10 h (met) and at 30 h (breach)
    clock(log, "Patient/p1", "started", "2026-11-02T00:00:00Z", first="2026-11-02T00:00:00Z",
          alerted="2026-11-02T01:00:00Z")
    clock(log, "Patient/p1", "done", "2026-11-02T10:00:00Z", first="2026-11-02T00:00:00Z",
          alerted="2026-11-02T01:00:00Z")
    clock(log, "Patient/p2", "started", "2026-11-05T00:00:00Z", first="2026-11-05T00:00:00Z",
          alerted="2026-11-05T03:00:00Z")
    clock(log, "Patient/p2", "done", "2026-11-06T06:00:00Z", first="2026-11-05T00:00:00Z",
          alerted="2026-11-05T03:00:00Z")
    # urgent, November: MRI at 48 h (met)
    clock(log, "Patient/p3", "done", "2026-11-10T00:00:00Z", tier="urgent", first="2026-11-08T00:00:00Z")
    # a card of November (recorded then) overridden
    store.append("card", "success", actor="https://ehr.example.org", patient="Patient/p1",
                 detail={"hook": "patient-view", "tier": "emergency", "cards": ["u-1"]},
                 at=datetime(2026, 11, 2, 0, 30, tzinfo=timezone.utc))
    log.event("feedback", "overridden", actor="https://ehr.example.org",
              detail={"card": "u-1", "overrideReason": {"system": "urn:x", "code": "already-imaged"}})
    store.dispose()
    return url


def run(url, *args):
    env = os.environ | {"SPINEWATCH_AUDIT_DB_URL": url, "SPINEWATCH_PUBLIC_BASE_URL": "https://cds.example.org"}
    return subprocess.run([sys.executable, "-m", "service.cli.main", "report", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)


def test_json_document(db):
    proc = run(db, "--since", "2026-11", "--until", "2026-11")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "met_share" in report["definitions"]
    emergency, urgent = report["rows"]
    assert (emergency["month"], emergency["tier"], emergency["flagged"]) == ("2026-11", "emergency", 2)
    assert emergency["mri_hours"] == {"n": 2, "median": 20.0, "p90": 30.0}   # 10 30
    assert emergency["alert_hours"] == {"n": 2, "median": 2.0, "p90": 3.0}   # 1 3
    assert (emergency["met"], emergency["denominator"], emergency["met_share"]) == (1, 2, 0.5)
    assert [(b["patient"], b["review_url"]) for b in emergency["breaches"]] == [
        ("Patient/p2", "https://cds.example.org/audit?patient=Patient%2Fp2")]
    assert (emergency["cards_served"], emergency["override_reasons"]) == (1, {"already-imaged": 1})
    assert (urgent["tier"], urgent["met_share"], urgent["mri_hours"]["median"]) == ("urgent", 1.0, 48.0)
    # reading the report is itself audited
    records, _ = AuditStore(db).query(kinds=["audit-access"])
    assert [r.detail["action"] for r in records] == ["report"]


def test_csv_to_a_file(db, tmp_path):
    out = tmp_path / "report.csv"
    proc = run(db, "--since", "2026-10", "--until", "2026-11", "--format", "csv", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    header, *rows = list(csv.reader(io.StringIO(out.read_text())))
    assert header[:3] == ["month", "tier", "flagged"] and "met_share" in header
    assert [(r[0], r[1], r[2]) for r in rows] == [("2026-10", "emergency", "0"), ("2026-10", "urgent", "0"),
                                                  ("2026-11", "emergency", "2"), ("2026-11", "urgent", "1")]
    november = dict(zip(header, rows[2]))
    assert (november["mri_median_h"], november["met_share"], november["breaches"],
            november["override_reasons"]) == ("20.0", "0.5", "1", "already-imaged=1")


@pytest.mark.parametrize("args, message", [
    (["--since", "2026-13"], "--since: expected a month as YYYY-MM"),
    (["--until", "11/2026"], "--until: expected a month as YYYY-MM"),
    (["--since", "2026-11", "--until", "2026-10"], "--since 2026-11 is after --until 2026-10"),
    (["--format", "xml"], "--format: json or csv"),
])
def test_bad_arguments_exit_2_with_one_line(db, args, message):
    proc = run(db, *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_unreadable_audit_db_exits_2(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not an sqlite database" * 100)
    for url in (f"sqlite:///{junk}", f"sqlite:///{tmp_path}/missing.sqlite"):
        proc = run(url, "--db", url)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("spinewatch: ")
    assert not (tmp_path / "missing.sqlite").exists()
