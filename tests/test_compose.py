"""docker-compose.yml is valid (`docker-compose config`, as CI runs it) and says what deployment needs."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.core.settings import Settings
from tests.support.paths import ROOT

COMPOSE = ROOT / "docker-compose.yml"
SPINEWATCH_SERVICES = ("api", "worker", "beat", "subscribe")


@pytest.fixture(scope="module")
def config() -> dict:
    """The file as docker-compose resolves it (anchors merged, defaults interpolated)."""
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (Debian package docker-compose; scripts/bootstrap.sh)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_config_validates(config):
    assert {"api", "worker", "beat", "redis", "postgres", "ehr"} <= set(config["services"])


def test_compose_redis_keeps_queued_work(config):
    command = " ".join(config["services"]["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert config["services"]["redis"]["volumes"]


def test_compose_health_checks(config):
    for name in ("api", "worker", "beat", "redis", "postgres"):
        assert config["services"][name]["healthcheck"]["test"], name
    assert config["services"]["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_audit_log_on_postgres_and_hapi_as_the_ehr(config):
    api = config["services"]["api"]["environment"]
    assert api["SPINEWATCH_AUDIT_DB_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in api["SPINEWATCH_AUDIT_DB_URL"]
    assert config["services"]["ehr"]["image"].startswith("hapiproject/hapi:")
    assert api["SPINEWATCH_FHIR_BASE_URL"] == "http://ehr:8080/fhir"


def test_compose_sets_only_real_settings(config):
    known = {"SPINEWATCH_" + name.upper() for name in Settings.model_fields}
    for name in SPINEWATCH_SERVICES:
        env = config["services"][name]["environment"]
        unknown = {k for k in env if k.startswith("SPINEWATCH_")} - known
        assert not unknown, f"{name}: no such setting {sorted(unknown)} (a typo is silently ignored)"
        assert env["SPINEWATCH_ENVIRONMENT"] == "production"


def test_compose_api_runs_several_workers_with_the_shared_replay_cache(config):
    api = config["services"]["api"]
    command = api["command"]
    assert command[:2] == ["spinewatch", "serve"] and int(command[command.index("--workers") + 1]) >= 2
    # `serve --workers N` refuses N > 1 without it: a JWT could replay on another worker
    assert api["environment"]["SPINEWATCH_CDS_JTI_REDIS_URL"].startswith("redis://redis:6379/")
