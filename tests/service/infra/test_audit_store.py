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

# -- keyed chain (hash version 2) and heads anchored outside the database ------------------------------

KEY = b"test-audit-hmac-key-0123456789abcdef"
OTHER_KEY = b"another-audit-hmac-key-9876543210fedc"


def keyed(db, key=KEY, **kw):
    return AuditStore(f"sqlite:///{db}", key=key, **kw)


def rows(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT seq, recorded, kind, outcome, actor, patient, detail, prev_hash, hash, hash_v "
                            "FROM audit_log ORDER BY seq").fetchall()


def roll_back_tail(db, keep):
    """What an attacker with database access does: delete the newest records and move the head back."""
    with sqlite3.connect(db) as conn:
        seq, digest = conn.execute("SELECT seq, hash FROM audit_log WHERE seq = ?", (keep,)).fetchone()
        conn.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
        conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))


def test_tail_deletion_with_the_head_rolled_back_passes_alone_and_fails_against_an_anchored_head(store, db):
    fill(store)
    anchored = store.current_head()
    assert (anchored.seq, anchored.hash) == store.head() == (6, rows(db)[-1][8])
    roll_back_tail(db, 4)
    assert store.verify().ok  # the chain alone cannot tell: this is what the anchor is for
    result = store.verify(expect={anchored.seq: anchored.hash})
    assert not result.ok and result.broken_seq == 5
    assert "ends at record 4" in result.reason and "deleted and the head rolled back" in result.reason


