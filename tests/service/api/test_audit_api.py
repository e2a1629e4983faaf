"""GET /audit/events, the reviewer page and `spinewatch audit list|verify|export`, through the real app."""

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from typer.testing import CliRunner

from fhir_mappings.cds.wording import OVERRIDE_SYSTEM
from service.api.app import create_app
from service.infra.audit.store import AuditStore
from service.cli.main import app as cli
from service.core.settings import Settings

TOKEN = "reviewer-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def db(tmp_path):
    return tmp_path / "audit.sqlite"


@pytest.fixture
def url(db):
    return f"sqlite:///{db}"


@pytest.fixture
def seeded(url):
    store = AuditStore(url)
    for kind, outcome, patient, detail in [
        ("notification", "success", "Patient/a", {"subscription": "Subscription/s1", "focus": ["Condition/c1"]}),
        ("evaluation", "success", "Patient/a", {"tier": "emergency", "flags": ["limb-weakness"],
                                                 "inputs": {"Condition/c1": "2"}}),
        ("card", "success", "Patient/a", {"hook": "patient-view", "hookInstance": "h1", "cards": ["u1"],
                                          "tier": "emergency"}),
        ("card", "success", "Patient/b", {"hook": "order-sign", "hookInstance": "h2", "cards": ["u2"], "tier": "urgent"}),
        # As service/api/routes/feedback.py records feedback: no patient (CDS Hooks feedback names the
        # card only), the outcome as the record's outcome, the override reason as system and code.
        ("feedback", "overridden", None, {"card": "u1", "overrideReason": {"system": OVERRIDE_SYSTEM,
                                                                            "code": "patient-declined"}}),
        ("feedback", "accepted", None, {"card": "u2"}),
        ("alert", "success", "Patient/a", {"communication": "Communication/k1", "tier": "emergency"}),
        ("alert", "failure", "Patient/b", {"alert_id": "x", "error": "AlertRetry"}),
        ("auth-failure", "failure", None, {"surface": "cds-hooks", "reason": "bad-signature"}),
    ]:
        store.append(kind, outcome, actor="tester", patient=patient, detail=detail)
    return store


@pytest.fixture
def client(url, seeded):
    app = create_app(Settings(environment="test", audit_db_url=url, reviewer_token=TOKEN))
    with TestClient(app) as c:
        yield c


def test_events_need_the_reviewer_token_and_refusals_are_audited(client, seeded):
    assert client.get("/audit/events").status_code == 401
    assert client.get("/audit/events", headers={"Authorization": "Bearer wrong"}).status_code == 401
    refused, _ = seeded.query(kinds=["auth-failure"], newest_first=False)
    assert [r.detail["reason"] for r in refused][-2:] == ["missing-token", "bad-token"]
    assert all("wrong" not in json.dumps(r.detail) for r in refused)  # the offered token is never stored


def test_events_filter_by_patient_type_outcome_and_page(client):
    body = client.get("/audit/events", params={"patient": "Patient/a"}, headers=AUTH).json()
    assert body["total"] == 4 and {e["patient"] for e in body["events"]} == {"Patient/a"}
    body = client.get("/audit/events", params=[("type", "alert"), ("type", "feedback")], headers=AUTH).json()
    assert body["total"] == 4
    body = client.get("/audit/events", params={"outcome": "failure"}, headers=AUTH).json()
    assert {e["kind"] for e in body["events"]} == {"alert", "auth-failure"}
    body = client.get("/audit/events", params={"outcome": "overridden"}, headers=AUTH).json()
    assert [e["detail"]["card"] for e in body["events"]] == ["u1"]
    page = client.get("/audit/events", params={"limit": 3, "offset": 3}, headers=AUTH).json()
    total = page["total"]  # 9 seeded, plus one audit-access record per earlier read
    assert total == 13 and [e["seq"] for e in page["events"]] == [total - 3, total - 4, total - 5]


def test_events_filter_by_time_range(client):
    everything = client.get("/audit/events", headers=AUTH).json()["events"]
    third = sorted(everything, key=lambda e: e["seq"])[2]["recorded"]
    body = client.get("/audit/events", params={"since": third, "limit": 500}, headers=AUTH).json()
    assert min(e["seq"] for e in body["events"]) == 3
    assert client.get("/audit/events", params={"until": "2000-01-01"}, headers=AUTH).json()["total"] == 0
    assert client.get("/audit/events", params={"since": "yesterday"}, headers=AUTH).status_code == 400


