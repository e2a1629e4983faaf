"""`spinewatch worker` with its metrics port: the prometheus multiprocess folder it makes in the temp
dir is removed when it stops, and folders left by workers that were killed are swept at start."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from service.cli.demo.processes import stop_process_group
from tests.support.paths import ROOT
from tests.support.processes import SPINEWATCH, http_up
from tests.support.redis_server import free_port

pytestmark = pytest.mark.integration


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has this pid for now


def test_the_worker_removes_its_metrics_folder_at_exit(redis_server, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    stale = temp / f"spinewatch-worker-metrics-{dead_pid()}-abc123"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
        "TMPDIR": str(temp), "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": redis_server.url,
        "SPINEWATCH_WORKER_METRICS_PORT": str(port), "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp_path}/a.sqlite",
        "SPINEWATCH_RECONCILIATION_INTERVAL_SECONDS": "0", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([*SPINEWATCH, "worker", "--concurrency", "1", "--no-beat"], env=env, cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while not (b"ready." in log.read_bytes() and http_up(f"http://127.0.0.1:{port}/metrics")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        folders = list(temp.glob("spinewatch-worker-metrics-*"))
        assert [f.name.split("-")[3] for f in folders] == [str(proc.pid)]  # the stale one swept, its own made
    finally:
        stop_process_group(proc, timeout=15)  # SIGTERM: Celery's warm shutdown
    assert list(temp.glob("spinewatch-worker-metrics-*")) == [], log.read_text(errors="replace")[-2000:]
