"""The audit store: append-only hash chain on SQLite; verify names the first broken record after an
edit, a deletion and a reordering made directly in the database; concurrent writers keep one chain."""

import multiprocessing
import sqlite3

import pytest

from service.infra.audit.records import GENESIS_HASH, sanitise_detail
from service.infra.audit.store import AuditStore, store_for
from service.infra.audit.writer import AuditLog
from service.core.settings import Settings


@pytest.fixture
def db(tmp_path):
    return tmp_path / "nested" / "audit.sqlite"


@pytest.fixture
def store(db):
    s = AuditStore(f"sqlite:///{db}")
    yield s
    s.dispose()


def fill(store, n=6):
    kinds = ["notification", "evaluation", "card", "feedback", "alert", "auth-failure"]
    return [store.append(kinds[i % len(kinds)], "success", actor="tester", patient=f"Patient/p{i % 2}",
                         detail={"n": i, "ref": f"Condition/c{i}"}) for i in range(n)]


def raw(db, sql, *args):
    with sqlite3.connect(db) as conn:
        conn.execute(sql, args)


def test_creates_the_directory_and_chains_records(store, db):
    records = fill(store)
    assert db.exists()
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(records, records[1:]))
    result = store.verify()
    assert result.ok and result.checked == 6, result.message()


def test_an_empty_log_verifies(store):
    assert store.verify().ok


def test_an_edit_is_named(store, db):
    fill(store)
    raw(db, "UPDATE audit_log SET outcome = 'failure' WHERE seq = 3")
    result = store.verify()
    assert not result.ok and result.broken_seq == 3
    assert "edited" in result.reason


def test_an_edit_of_the_detail_is_named(store, db):
    fill(store)
    raw(db, "UPDATE audit_log SET detail = ? WHERE seq = 4", '{"n":99,"ref":"Condition/c3"}')
    assert store.verify().broken_seq == 4


def test_an_edit_that_recomputes_its_own_hash_breaks_the_next_link(store, db):
    from service.infra.audit.records import record_hash

    fill(store)
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT seq, recorded, kind, actor, patient, detail, prev_hash FROM audit_log "
                           "WHERE seq = 2").fetchone()
        forged = record_hash(seq=2, recorded=row[1], kind=row[2], outcome="failure", actor=row[3], patient=row[4],
                             detail=row[5], prev_hash=row[6])
        conn.execute("UPDATE audit_log SET outcome = 'failure', hash = ? WHERE seq = 2", (forged,))
    result = store.verify()
    assert not result.ok and result.broken_seq == 3, result.message()


def test_a_deletion_is_named(store, db):
    fill(store)
    raw(db, "DELETE FROM audit_log WHERE seq = 4")
    result = store.verify()
    assert not result.ok and result.broken_seq == 5
    assert "record 4 is missing" in result.reason


def test_deleting_the_newest_records_is_detected_by_the_head(store, db):
    fill(store)
    raw(db, "DELETE FROM audit_log WHERE seq >= 5")
    result = store.verify()
    assert not result.ok and result.broken_seq == 5
    assert "missing" in result.reason


def test_deleting_the_first_record_is_named(store, db):
    fill(store)
    raw(db, "DELETE FROM audit_log WHERE seq = 1")
    result = store.verify()
    assert not result.ok and result.broken_seq == 2


def test_reordering_by_swapping_sequence_numbers_is_named(store, db):
    fill(store)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = 3")
        conn.execute("UPDATE audit_log SET seq = 3 WHERE seq = 4")
        conn.execute("UPDATE audit_log SET seq = 4 WHERE seq = -1")
    result = store.verify()
    assert not result.ok and result.broken_seq == 3, result.message()


def test_reordering_by_swapping_contents_is_named(store, db):
    fill(store)
    cols = "recorded, kind, outcome, actor, patient, detail, prev_hash, hash"
    with sqlite3.connect(db) as conn:
        a = conn.execute(f"SELECT {cols} FROM audit_log WHERE seq = 2").fetchone()
        b = conn.execute(f"SELECT {cols} FROM audit_log WHERE seq = 5").fetchone()
        sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
        conn.execute(f"UPDATE audit_log SET {sets} WHERE seq = 2", b)
        conn.execute(f"UPDATE audit_log SET {sets} WHERE seq = 5", a)
    result = store.verify()
    assert not result.ok and result.broken_seq == 2, result.message()


