"""/readyz goes unready when a real redis-server stops and ready again when it comes back."""

import shutil
import time

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.ops import register_check
from service.core.settings import Settings
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis():
    """A redis-server of this test's own: stopping the session one would break other tests."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is required for integration tests (scripts/bootstrap.sh installs it)")
    with RedisServer() as server:
        yield server


def readyz_app(redis_url: str, tmp_path):
    settings = Settings(environment="test", redis_url=redis_url, readiness_timeout_seconds=1.0,
                        audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite")
    app = create_app(settings)
    register_check(app, "fhir", None)  # this test is about Redis only
    return app


def wait_status(client: TestClient, status: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_readyz_follows_redis_down_and_up(own_redis, tmp_path):
    with TestClient(readyz_app(own_redis.url, tmp_path)) as client:
        r = wait_status(client, 200)
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["redis"]["ok"] is True

        own_redis.stop()
        r = wait_status(client, 503)
        assert r.status_code == 503
        assert r.json()["status"] == "unready"
        assert r.json()["checks"]["redis"]["ok"] is False
        assert r.json()["checks"]["audit_store"]["ok"] is True
        assert client.get("/healthz").status_code == 200  # alive all along: no restart wanted

        own_redis.start()  # same port, same append-only data
        r = wait_status(client, 200)
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["redis"]["ok"] is True
