"""/healthz, /readyz (pluggable checks), /metrics and X-Request-ID, through the real app."""

import asyncio
import json

import httpx
import pytest
import respx
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.metrics import NOTIFICATIONS
from service.api.routes.ops import register_check
from service.usecases.readiness import audit_store_check, default_checks, fhir_check
from service.core.settings import Settings


@pytest.fixture
def app(tmp_path):
    return create_app(Settings(environment="test", audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite"))


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


async def ok():
    return None


async def broken():
    raise ConnectionError("redis://:secret@host refused")


async def slow():
    await asyncio.sleep(5)


def test_healthz_is_alive_without_checking_anything(app, client):
    register_check(app, "broken", broken)
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_ready_when_every_check_passes(app, client):
    app.state.services.readiness = {"a": ok, "b": ok}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert set(r.json()["checks"]) == {"a", "b"} and all(c["ok"] for c in r.json()["checks"].values())


def test_readyz_unready_names_the_failing_check_without_echoing_its_message(app, client):
    app.state.services.readiness = {"redis": broken, "fhir": ok}
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unready"
    assert body["checks"]["redis"] == {"ok": False, "error": "ConnectionError", "ms": body["checks"]["redis"]["ms"]}
    assert body["checks"]["fhir"]["ok"] is True
    assert "secret" not in r.text


def test_readyz_check_time_limit(tmp_path):
    app = create_app(Settings(environment="test", readiness_timeout_seconds=0.2,
                              audit_db_url=f"sqlite:///{tmp_path}/a.sqlite"))
    app.state.services.readiness = {"slow": slow}
    with TestClient(app) as client:
        r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["slow"]["error"] == "no answer within 0.2 s"


def test_register_check_adds_and_removes(app, client):
    app.state.services.readiness = {}
    register_check(app, "extra", broken)
    assert client.get("/readyz").status_code == 503
    register_check(app, "extra", None)
    assert client.get("/readyz").status_code == 200


def test_default_checks_follow_the_settings(tmp_path):
    settings = Settings(environment="test", audit_db_url=f"sqlite:///{tmp_path}/a.sqlite")
    assert set(default_checks(settings)) == {"redis", "subscriptions", "configuration", "audit_store", "fhir"}
    assert "audit_store" not in default_checks(Settings(environment="test", audit_enabled=False))


def test_audit_store_check_reaches_the_database(tmp_path):
    asyncio.run(audit_store_check(f"sqlite:///{tmp_path}/a.sqlite")())
    with pytest.raises(Exception):
        asyncio.run(audit_store_check("postgresql://audit:pw@127.0.0.1:1/audit")())  # nothing listens on port 1


@respx.mock
def test_fhir_check_reachable_below_500():
    base = "https://ehr.example.org/fhir"
    route = respx.get(f"{base}/metadata").mock(return_value=httpx.Response(401))
    asyncio.run(fhir_check(base, 1.0)())  # an answer, even "unauthorised", proves it is reachable
    route.mock(return_value=httpx.Response(503))
    with pytest.raises(RuntimeError):
        asyncio.run(fhir_check(base, 1.0)())


def test_metrics_is_prometheus_text_and_counts_a_notification(client):
    def count(text):
        for line in text.splitlines():
            if line.startswith('spinewatch_notifications_total{kind="event",outcome="accepted"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    before = count(r.text)
    for name in ("spinewatch_evaluations_total", "spinewatch_cards_served_total", "spinewatch_alerts_total",
                 "spinewatch_auth_failures_total", "spinewatch_dead_letters_total", "spinewatch_queue_depth",
                 "spinewatch_evaluation_seconds"):
        assert f"# TYPE {name}" in r.text
    NOTIFICATIONS.labels(kind="event", outcome="accepted").inc()
    assert count(client.get("/metrics").text) == before + 1


def test_request_id_is_made_or_kept_and_returned(client):
    made = client.get("/healthz").headers["X-Request-ID"]
    assert len(made) == 32
    assert client.get("/healthz", headers={"X-Request-ID": "ehr-abc.123"}).headers["X-Request-ID"] == "ehr-abc.123"
    forged = client.get("/healthz", headers={"X-Request-ID": 'x"\n{"level":"error"}'}).headers["X-Request-ID"]
    assert forged != 'x"\n{"level":"error"}' and len(forged) == 32


def test_access_log_line_has_request_id_and_route_but_no_query(app):
    import io

    from service.core.logging import configure_logging

    buf = io.StringIO()
    configure_logging(Settings(environment="test", log_level="DEBUG"), stream=buf)
    with TestClient(app) as client:
        client.get("/healthz?patient=Patient/123&name=Smith", headers={"X-Request-ID": "rid-1"})
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    access = [line for line in lines if line["event"] == "http.request"]
    assert access and access[-1]["request_id"] == "rid-1"
    assert access[-1]["route"] == "/healthz" and access[-1]["status"] == 200
    assert "Smith" not in buf.getvalue()
    configure_logging(None)  # back to stderr at INFO for the tests that follow


def test_a_route_that_names_no_line_gets_one_http_request_line(app):
    import io

    from service.core.logging import configure_logging

    buf = io.StringIO()
    configure_logging(None, stream=buf)
    with TestClient(app) as client:
        response = client.get("/openapi.json", headers={"X-Request-ID": "rid-2"})
    configure_logging(None)
    assert response.status_code == 200
    [line] = [line for line in map(json.loads, buf.getvalue().splitlines()) if line.get("request_id") == "rid-2"]
    assert {k: v for k, v in line.items() if k not in ("timestamp", "duration_ms")} == {
        "event": "http.request", "level": "info", "logger": "spinewatch.http", "request_id": "rid-2",
        "method": "GET", "route": "/openapi.json", "status": 200}
    assert line["duration_ms"] >= 0


def test_start_up_freezes_what_it_built_out_of_the_collectors_sight(app):
    import gc

    gc.unfreeze()  # an earlier test's app may have frozen this process already
    assert gc.get_freeze_count() == 0
    with TestClient(app):
        assert gc.get_freeze_count() > 0
