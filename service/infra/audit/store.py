"""The audit log store: append-only, hash-chained, SQLAlchemy (SQLite file by default, PostgreSQL by URL).

Why a hash chain: HIPAA 45 CFR 164.312(b) asks for audit controls and 164.312(c)(1) for protection
against improper alteration; IHE ATNA expects a tamper-evident repository. Each record stores the
SHA-256 of the previous record and a hash over its own canonical content *including its sequence
number*, so editing a record, deleting one, or reordering records (swapping contents or sequence
numbers) breaks the chain at a nameable record. A separate one-row `audit_head` table holds the
last sequence number and hash: it is the row appends lock, and it makes removing the newest
records detectable too (unless the attacker also rewrites the head, see docs/audit.md).

Concurrency: several API and worker processes append. Appends are serialised so two writers never
read the same "previous hash":
  - SQLite: `BEGIN IMMEDIATE` takes the database write lock before the head is read (WAL journal,
    so readers are not blocked; a busy timeout makes writers wait instead of failing).
  - PostgreSQL: `SELECT ... FOR UPDATE` on the head row, inside the append transaction.

Records hold references, codes and versions, never free text, tokens or request bodies
(`sanitise_detail` enforces a conservative version of that).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, create_engine, event, func, insert, select
from sqlalchemy.engine import Engine

from service.infra.audit.records import (GENESIS_HASH, AuditRecord, VerifyResult, canonical_json, record_hash,
                                         sanitise_detail, utc_iso)


metadata = MetaData()

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
)

audit_head = Table(
    "audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for memory databases and other dialects)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


class AuditStore:
    def __init__(self, url: str):
        self.url = url
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
                    self._ensure_head(conn)
                    conn.exec_driver_sql("COMMIT")
                else:
                    with conn.begin():
                        # Two processes creating the tables at once would collide: take a
                        # transaction-scoped advisory lock first (key: "SW-AUDIT").
                        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(5357415544)")
                        metadata.create_all(conn)
                        self._ensure_head(conn)
            self._ready = True

    @staticmethod
    def _ensure_head(conn) -> None:
        if conn.execute(select(audit_head.c.id).where(audit_head.c.id == 1)).first() is None:
            conn.execute(insert(audit_head).values(id=1, seq=0, hash=GENESIS_HASH))

    # -- append -------------------------------------------------------------------------------
    # Plain driver SQL on the append path: it runs on every audited request, and building SQLAlchemy
    # Core statements cost several times more CPU than the write itself.
    _COLUMNS = ("seq", "recorded", "kind", "outcome", "actor", "patient", "detail", "prev_hash", "hash")

    def _sql(self) -> tuple[str, str, str]:
        mark = (lambda c: f":{c}") if self.dialect == "sqlite" else (lambda c: f"%({c})s")
        head = "SELECT seq, hash FROM audit_head WHERE id = 1" + ("" if self.dialect == "sqlite" else " FOR UPDATE")
        insert_sql = (f"INSERT INTO audit_log ({', '.join(self._COLUMNS)}) "
                      f"VALUES ({', '.join(mark(c) for c in self._COLUMNS)})")
        update_sql = f"UPDATE audit_head SET seq = {mark('seq')}, hash = {mark('hash')} WHERE id = 1"
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
        return records

    def _append_locked(self, conn, prepared, at) -> list[AuditRecord]:
        head_sql, insert_sql, update_sql = self._sql()
        seq, prev = conn.exec_driver_sql(head_sql).one()
        # The time is taken under the lock, so record times never go backwards along the chain.
        recorded = utc_iso(at or datetime.now(timezone.utc))
        records, rows = [], []
        for kind, outcome, actor, patient, detail_text, clean in prepared:
            seq += 1
            digest = record_hash(seq=seq, recorded=recorded, kind=kind, outcome=outcome, actor=actor,
                                 patient=patient, detail=detail_text, prev_hash=prev)
            rows.append({"seq": seq, "recorded": recorded, "kind": kind, "outcome": outcome, "actor": actor,
                         "patient": patient, "detail": detail_text, "prev_hash": prev, "hash": digest})
            records.append(AuditRecord(seq, recorded, kind, outcome, actor, patient, clean, prev, digest))
            prev = digest
        # One executemany for the batch: each driver call releases and retakes the GIL, and in a
        # serving process every such hand-off can stall the event loop thread.
        conn.exec_driver_sql(insert_sql, rows if len(rows) > 1 else rows[0])
        conn.exec_driver_sql(update_sql, {"seq": seq, "hash": prev})
        return records

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
        self.ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(select(audit_head).where(audit_head.c.id == 1)).one()
            return row.seq, row.hash

    # -- verify -------------------------------------------------------------------------------
    def verify(self) -> VerifyResult:
        """Walk the chain from the first record; name the first record that does not hold."""
        self.ensure_schema()
        expected_seq, prev, checked = 1, GENESIS_HASH, 0
        with self.engine.connect() as conn:
            for row in conn.execute(select(audit_log).order_by(audit_log.c.seq)).yield_per(1000):
                m = row._mapping
                if m["seq"] != expected_seq:  # ordered by seq (the primary key): only a gap is possible
                    missing = (f"record {expected_seq} is missing" if m["seq"] == expected_seq + 1
                               else f"records {expected_seq}..{m['seq'] - 1} are missing")
                    return VerifyResult(False, checked, m["seq"], f"{missing} before it (deleted)")
                if m["prev_hash"] != prev:
                    return VerifyResult(False, checked, m["seq"], "previous-hash does not match the record "
                                        "before it (a record was deleted, inserted or reordered)")
                digest = record_hash(seq=m["seq"], recorded=m["recorded"], kind=m["kind"], outcome=m["outcome"],
                                     actor=m["actor"], patient=m["patient"], detail=m["detail"],
                                     prev_hash=m["prev_hash"])
                if digest != m["hash"]:
                    return VerifyResult(False, checked, m["seq"], "content does not match its hash "
                                        "(the record was edited)")
                prev, expected_seq, checked = m["hash"], expected_seq + 1, checked + 1
            head = conn.execute(select(audit_head).where(audit_head.c.id == 1)).one()
        if head.seq != checked or head.hash != prev:
            if head.seq > checked:
                return VerifyResult(False, checked, checked + 1,
                                    f"records {checked + 1}..{head.seq} are missing (the log head says "
                                    f"{head.seq} records)")
            return VerifyResult(False, checked, head.seq or None, "the log head does not match the last record")
        return VerifyResult(True, checked, head_hash=prev)

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


_stores: dict[tuple[int, str], AuditStore] = {}
_stores_lock = threading.Lock()


def store_for(url: str) -> AuditStore:
    """One store per URL per process (keyed by pid: a forked worker must not share pooled connections)."""
    key = (os.getpid(), url)
    store = _stores.get(key)
    if store is None:
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = _stores[key] = AuditStore(url)
    return store
