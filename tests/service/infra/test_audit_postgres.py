"""The audit store on PostgreSQL: verify names the first broken record after an edit, a deletion and a
reordering made directly in the database; concurrent writers (SELECT ... FOR UPDATE) keep one chain.

The server: SPINEWATCH_AUDIT_DB_URL when it names PostgreSQL (tables go to a throw-away schema), else
Debian's PostgreSQL (apt package `postgresql`) started here in a temporary directory: initdb refuses
to run as root, so as root the cluster is owned by and run as the `postgres` system user (runuser).
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

psycopg = pytest.importorskip("psycopg", reason="psycopg[binary] (test extra) is needed for PostgreSQL tests")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="spinewatch-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        if self.as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no `postgres` user to own the test cluster")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        done = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "spinewatch",
                         "-E", "UTF8", "--no-sync")
        if done.returncode != 0:
            pytest.fail(f"initdb failed: {done.stderr[-500:]}")
        done = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l",
                         str(self.root / "log"), "-o",
                         f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            pytest.fail(f"pg_ctl start failed: {done.stderr[-300:]} {log[-500:]}")
        return f"postgresql://spinewatch@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_url():
    configured = os.environ.get("SPINEWATCH_AUDIT_DB_URL", "")
    if configured.startswith(("postgresql", "postgres:")):
        yield configured
        return
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found: install Debian's `postgresql` package "
                    "(apt-get install -y postgresql) or set SPINEWATCH_AUDIT_DB_URL=postgresql://...")
    server = LocalPostgres(bindir)
    try:
        url = server.start()
        yield url
    finally:
        server.stop()


@pytest.fixture
def url(pg_url):
    """A fresh schema per test: the tables of one test never meet another's (or a real log's)."""
    schema = "audit_test_" + uuid.uuid4().hex[:10]
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in pg_url else "?"
    yield f"{pg_url}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def sql(url, statement, *args):
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        return conn.execute(statement, args or None).fetchall() if statement.lstrip().upper().startswith("SELECT") \
            else conn.execute(statement, args or None)


def filled(url, n=6):
    from service.infra.audit.store import AuditStore

    store = AuditStore(url)
    for i in range(n):
        store.append(["notification", "evaluation", "card", "feedback", "alert", "auth-failure"][i % 6], "success",
                     actor="tester", patient=f"Patient/p{i % 2}", detail={"n": i})
    return store


def test_an_untouched_log_verifies(url):
    store = filled(url)
    result = store.verify()
    assert result.ok and result.checked == 6, result.message()
    store.dispose()


def test_an_edit_is_named(url):
    store = filled(url)
    sql(url, "UPDATE audit_log SET actor = 'intruder' WHERE seq = 3")
    result = store.verify()
    assert not result.ok and result.broken_seq == 3 and "edited" in result.reason
    store.dispose()


def test_a_deletion_is_named(url):
    store = filled(url)
    sql(url, "DELETE FROM audit_log WHERE seq = 4")
    result = store.verify()
    assert not result.ok and result.broken_seq == 5 and "record 4 is missing" in result.reason
    store.dispose()


def test_a_reordering_is_named(url):
    store = filled(url)
    sql(url, "UPDATE audit_log SET seq = -1 WHERE seq = 2")
    sql(url, "UPDATE audit_log SET seq = 2 WHERE seq = 3")
    sql(url, "UPDATE audit_log SET seq = 3 WHERE seq = -1")
    result = store.verify()
    assert not result.ok and result.broken_seq == 2, result.message()
    store.dispose()


def test_the_cli_verifies_postgres_and_exits_non_zero_naming_the_record(url):
    from typer.testing import CliRunner

    from service.cli.main import app

    filled(url).dispose()
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", "--db", url])
    assert ok.exit_code == 0, ok.output
    sql(url, "UPDATE audit_log SET kind = 'card' WHERE seq = 2")
    broken = runner.invoke(app, ["audit", "verify", "--db", url])
    assert broken.exit_code == 1
    assert "record 2" in broken.output


def _writer(url, n, worker):
    from service.infra.audit.store import AuditStore

    store = AuditStore(url)
    for i in range(n):
        store.append("card", "success", actor=f"w{worker}", detail={"i": i})
    store.dispose()


def test_concurrent_writers_keep_one_chain(url):
    from service.infra.audit.store import AuditStore

    AuditStore(url).ensure_schema()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, 30, w)) for w in range(4)]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = AuditStore(url)
    result = store.verify()
    assert result.ok and result.checked == 120, result.message()
    assert time.monotonic() - started < 120
    store.dispose()


# -- keyed chain and anchored heads on PostgreSQL ---------------------------------------------------------

KEY = b"pg-test-audit-hmac-key-0123456789abcdef"


def test_tail_deletion_with_the_head_rolled_back_is_caught_by_an_anchored_head(url):
    store = filled(url)
    anchored = store.current_head()
    (digest,) = sql(url, "SELECT hash FROM audit_log WHERE seq = 4")[0]
    sql(url, "DELETE FROM audit_log WHERE seq > 4")
    sql(url, "UPDATE audit_head SET seq = 4, hash = %s WHERE id = 1", digest)
    assert store.verify().ok
    result = store.verify(expect={anchored.seq: anchored.hash})
    assert not result.ok and result.broken_seq == 5 and "head rolled back" in result.reason
    store.dispose()


def test_an_old_unkeyed_log_migrates_switches_to_keyed_and_verifies_only_with_its_key(url, tmp_path):
    from service.infra.audit.store import AuditKeyError, AuditStore

    filled(url, 3).dispose()
    sql(url, "ALTER TABLE audit_log DROP COLUMN hash_v")  # the schema of the first release
    sql(url, "ALTER TABLE audit_head DROP COLUMN key_id")
    sql(url, "ALTER TABLE audit_head DROP COLUMN keyed_from")
    export = tmp_path / "heads.jsonl"
    store = AuditStore(url, key=KEY, head_export_path=export)
    for i in range(3):
        store.append("card", "success", actor="keyed", detail={"i": i})
    assert [r[0] for r in sql(url, "SELECT hash_v FROM audit_log ORDER BY seq")] == [None] * 3 + ["2"] * 3
    result = store.verify()
    assert result.ok and result.keyed_from == 4, result.message()
    assert len(export.read_text().splitlines()) == 3
    wrong = AuditStore(url, key=b"another-pg-audit-hmac-key-9876543210").verify()
    assert not wrong.ok and wrong.broken_seq == 4 and wrong.reason.startswith("wrong key")
    with pytest.raises(AuditKeyError):
        AuditStore(url).append("card", "success", actor="unkeyed")
    # A forged record with a recomputed unkeyed hash, head moved along: named.
    from service.infra.audit.records import record_hash

    recorded, prev = sql(url, "SELECT recorded, hash FROM audit_log WHERE seq = 6")[0]
    forged = record_hash(seq=7, recorded=recorded, kind="card", outcome="success", actor="x", patient=None,
                         detail="{}", prev_hash=prev)
    sql(url, "INSERT INTO audit_log (seq, recorded, kind, outcome, actor, patient, detail, prev_hash, hash, hash_v) "
             "VALUES (7, %s, 'card', 'success', 'x', NULL, '{}', %s, %s, '1')", recorded, prev, forged)
    sql(url, "UPDATE audit_head SET seq = 7, hash = %s WHERE id = 1", forged)
    result = store.verify()
    assert not result.ok and result.broken_seq == 7 and "after keying began at record 4" in result.reason
    store.dispose()


def _keyed_writer(url, n, worker):
    from service.infra.audit.store import AuditStore

    store = AuditStore(url, key=KEY)
    for i in range(n):
        store.append("card", "success", actor=f"w{worker}", detail={"i": i})
    store.dispose()


def test_concurrent_keyed_writers_keep_one_keyed_chain(url):
    from service.infra.audit.store import AuditStore

    AuditStore(url).ensure_schema()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_keyed_writer, args=(url, 20, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = AuditStore(url, key=KEY)
    result = store.verify()
    assert result.ok and result.checked == 60 and result.keyed_from == 1, result.message()
    store.dispose()