def test_details_keep_references_and_codes_and_drop_secrets_and_text():
    clean = sanitise_detail({"hook": "patient-view", "token": "eyJ...", "Authorization": "Bearer x",
                             "note": "patient says...", "inputs": {"Condition/1": "3"},
                             "long": "x" * 1000, "flags": {"b", "a"}})
    assert clean == {"hook": "patient-view", "inputs": {"Condition/1": "3"}, "long": "[dropped: too long]",
                     "flags": ["a", "b"]}


def test_query_filters_and_pages(store):
    fill(store, 12)
    records, total = store.query(patient="Patient/p1", limit=2)
    assert total == 6 and [r.seq for r in records] == [12, 10]
    records, total = store.query(kinds=["card", "alert"], limit=50, newest_first=False)
    assert [r.kind for r in records] == ["card", "alert", "card", "alert"] and total == 4
    first = store.query(limit=1, newest_first=False)[0][0]
    assert store.query(since=first.recorded, until=first.recorded)[1] == 0
    assert store.query(since=first.recorded, limit=100)[1] == 12


def _writer(url, n, worker):
    s = AuditStore(url)
    for i in range(n):
        s.append("card", "success", actor=f"w{worker}", detail={"i": i})
    s.dispose()


def test_concurrent_writers_in_several_processes_keep_one_unbroken_chain(db):
    url = f"sqlite:///{db}"
    AuditStore(url).ensure_schema()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, 40, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = AuditStore(url)
    result = store.verify()
    assert result.ok and result.checked == 160, result.message()


def test_an_audit_log_writes_to_its_store_and_can_be_switched_off(tmp_path):
    url = f"sqlite:///{tmp_path}/a.sqlite"
    AuditLog(Settings(environment="test", audit_db_url=url)).event(
        "evaluation", "success", actor="worker", patient="Patient/1", detail={"tier": "urgent"})
    assert store_for(url).query()[1] == 1
    AuditLog(Settings(environment="test", audit_db_url=url, audit_enabled=False)).event(
        "evaluation", "success", actor="worker")
    assert store_for(url).query()[1] == 1


def test_a_background_audit_log_writes_once_flushed(tmp_path):
    url = f"sqlite:///{tmp_path}/b.sqlite"
    log = AuditLog(Settings(environment="test", audit_db_url=url), background=True)
    for n in range(3):
        log.event("card", "success", actor="https://ehr.example.org", patient=f"Patient/{n}")
    log.flush()
    assert store_for(url).query()[1] == 3


def test_a_broken_store_never_raises_into_the_caller(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    settings = Settings(environment="test", audit_db_url=f"sqlite:///{blocker}/sub/audit.sqlite")
    assert AuditLog(settings).record("card", "success", actor="x") is None


def test_an_app_has_an_audit_log_of_its_own_settings(tmp_path):
    from service.api.app import create_app

    url = f"sqlite:///{tmp_path}/app.sqlite"
    audit = create_app(Settings(environment="test", audit_db_url=url)).state.services.audit
    for i in range(50):  # a serving process writes in the background, in order, in batches
        audit.event("card", "success", actor="x", detail={"i": i})
    audit.flush()
    records, total = store_for(url).query(limit=100, newest_first=False)
    assert total == 50 and [r.detail["i"] for r in records] == list(range(50))
    assert store_for(url).verify().ok
    audit = create_app(Settings(environment="test", audit_db_url=url, audit_enabled=False)).state.services.audit
    audit.event("card", "success", actor="x")
    audit.flush()
    assert store_for(url).query()[1] == 50


def test_a_background_write_that_fails_is_counted_and_the_writer_goes_on(tmp_path):
    from service.api.app import create_app
    from service.core.metrics import AUDIT_WRITES

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    audit = create_app(Settings(environment="test",
                                audit_db_url=f"sqlite:///{blocker}/sub/audit.sqlite")).state.services.audit
    errors = AUDIT_WRITES.labels(kind="card", outcome="error")._value.get()
    audit.event("card", "success", actor="x")
    audit.flush()
    assert AUDIT_WRITES.labels(kind="card", outcome="error")._value.get() == errors + 1
    url = f"sqlite:///{tmp_path}/ok.sqlite"
    audit = create_app(Settings(environment="test", audit_db_url=url)).state.services.audit
    audit.event("card", "success", actor="x")
    audit.flush()
    assert store_for(url).query()[1] == 1