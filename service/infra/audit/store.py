"""The audit log store: append-only, hash-chained, SQLAlchemy (SQLite file by default, PostgreSQL by URL).

Why a hash chain: HIPAA 45 CFR 164.312(b) asks for audit controls and 164.312(c)(1) for protection
against improper alteration; IHE ATNA expects a tamper-evident repository. Each record stores the
SHA-256 of the previous record and a hash over its own canonical content *including its sequence
number*, so editing a record, deleting one, or reordering records (swapping contents or sequence
numbers) breaks the chain at a nameable record. A separate one-row `audit_head` table holds the
last sequence number and hash: it is the row appends lock, and it makes removing the newest
records detectable too (unless the attacker also rewrites the head, see docs/audit.md).

Keyed: with a key (SPINEWATCH_AUDIT_HMAC_KEY) records are written with hash version "2", HMAC-SHA256
(records.py), so nobody without the key can forge a record or recompute a rolled-back tail. The head
names the key (`key_id`) and the first keyed record (`keyed_from`); a store with another key, or with
none, refuses to append to a keyed log (`AuditKeyError`) rather than break its chain. Anchored: with
a head export path each committed batch appends the new head to that file (JSON lines, fsync'd), a
copy kept outside the database for `verify(expect=...)` (`spinewatch audit verify --expect-head`).

Concurrency: several API and worker processes append. Appends are serialised so two writers never
read the same "previous hash":
  - SQLite: `BEGIN IMMEDIATE` takes the database write lock before the head is read (WAL journal,
    so readers are not blocked; a busy timeout makes writers wait instead of failing).
  - PostgreSQL: `SELECT ... FOR UPDATE` on the head row, inside the append transaction.

Records hold references, codes and versions, never free text, tokens or request bodies
(`sanitise_detail` enforces a conservative version of that).

Over 300 lines on purpose: the two tables, the append transaction with its per-dialect locking, the
head export and the reads of the same tables belong together; the pure chain math is records.py.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import structlog
from sqlalchemy import (Column, Integer, MetaData, String, Table, Text, create_engine, event, func, insert, inspect,
                        select)
from sqlalchemy.engine import Engine

from service.core.errors import AuditKeyError  # noqa: F401 - raised here, part of the one tree
from service.infra.audit.records import (GENESIS_HASH, HASH_V1, HASH_V2, AuditRecord, ChainCheck, Head, VerifyResult,
                                         canonical_json, key_id, record_hash, sanitise_detail, utc_iso)

log = structlog.get_logger("spinewatch.audit")


metadata = MetaData()
# The cards SpineWatch serves carry uuid4 ids (fhir_mappings/cds/cards.py).
CARD_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

audit_log = Table(
    "audit_log", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),  # 1, 2, 3 ... with no gaps
    Column("recorded", String(32), nullable=False, index=True),  # UTC ISO-8601, microseconds, "Z"
    Column("kind", String(40), nullable=False, index=True),
    Column("outcome", String(40), nullable=False, index=True),
    Column("actor", String(200), nullable=False),
    Column("patient", String(200), nullable=True, index=True),  # "Patient/id"
    Column("detail", Text, nullable=False),  # canonical JSON, exactly the text that was hashed
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("hash_v", String(4), nullable=True),  # "1" SHA-256, "2" HMAC-SHA256; NULL (older logs) = "1"
)

audit_head = Table(
    "audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("key_id", String(16), nullable=True),  # records.key_id() of the key, NULL: unkeyed so far
    Column("keyed_from", Integer, nullable=True),  # the first keyed record
)
# Columns added after the first release: added to an existing log's tables by ensure_schema.
_ADDED_COLUMNS = {"audit_log": (("hash_v", "VARCHAR(4)"),),
                  "audit_head": (("key_id", "VARCHAR(16)"), ("keyed_from", "INTEGER"))}

def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for memory databases and other dialects)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


class AuditStore:
    """key: the HMAC key (bytes; None: unkeyed, hash version "1"); head_export_path: a file that gets
    the head appended after every committed batch (None: no export)."""

    def __init__(self, url: str, *, key: bytes | None = None, head_export_path: str | os.PathLike | None = None):
        self.url = url
        self.key = key or None
        self.key_id = key_id(self.key) if self.key else None
        self.head_export_path = Path(head_export_path) if head_export_path else None
        self.dialect = url.split(":", 1)[0].split("+", 1)[0]
        if self.dialect == "postgres":  # Heroku-style URL
            url = "postgresql" + url[len("postgres"):]
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3 (the test extra)
        if self.dialect == "sqlite":
            path = sqlite_path(url)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: the driver issues no implicit BEGIN, we send BEGIN IMMEDIATE.
            # pool_reset_on_return=None: every append ends in its own COMMIT or ROLLBACK, so the
            # pool's rollback-on-return would be a wasted round trip per record.
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False,
                                                                   "isolation_level": None},
                                                pool_reset_on_return=None)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        self._ready = False
        self._ready_lock = threading.Lock()

    # -- schema -------------------------------------------------------------------------------
    def ensure_schema(self) -> None:
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            with self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    metadata.create_all(conn)
                    self._add_columns(conn)
                    self._ensure_head(conn)
                    conn.exec_driver_sql("COMMIT")
                else:
                    with conn.begin():
                        # Two processes creating the tables at once would collide: take a
                        # transaction-scoped advisory lock first (key: "SW-AUDIT").
                        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(5357415544)")
                        metadata.create_all(conn)
                        self._add_columns(conn)
                        self._ensure_head(conn)
            self._ready = True

    @staticmethod
    def _add_columns(conn) -> None:
        """A log made before the keyed chain: add its new (nullable) columns; its records stay version "1"."""
        inspector = inspect(conn)
        for table, columns in _ADDED_COLUMNS.items():
            have = {c["name"] for c in inspector.get_columns(table)}
            for name, sql_type in columns:
                if name not in have:
                    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")

    @staticmethod
    def _ensure_head(conn) -> None:
        if conn.execute(select(audit_head.c.id).where(audit_head.c.id == 1)).first() is None:
            conn.execute(insert(audit_head).values(id=1, seq=0, hash=GENESIS_HASH))

    # -- append -------------------------------------------------------------------------------
    # Plain driver SQL on the append path: it runs on every audited request, and building SQLAlchemy
    # Core statements cost several times more CPU than the write itself.
    _COLUMNS = ("seq", "recorded", "kind", "outcome", "actor", "patient", "detail", "prev_hash", "hash", "hash_v")

    def _sql(self) -> tuple[str, str, str]:
        mark = (lambda c: f":{c}") if self.dialect == "sqlite" else (lambda c: f"%({c})s")
        head = ("SELECT seq, hash, key_id, keyed_from FROM audit_head WHERE id = 1"
                + ("" if self.dialect == "sqlite" else " FOR UPDATE"))
        insert_sql = (f"INSERT INTO audit_log ({', '.join(self._COLUMNS)}) "
                      f"VALUES ({', '.join(mark(c) for c in self._COLUMNS)})")
        update_sql = (f"UPDATE audit_head SET seq = {mark('seq')}, hash = {mark('hash')}, key_id = {mark('key_id')}, "
                      f"keyed_from = {mark('keyed_from')} WHERE id = 1")
        return head, insert_sql, update_sql

    def append(self, kind: str, outcome: str, *, actor: str, patient: str | None = None,
               detail: dict | None = None, at: datetime | None = None) -> AuditRecord:
        return self.append_many([(kind, outcome, actor, patient, detail)], at=at)[0]

    def append_many(self, events: list[tuple], at: datetime | None = None) -> list[AuditRecord]:
        """Append (kind, outcome, actor, patient, detail) tuples in order, in one transaction."""
        self.ensure_schema()
        prepared = []
        for kind, outcome, actor, patient, detail in events:
            clean = sanitise_detail(detail)
            prepared.append((kind, outcome, actor, patient, canonical_json(clean), clean))
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, before the head is read
                try:
                    records = self._append_locked(conn, prepared, at)
                    conn.exec_driver_sql("COMMIT")
                except BaseException:
                    conn.exec_driver_sql("ROLLBACK")
                    raise
            else:
                with conn.begin():  # the head row is locked FOR UPDATE until this commits
                    records = self._append_locked(conn, prepared, at)
        if self.head_export_path is not None and records:
            self._export_head(records[-1])
        return records

    def _append_locked(self, conn, prepared, at) -> list[AuditRecord]:
        head_sql, insert_sql, update_sql = self._sql()
        seq, prev, head_key, keyed_from = conn.exec_driver_sql(head_sql).one()
        if head_key is not None and head_key != self.key_id:
            raise AuditKeyError(f"the audit log is HMAC-keyed (key id {head_key}) and this process "
                                + ("has another SPINEWATCH_AUDIT_HMAC_KEY" if self.key_id
                                   else "has no SPINEWATCH_AUDIT_HMAC_KEY") + ": nothing appended")
        if self.key_id is not None and head_key is None:  # keying begins with this batch
            head_key, keyed_from = self.key_id, seq + 1
        version = HASH_V1 if self.key is None else HASH_V2
        # The time is taken under the lock, so record times never go backwards along the chain.
        recorded = utc_iso(at or datetime.now(timezone.utc))
        records, rows = [], []
        for kind, outcome, actor, patient, detail_text, clean in prepared:
            seq += 1
            digest = record_hash(seq=seq, recorded=recorded, kind=kind, outcome=outcome, actor=actor,
                                 patient=patient, detail=detail_text, prev_hash=prev, key=self.key)
            rows.append({"seq": seq, "recorded": recorded, "kind": kind, "outcome": outcome, "actor": actor,
                         "patient": patient, "detail": detail_text, "prev_hash": prev, "hash": digest,
                         "hash_v": version})
            records.append(AuditRecord(seq, recorded, kind, outcome, actor, patient, clean, prev, digest))
            prev = digest
        # One executemany for the batch: each driver call releases and retakes the GIL, and in a
        # serving process every such hand-off can stall the event loop thread.
        conn.exec_driver_sql(insert_sql, rows if len(rows) > 1 else rows[0])
        conn.exec_driver_sql(update_sql, {"seq": seq, "hash": prev, "key_id": head_key, "keyed_from": keyed_from})
        return records

    def _export_head(self, last: AuditRecord) -> None:
        """Append the head just committed to the export file: one JSON line, written with one
        O_APPEND write (lines from several processes never interleave) and fsync'd. Lines from
        concurrent writers may be out of sequence order; each is a valid anchor. A failure is
        logged, never raised: the records are already committed."""
        line = json.dumps({"seq": last.seq, "hash": last.hash, "recorded": last.recorded,
                           "key_id": self.key_id}, sort_keys=True, separators=(",", ":")) + "\n"
        try:
            self.head_export_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.head_export_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("audit.head_export_failed", error=type(exc).__name__, seq=last.seq)

    # -- read ---------------------------------------------------------------------------------
    def query(self, *, patient: str | None = None, kinds: list[str] | None = None, outcome: str | None = None,
              since: str | None = None, until: str | None = None, limit: int = 100, offset: int = 0,
              newest_first: bool = True) -> tuple[list[AuditRecord], int]:
        """Records matching the filters, and the total count (for paging). Times: ISO-8601 UTC strings."""
        self.ensure_schema()
        conditions = []
        if patient:
            conditions.append(audit_log.c.patient == patient)
        if kinds:
            conditions.append(audit_log.c.kind.in_(kinds))
        if outcome:
            conditions.append(audit_log.c.outcome == outcome)
        if since:
            conditions.append(audit_log.c.recorded >= since)
        if until:
            conditions.append(audit_log.c.recorded < until)
        order = audit_log.c.seq.desc() if newest_first else audit_log.c.seq.asc()
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(audit_log).where(*conditions)).scalar_one()
            rows = conn.execute(select(audit_log).where(*conditions).order_by(order).limit(limit).offset(offset))
            return [AuditRecord.from_row(r) for r in rows], total

    def find_card(self, card_uuid: str, since: str) -> AuditRecord | None:
        """The newest `card` record since `since` (ISO-8601 UTC; `recorded` is indexed, the detail is
        not) that served the card with this uuid (CDS Hooks feedback names a card only by its uuid).
        Only uuid-shaped values are looked up: nothing else is one of ours, and the LIKE pattern then
        holds no wildcard of the caller's."""
        if not CARD_UUID.fullmatch(card_uuid):
            return None
        self.ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(select(audit_log).where(audit_log.c.recorded >= since, audit_log.c.kind == "card",
                                                       audit_log.c.detail.like(f'%"{card_uuid}"%'))
                               .order_by(audit_log.c.seq.desc()).limit(1)).first()
        return AuditRecord.from_row(row) if row else None

    def iter_all(self, batch: int = 1000) -> Iterator[AuditRecord]:
        """Every record in chain order, read in batches (the log can be large)."""
        self.ensure_schema()
        last = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(select(audit_log).where(audit_log.c.seq > last)
                                    .order_by(audit_log.c.seq).limit(batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield AuditRecord.from_row(row)
            last = rows[-1].seq

    def head(self) -> tuple[int, str]:
        head = self.current_head()
        return head.seq, head.hash

    def current_head(self) -> Head:
        """The head row: what to keep outside the database (`spinewatch audit head`)."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            return _head(conn)

    # -- verify -------------------------------------------------------------------------------
    def verify(self, expect: dict[int, str] | None = None) -> VerifyResult:
        """Walk the chain from the first record with this store's key; name the first record that does
        not hold. expect: anchored heads {seq: hash} kept elsewhere (each must match, and the log must
        reach them). The head and the records are read in one snapshot, so appends made meanwhile
        are not mistaken for a broken head."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN")  # WAL: one read snapshot from the first read to ROLLBACK
                try:
                    return self._verify(conn, expect)
                finally:
                    conn.exec_driver_sql("ROLLBACK")
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                return self._verify(conn, expect)

    def _verify(self, conn, expect) -> VerifyResult:
        check = ChainCheck(_head(conn), self.key, expect)
        for row in conn.execute(select(audit_log).order_by(audit_log.c.seq)).yield_per(1000):
            m = row._mapping
            if check.row(seq=m["seq"], recorded=m["recorded"], kind=m["kind"], outcome=m["outcome"],
                         actor=m["actor"], patient=m["patient"], detail=m["detail"], prev_hash=m["prev_hash"],
                         hash=m["hash"], hash_v=m["hash_v"]) is not None:
                break
        return check.finish()

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers (the review page) never block appends. synchronous=NORMAL in WAL mode survives
    # a process crash (a power loss may lose the newest commits, never corrupt the chain): it keeps
    # an append cheap on the CDS Hooks hot path.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _head(conn) -> Head:
    row = conn.execute(select(audit_head).where(audit_head.c.id == 1)).one()
    return Head(row.seq, row.hash, row.key_id, row.keyed_from)


_stores: dict[tuple, AuditStore] = {}
_stores_lock = threading.Lock()


def store_for(url: str, *, key: bytes | None = None, head_export_path: str | None = None) -> AuditStore:
    """One store per URL (and key and export path) per process (keyed by pid: a forked worker must not
    share pooled connections)."""
    cache_key = (os.getpid(), url, key_id(key) if key else None, str(head_export_path or ""))
    store = _stores.get(cache_key)
    if store is None:
        with _stores_lock:
            store = _stores.get(cache_key)
            if store is None:
                store = _stores[cache_key] = AuditStore(url, key=key, head_export_path=head_export_path)
    return store


def settings_store(settings, url: str | None = None) -> AuditStore:
    """The store a process's settings describe: SPINEWATCH_AUDIT_DB_URL (or `url`, a log named on the
    command line: then no head export, which belongs to the configured log), SPINEWATCH_AUDIT_HMAC_KEY,
    SPINEWATCH_AUDIT_HEAD_EXPORT_PATH."""
    secret = settings.audit_hmac_key
    key = secret.get_secret_value().encode("utf-8") if secret is not None and secret.get_secret_value() else None
    if url is not None and url != settings.audit_db_url:
        return store_for(url, key=key)
    return store_for(settings.audit_db_url, key=key, head_export_path=settings.audit_head_export_path)