def test_reads_are_audited_after_the_read(client, seeded):
    body = client.get("/audit/events", params={"patient": "Patient/a"}, headers=AUTH).json()
    assert all(e["kind"] != "audit-access" for e in body["events"])
    access = seeded.query(kinds=["audit-access"])[0][0]
    assert access.patient == "Patient/a" and access.detail["filters"] == {"patient": "Patient/a"}


def test_events_as_fhir_auditevents(client):
    bundle = client.get("/audit/events", params={"format": "fhir"}, headers=AUTH)
    assert bundle.headers["content-type"].startswith("application/fhir+json")
    Bundle.model_validate(bundle.json())
    for entry in bundle.json()["entry"]:
        AuditEvent.model_validate(entry["resource"])


def test_page_asks_for_the_token_then_shows_timeline_counts_and_events(client):
    first = client.get("/audit")
    assert first.status_code == 401 and 'name="token"' in first.text
    bad = client.post("/audit/login", data={"token": "nope"}, follow_redirects=False)
    assert bad.status_code == 303 and "failed=1" in bad.headers["location"]
    ok = client.post("/audit/login", data={"token": TOKEN}, follow_redirects=False)
    assert ok.status_code == 303 and TOKEN not in ok.headers["set-cookie"]
    page = client.get("/audit", params={"patient": "a"})
    assert page.status_code == 200
    html = page.text
    assert 'id="timeline"' in html
    timeline = html[html.index('id="timeline"'):html.index("</ol>")]
    order = [k for k in ("notification", "evaluation", "card", "feedback", "alert") if f'data-kind="{k}"' in timeline]
    assert order == ["notification", "evaluation", "card", "feedback", "alert"]
    assert timeline.index('data-kind="notification"') < timeline.index('data-kind="alert"')
    assert 'id="count-overridden">1<' in html and 'id="count-accepted">0<' in html
    assert "Patient declined" in html
    assert "Patient/b" not in html.split('id="events"')[1]
    assert "u2" not in timeline  # feedback on another patient's card is not in this timeline


def test_page_counts_all_feedback_without_a_patient(client):
    client.post("/audit/login", data={"token": TOKEN})
    html = client.get("/audit").text
    assert 'id="count-accepted">1<' in html and 'id="count-overridden">1<' in html
    assert 'id="timeline"' not in html


def test_feedback_is_counted_per_card_type_and_tier(client):
    # Override reasons beside acceptance, per hook and tier, through each card's record.
    client.post("/audit/login", data={"token": TOKEN})
    table = client.get("/audit").text.split('id="feedback-per-card"')[1].split("</table>")[0]
    rows = [r for r in table.split("<tr>")[2:]]
    assert "order-sign · urgent" in rows[0] and "<td>1</td>" in rows[0]
    assert "patient-view · emergency" in rows[1] and "Patient declined (1)" in rows[1]


def test_page_escapes_what_it_shows(client, seeded):
    seeded.append("card", "success", actor="<script>alert(1)</script>", patient="Patient/x")
    client.post("/audit/login", data={"token": TOKEN})
    html = client.get("/audit").text
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html


def test_verify_endpoint(client, db):
    assert client.get("/audit/verify", headers=AUTH).json()["ok"] is True
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET patient = 'Patient/z' WHERE seq = 2")
    body = client.get("/audit/verify", headers=AUTH).json()
    assert body["ok"] is False and body["broken_seq"] == 2


def test_production_refuses_the_placeholder_reviewer_token():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="SPINEWATCH_REVIEWER_TOKEN"):
        Settings(environment="production", _env_file=None)


# -- the command line --------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_verify_passes_then_names_an_edited_record(url, db, seeded):
    ok = runner.invoke(cli, ["audit", "verify", "--db", url])
    assert ok.exit_code == 0 and "9 records verified" in ok.output
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET outcome = 'success' WHERE seq = 8")
    broken = runner.invoke(cli, ["audit", "verify", "--db", url])
    assert broken.exit_code == 1 and "record 8" in broken.output


