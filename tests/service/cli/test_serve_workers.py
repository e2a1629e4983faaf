"""`spinewatch serve --workers N`: N uvicorn worker processes on one port, sharing the JWT replay cache
(Redis) and the metrics (/metrics sums every worker); N > 1 without SPINEWATCH_CDS_JTI_REDIS_URL is
refused before the port is bound."""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.cli.serve import workers_refusal
from service.core.settings import Settings
from tests.support.cds_hooks import Issuer, hook_request, prefetch_for, record
from tests.support.processes import SPINEWATCH, Proc
from tests.support.redis_server import RedisServer, free_port

ISSUER = "https://ehr.workers.example.org"
HOOK_PATH = "/cds-services/spinewatch-patient-view"
CALLS = 40


def clean_env(tmp: Path, **settings: str) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
        "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp}/audit.sqlite",
        "SPINEWATCH_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)} | settings


def test_one_worker_needs_no_shared_replay_cache():
    assert workers_refusal(Settings(environment="test"), 1) is None


def test_several_workers_need_the_redis_replay_cache():
    assert "SPINEWATCH_CDS_JTI_REDIS_URL" in workers_refusal(Settings(environment="test"), 2)
    assert workers_refusal(Settings(environment="test", cds_jti_redis_url="redis://127.0.0.1:1/1"), 2) is None


def test_serve_refuses_two_workers_without_the_redis_url(tmp_path):
    proc = subprocess.run([*SPINEWATCH, "serve", "--workers", "2", "--port", str(free_port())],
                          env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spinewatch: --workers 2 needs SPINEWATCH_CDS_JTI_REDIS_URL"), lines


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-workers")
    issuer = Issuer(ISSUER, alg="ES384")
    (tmp / "jwks.json").write_text(json.dumps(issuer.jwks))
    port = free_port()
    log = tmp / "api.log"
    with RedisServer() as redis_server:
        env = clean_env(tmp, SPINEWATCH_CDS_TRUSTED_ISSUERS=json.dumps({ISSUER: str(tmp / "jwks.json")}),
                        SPINEWATCH_CDS_JTI_REDIS_URL=redis_server.url.replace("/0", "/1"),
                        SPINEWATCH_REDIS_URL=redis_server.url)

        def both_workers_started() -> bool:  # each worker logs it after its lifespan warm-up
            return log.exists() and log.read_text(errors="replace").count("Application startup complete") == 2

        proc = Proc([*SPINEWATCH, "serve", "--workers", "2", "--port", str(port)], env, log,
                    both_workers_started, "spinewatch serve --workers 2")
        try:
            yield {"base": f"http://127.0.0.1:{port}", "issuer": issuer, "tmp": tmp, "pid": proc.proc.pid}
        finally:
            proc.stop()
        assert not list(tmp.glob("spinewatch-api-metrics-*")), "serve left its metrics folder behind"

def call(base: str, token: str) -> int:
    body = hook_request("patient-view", "p-workers", prefetch_for(record("emergency", "p-workers")))
    with httpx.Client(timeout=30) as fresh_connection:  # a new connection: either worker may accept it
        return fresh_connection.post(base + HOOK_PATH, json=body,
                                     headers={"Authorization": f"Bearer {token}"}).status_code

@pytest.mark.integration
def test_hooks_are_answered_by_two_worker_processes(served):
    base, issuer = served["base"], served["issuer"]
    tokens = [issuer.token(base + HOOK_PATH) for _ in range(CALLS)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda t: call(base, t), tokens))
    assert statuses == [200] * CALLS
    # multiprocess mode: one counter file per process that counted something
    files = list(served["tmp"].glob("spinewatch-api-metrics-*/counter_*.db"))
    pids = {int(re.fullmatch(r"counter_(\d+)\.db", f.name).group(1)) for f in files}
    children = {int(p) for p in Path(f"/proc/{served['pid']}/task/{served['pid']}/children").read_text().split()}
    assert len(pids) == 2 and pids <= children, (pids, children)
    metrics = httpx.get(base + "/metrics", timeout=10).text
    cards = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("spinewatch_cards_served_total{"))
    assert cards >= CALLS  # both workers' cards, whichever worker answered the scrape

@pytest.mark.integration
def test_a_replayed_jwt_is_refused_by_every_worker(served):
    base, issuer = served["base"], served["issuer"]
    token = issuer.token(base + HOOK_PATH)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: call(base, token), range(12)))
    assert sorted(statuses) == [200] + [401] * 11, statuses