def test_a_rewrite_with_recomputed_hashes_fails_against_an_anchored_head(store, db):
    from service.infra.audit.records import record_hash

    fill(store)
    anchored = store.current_head()
    prev = rows(db)[1][8]
    with sqlite3.connect(db) as conn:  # edit record 3, recompute 3..6 and the head (unkeyed: anyone can)
        for seq, recorded, kind, outcome, actor, patient, detail, _, _, _ in rows(db)[2:]:
            outcome = "failure" if seq == 3 else outcome
            digest = record_hash(seq=seq, recorded=recorded, kind=kind, outcome=outcome, actor=actor,
                                 patient=patient, detail=detail, prev_hash=prev)
            conn.execute("UPDATE audit_log SET outcome = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                         (outcome, prev, digest, seq))
            prev = digest
        conn.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
    assert store.verify().ok
    result = store.verify(expect={anchored.seq: anchored.hash})
    assert not result.ok and result.broken_seq == 6 and "expected head hash" in result.reason


def test_an_expected_head_that_matches_is_counted(store):
    fill(store)
    middle = store.query(limit=1, offset=2)[0][0]
    result = store.verify(expect={middle.seq: middle.hash, 6: store.head()[1]})
    assert result.ok and result.anchors == 2 and "2 expected head(s) match" in result.message()
    assert AuditStore(store.url).verify(expect={0: GENESIS_HASH}).ok


def test_a_keyed_log_writes_version_2_and_verifies_only_with_its_key(db):
    store = keyed(db)
    fill(store)
    assert {r[9] for r in rows(db)} == {"2"}
    result = store.verify()
    assert result.ok and result.keyed_from == 1 and "HMAC-keyed" in result.message(), result.message()
    unkeyed = AuditStore(store.url).verify()
    assert not unkeyed.ok and unkeyed.broken_seq == 1 and "SPINEWATCH_AUDIT_HMAC_KEY is not set" in unkeyed.reason


def test_a_wrong_key_fails_verification_and_says_so(db):
    fill(keyed(db))
    result = keyed(db, OTHER_KEY).verify()
    assert not result.ok and result.broken_seq == 1
    assert result.reason.startswith("wrong key: SPINEWATCH_AUDIT_HMAC_KEY (key id ")
    assert KEY.decode() not in result.message() and OTHER_KEY.decode() not in result.message()


def test_a_forged_record_with_a_recomputed_unkeyed_hash_is_detected_when_keyed(db):
    from service.infra.audit.records import record_hash

    store = keyed(db)
    fill(store)
    last = rows(db)[-1]
    cols = "seq, recorded, kind, outcome, actor, patient, detail, prev_hash, hash, hash_v"
    for version in (None, "1", "2"):  # unlabelled, labelled unkeyed, or claiming to be keyed
        forged = record_hash(seq=7, recorded=last[1], kind="card", outcome="success", actor="intruder",
                             patient="Patient/p0", detail="{}", prev_hash=last[8])
        with sqlite3.connect(db) as conn:
            conn.execute(f"INSERT INTO audit_log ({cols}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (7, last[1], "card", "success", "intruder", "Patient/p0", "{}", last[8], forged, version))
            conn.execute("UPDATE audit_head SET seq = 7, hash = ? WHERE id = 1", (forged,))
        result = store.verify()
        assert not result.ok and result.broken_seq == 7, result.message()
        assert ("unkeyed record after keying began at record 1" in result.reason if version != "2"
                else "does not match its keyed hash" in result.reason)
        raw(db, "DELETE FROM audit_log WHERE seq = 7")
        raw(db, "UPDATE audit_head SET seq = 6, hash = ? WHERE id = 1", last[8])
    assert store.verify().ok


def test_a_keyed_segment_rewritten_unkeyed_is_detected(db):
    from service.infra.audit.records import record_hash

    store = keyed(db)
    fill(store)
    prev = GENESIS_HASH
    with sqlite3.connect(db) as conn:  # every record recomputed as version 1 (no key needed), and the head
        for seq, recorded, kind, outcome, actor, patient, detail, _, _, _ in rows(db):
            digest = record_hash(seq=seq, recorded=recorded, kind=kind, outcome=outcome, actor=actor,
                                 patient=patient, detail=detail, prev_hash=prev)
            conn.execute("UPDATE audit_log SET prev_hash = ?, hash = ?, hash_v = '1' WHERE seq = ?",
                         (prev, digest, seq))
            prev = digest
        conn.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
    result = store.verify()
    assert not result.ok and "the log head says keyed from record 1 but the records show no keyed record" \
        in result.reason


def test_an_unkeyed_log_switches_to_keyed_and_both_parts_verify(db):
    fill(AuditStore(f"sqlite:///{db}"), 3)
    store = keyed(db)
    assert store.verify().ok and store.verify().keyed_from is None  # keying begins with the next append
    fill(store, 3)
    assert [r[9] for r in rows(db)] == ["1", "1", "1", "2", "2", "2"]
    result = store.verify()
    assert result.ok and result.checked == 6 and result.keyed_from == 4, result.message()
    assert "records 1..3 unkeyed (SHA-256), keyed with HMAC from record 4" in result.message()
    assert store.current_head().keyed_from == 4
    unkeyed = AuditStore(store.url).verify()
    assert not unkeyed.ok and unkeyed.broken_seq == 4


def test_once_keyed_an_unkeyed_or_other_key_writer_appends_nothing(db, tmp_path):
    from service.infra.audit.store import AuditKeyError

    fill(keyed(db), 2)
    for writer in (AuditStore(f"sqlite:///{db}"), keyed(db, OTHER_KEY)):
        with pytest.raises(AuditKeyError, match="nothing appended"):
            writer.append("card", "success", actor="x")
    assert keyed(db).verify().ok and keyed(db).head()[0] == 2
    # An AuditLog without the key: the failed write is counted, never raised into the caller.
    assert AuditLog(Settings(environment="test", audit_db_url=f"sqlite:///{db}")).record("card", "success",
                                                                                        actor="x") is None


def test_a_log_made_before_the_keyed_chain_gets_its_columns_and_keeps_verifying(db):
    fill(AuditStore(f"sqlite:///{db}"), 4)
    with sqlite3.connect(db) as conn:  # the schema of the first release
        conn.execute("ALTER TABLE audit_log DROP COLUMN hash_v")
        conn.execute("ALTER TABLE audit_head DROP COLUMN key_id")
        conn.execute("ALTER TABLE audit_head DROP COLUMN keyed_from")
    store = keyed(db)
    assert store.verify().ok
    fill(store, 2)
    assert [r[9] for r in rows(db)] == [None] * 4 + ["2", "2"]
    assert store.verify().keyed_from == 5


def test_the_head_is_exported_after_every_committed_batch(db, tmp_path):
    import json

    export = tmp_path / "anchors" / "audit-heads.jsonl"
    store = keyed(db, head_export_path=export)
    fill(store, 3)
    store.append_many([("card", "success", "x", None, {}), ("card", "success", "x", None, {})])
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 5]
    assert (lines[-1]["seq"], lines[-1]["hash"]) == store.head() and lines[-1]["key_id"] == store.key_id
    roll_back_tail(db, 3)
    result = store.verify(expect={line["seq"]: line["hash"] for line in lines})
    assert not result.ok and result.broken_seq == 4


def test_an_audit_log_takes_key_and_head_export_from_its_settings(tmp_path):
    import json

    url, export = f"sqlite:///{tmp_path}/k.sqlite", tmp_path / "heads.jsonl"
    settings = Settings(environment="test", audit_db_url=url, audit_hmac_key=KEY.decode(),
                        audit_head_export_path=str(export))
    log = AuditLog(settings, background=True)
    for n in range(3):
        log.event("card", "success", actor="x", detail={"n": n})
    log.flush()
    assert AuditStore(url, key=KEY).verify().keyed_from == 1
    last = json.loads(export.read_text().splitlines()[-1])
    assert (last["seq"], last["hash"]) == AuditStore(url).head()


def test_find_card_is_the_newest_card_record_since_the_bound_listing_that_uuid(store):
    from datetime import datetime, timedelta, timezone

    card = "0b6f5e3c-2f0a-4c1e-9a57-3c2d7f1e8a90"
    now = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
    store.append("card", "success", actor="ehr", patient="Patient/old", detail={"cards": [card]},
                 at=now - timedelta(days=40))
    store.append("feedback", "overridden", actor="ehr", detail={"card": card}, at=now)  # not a card record
    store.append("card", "success", actor="ehr", patient="Patient/p1", detail={"cards": ["x", card], "tier": "urgent"},
                 at=now)
    store.append("card", "success", actor="ehr", patient="Patient/p2", detail={"cards": [card[:-1] + "1"]}, at=now)
    assert store.find_card(card, "2026-03-01T00:00:00.000000Z").patient == "Patient/p1"
    assert store.find_card(card, "2026-01-01T00:00:00.000000Z").patient == "Patient/p1"  # the newest
    assert store.find_card(card, "2026-03-03T00:00:00.000000Z") is None  # none since then
    only_old = card[:-2] + "ff"
    store.append("card", "success", actor="ehr", patient="Patient/old", detail={"cards": [only_old]},
                 at=now - timedelta(days=40))
    assert store.find_card(only_old, "2026-02-01T00:00:00.000000Z") is None  # before the bound
    for not_ours in ("%", "0b6f5e3c-2f0a-4c1e-9a57-3c2d7f1e8a9_", "x", card + "0"):
        assert store.find_card(not_ours, "2000-01-01T00:00:00.000000Z") is None  # no LIKE wildcard of theirs