def test_cli_verify_names_a_deleted_and_a_reordered_record(url, db, seeded):
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 4")
    out = runner.invoke(cli, ["audit", "verify", "--db", url])
    assert out.exit_code == 1 and "record 5" in out.output and "record 4 is missing" in out.output


def test_cli_list_filters(url, seeded):
    out = runner.invoke(cli, ["audit", "list", "--db", url, "--patient", "Patient/b", "--json"])
    assert out.exit_code == 0
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["seq"] for r in lines] == [8, 4]


def test_cli_export_fhir_ndjson_and_bundle_validate(url, seeded, tmp_path):
    out = tmp_path / "audit.ndjson"
    res = runner.invoke(cli, ["audit", "export", "--db", url, "--format", "fhir", "--out", str(out)])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["id"] for e in events] == [f"spinewatch-audit-{i}" for i in range(1, 10)]
    for e in events:
        AuditEvent.model_validate(e)
    bundle_path = tmp_path / "audit.json"
    res = runner.invoke(cli, ["audit", "export", "--db", url, "--bundle", "--out", str(bundle_path),
                              "--patient", "Patient/a"])
    assert res.exit_code == 0
    bundle = json.loads(bundle_path.read_text())
    Bundle.model_validate(bundle)
    assert len(bundle["entry"]) == 4
    # Exports are audited in the log they read, and the chain still holds.
    assert seeded.query(kinds=["audit-access"])[1] == 2
    assert seeded.verify().ok


def test_cli_export_json_is_the_stored_records(url, seeded):
    res = runner.invoke(cli, ["audit", "export", "--db", url, "--format", "json", "--kind", "alert"])
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in lines] == ["alert", "alert"] and all(len(r["hash"]) == 64 for r in lines)
    assert runner.invoke(cli, ["audit", "export", "--db", url, "--format", "xml"]).exit_code == 2


# -- the audit CLI: a mistyped --db, a bare patient id ------------------------------------------------

@pytest.mark.parametrize("command", [["verify"], ["list"], ["export", "--format", "json"]])
def test_cli_on_a_mistyped_sqlite_path_says_so_and_creates_nothing(tmp_path, command):
    missing = tmp_path / "mistyped.sqlite"
    out = runner.invoke(cli, ["audit", *command, "--db", f"sqlite:///{missing}"])
    assert out.exit_code == 2
    assert "no audit log at" in out.output and "intact" not in out.output
    assert not missing.exists()


def test_cli_list_and_export_accept_a_bare_patient_id_as_the_api_does(url, seeded):
    bare = runner.invoke(cli, ["audit", "list", "--db", url, "--patient", "b", "--json"])
    assert bare.exit_code == 0
    assert [json.loads(line)["seq"] for line in bare.stdout.splitlines() if line.startswith("{")] == [8, 4]
    res = runner.invoke(cli, ["audit", "export", "--db", url, "--format", "json", "--patient", "a"])
    assert len([line for line in res.stdout.splitlines() if line.startswith("{")]) == 4


# -- anchored heads and the keyed chain through the command line and the API --------------------------

HMAC_KEY = "cli-test-audit-hmac-key-0123456789abcdef"


@pytest.fixture
def keyed_env(monkeypatch):
    from service.core.settings import get_settings

    monkeypatch.setenv("SPINEWATCH_AUDIT_HMAC_KEY", HMAC_KEY)
    get_settings.cache_clear()
    yield HMAC_KEY.encode()
    get_settings.cache_clear()


def _roll_back_tail(db, keep):
    with sqlite3.connect(db) as conn:
        digest = conn.execute("SELECT hash FROM audit_log WHERE seq = ?", (keep,)).fetchone()[0]
        conn.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
        conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (keep, digest))


def test_cli_head_then_verify_expect_head_catches_a_deleted_tail_with_the_head_rolled_back(url, db, seeded):
    out = runner.invoke(cli, ["audit", "head", "--db", url])
    assert out.exit_code == 0
    (line,) = out.stdout.splitlines()
    head = json.loads(line)
    assert (head["seq"], head["hash"]) == seeded.head() and head["seq"] == 9
    _roll_back_tail(db, 7)
    assert runner.invoke(cli, ["audit", "verify", "--db", url]).exit_code == 0  # the chain alone: fooled
    for expected in (line, f"{head['seq']}:{head['hash']}"):
        broken = runner.invoke(cli, ["audit", "verify", "--db", url, "--expect-head", expected])
        assert broken.exit_code == 1
        (message,) = broken.output.strip().splitlines()
        assert message == ("audit log BROKEN at record 8: the log ends at record 7 but an expected head names "
                           "record 9: records 8..9 were deleted and the head rolled back")


