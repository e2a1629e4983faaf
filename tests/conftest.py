"""Shared fixtures. Real parts: a real redis-server (integration), respx for FHIR (unit/service)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # tests.support importable without installing tests

from tests.support.redis_server import RedisServer  # noqa: E402

pytest_plugins = ["tests.support.sekmet_fixture"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the session; tests use distinct key prefixes or flush db."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is required for integration tests (.ci/run installs it)")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url