def test_cli_verify_expect_head_accepts_the_head_export_file(url, db, seeded, tmp_path):
    anchors = tmp_path / "heads.jsonl"
    heads = []
    for _ in range(2):
        heads.append(runner.invoke(cli, ["audit", "head", "--db", url]).stdout)
        seeded.append("card", "success", actor="tester")
    anchors.write_text("".join(heads))
    ok = runner.invoke(cli, ["audit", "verify", "--db", url, "--expect-head", str(anchors)])
    assert ok.exit_code == 0 and "2 expected head(s) match" in ok.output, ok.output
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 3")
    assert runner.invoke(cli, ["audit", "verify", "--db", url, "--expect-head", str(anchors)]).exit_code == 1


@pytest.mark.parametrize("value", ["9:abc", "x:" + "0" * 64, '{"seq": 1}', "/no/such/heads.jsonl"])
def test_cli_verify_refuses_an_unreadable_expected_head(url, seeded, value):
    out = runner.invoke(cli, ["audit", "verify", "--db", url, "--expect-head", value])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output


def test_cli_on_a_keyed_log_needs_the_key_and_says_where_keying_began(url, seeded, keyed_env, monkeypatch):
    keyed = AuditStore(url, key=keyed_env)
    keyed.append("card", "success", actor="tester")
    ok = runner.invoke(cli, ["audit", "verify", "--db", url])
    assert ok.exit_code == 0
    assert "10 records verified (records 1..9 unkeyed (SHA-256), keyed with HMAC from record 10)" in ok.output
    assert json.loads(runner.invoke(cli, ["audit", "head", "--db", url]).stdout)["keyed_from"] == 10
    from service.core.settings import get_settings

    monkeypatch.setenv("SPINEWATCH_AUDIT_HMAC_KEY", "a-wrong-audit-hmac-key-00000000000000000")
    get_settings.cache_clear()
    wrong = runner.invoke(cli, ["audit", "verify", "--db", url])
    assert wrong.exit_code == 1 and "record 10: wrong key: SPINEWATCH_AUDIT_HMAC_KEY (key id" in wrong.output


def test_verify_endpoint_with_an_expected_head(client, db, seeded):
    seq, digest = seeded.head()
    body = client.get("/audit/verify", params={"expect_head": f"{seq}:{digest}"}, headers=AUTH).json()
    assert body["ok"] is True and body["head_seq"] == seq and body["keyed_from"] is None
    _roll_back_tail(db, 5)
    body = client.get("/audit/verify", params={"expect_head": f"{seq}:{digest}"}, headers=AUTH).json()
    assert body["ok"] is False and body["broken_seq"] == 6 and "head rolled back" in body["reason"]
    assert client.get("/audit/verify", params={"expect_head": "9:nothex"}, headers=AUTH).status_code == 400


def test_production_refuses_an_unkeyed_audit_chain_unless_deliberately_disabled():
    from pydantic import ValidationError

    strong = dict(environment="production", reviewer_token="9f3c1a7e5b2d8046f1e9c3a5b7d2e4f60a1b",
                  notification_token="Zx81-Qw72_Lp45.Mn36+Kj27=Hg18!Fd09", public_base_url="https://cds.example.org",
                  _env_file=None)
    with pytest.raises(ValidationError, match="SPINEWATCH_AUDIT_HMAC_KEY is empty"):
        Settings(**strong)
    with pytest.raises(ValidationError, match="SPINEWATCH_AUDIT_HMAC_KEY is shorter than 32"):
        Settings(**strong, audit_hmac_key="short")
    assert Settings(**strong, audit_hmac_disabled=True).audit_hmac_key is None
    assert Settings(**strong, audit_hmac_key="c0ffee-4d1e-4b2f-9a8c-7e6d5c4b3a29").audit_hmac_key
