"""Issue "Hardening": refused callers are rate limited and audited in bounded amounts (finding 3);
the audit surface sends security headers, and the reviewer session expires and ends at sign-out
(finding 6)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.reviewer import SESSION_COOKIE, session_value
from service.core.metrics import AUTH_FAILURES
from service.core.settings import Settings
from service.infra.audit.store import AuditStore
from service.usecases.auth_failures import AuthFailures
from tests.support.cds_hooks import make_env, reset_audit

TOKEN = "reviewer-hardening-token-0123456789"
NOTIFY = "hardening-notification-secret-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BAD = {"Authorization": "Bearer not-the-token"}


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Writes(list):
    def __call__(self, kind, outcome, *, actor, detail=None):
        self.append({"kind": kind, "outcome": outcome, "actor": actor, "detail": detail})


def counted(surface: str, reason: str) -> float:
    return AUTH_FAILURES.labels(surface=surface, reason=reason)._value.get()


# ---------------------------------------------------------------- the limiter and the aggregation


def test_a_client_is_limited_per_minute_and_told_when_to_retry():
    clock, writes = Clock(), Writes()
    limiter = AuthFailures(per_client=3, global_limit=100, audit_per_window=5, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("audit", "10.0.0.1") is None
        limiter.refused(writes, "audit", "bad-token", "10.0.0.1", actor="10.0.0.1", detail={})
    assert limiter.retry_after("audit", "10.0.0.1") == 60
    clock.t += 20
    assert limiter.retry_after("audit", "10.0.0.1") == 40  # the oldest refusal leaves the window in 40 s
    assert limiter.retry_after("audit", "10.0.0.2") is None  # another address
    assert limiter.retry_after("notifications", "10.0.0.1") is None  # another surface
    clock.t += 40
    assert limiter.retry_after("audit", "10.0.0.1") is None  # the minute has passed


def test_the_global_cap_limits_a_surface_whatever_the_address():
    clock, writes = Clock(), Writes()
    limiter = AuthFailures(per_client=100, global_limit=5, audit_per_window=5, clock=clock)
    for i in range(5):
        limiter.refused(writes, "audit", "bad-token", f"10.0.1.{i}", actor="x", detail={})
    assert limiter.retry_after("audit", "10.9.9.9") == 60
    assert limiter.retry_after("cds-hooks", "10.9.9.9") is None  # a reviewer-login flood leaves the EHR alone
    clock.t += 60
    assert limiter.retry_after("audit", "10.9.9.9") is None


def test_refusals_past_the_first_few_are_summarised_once_per_window():
    clock, writes = Clock(), Writes()
    limiter = AuthFailures(per_client=1000, global_limit=1000, audit_per_window=2, clock=clock)
    for _ in range(50):
        limiter.refused(writes, "audit", "bad-token", "10.0.0.1", actor="10.0.0.1",
                        detail={"surface": "audit", "reason": "bad-token"})
    assert len(writes) == 2 and all(w["detail"] == {"surface": "audit", "reason": "bad-token"} for w in writes)
    limiter.sweep(writes)
    assert len(writes) == 2  # the window is still open
    clock.t += 60
    limiter.sweep(writes)
    limiter.sweep(writes)
    assert writes[2:] == [{"kind": "auth-failure", "outcome": "failure", "actor": "10.0.0.1",
                           "detail": {"surface": "audit", "reason": "bad-token", "count": 50, "individually": 2,
                                      "window": 60, "summary": True}}]
    # A new window: the first refusals are audited one by one again; a window with nothing beyond them
    # needs no summary.
    limiter.refused(writes, "audit", "bad-token", "10.0.0.1", actor="10.0.0.1", detail={})
    limiter.flush(writes)
    assert len(writes) == 4 and writes[3]["detail"] == {}


def test_calls_refused_for_the_limit_are_only_counted_and_summarised():
    clock, writes = Clock(), Writes()
    limiter = AuthFailures(per_client=2, global_limit=4, audit_per_window=5, clock=clock)
    for _ in range(2):
        limiter.refused(writes, "audit", "bad-token", "10.0.0.1", actor="10.0.0.1", detail={})
    for _ in range(10):
        assert limiter.retry_after("audit", "10.0.0.1", writes) is not None
    for i in range(2):
        limiter.refused(writes, "audit", "bad-token", f"10.0.2.{i}", actor="x", detail={})
    for i in range(1000):  # under the global cap only, any address: counted together, memory stays small
        assert limiter.retry_after("audit", f"10.3.{i // 250}.{i % 250}", writes) is not None
    assert len(writes) == 4
    limiter.flush(writes)
    summaries = {(w["actor"], w["detail"]["reason"]): w["detail"]["count"] for w in writes[4:]}
    assert summaries == {("10.0.0.1", "rate-limited"): 10, ("*", "rate-limited"): 1000}
    assert len(limiter._windows) == 0 and len(limiter._clients) <= 4


# ---------------------------------------------------------------- over HTTP


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'audit.sqlite'}"


def make_app(url, **overrides):
    values = dict(environment="test", audit_db_url=url, reviewer_token=TOKEN, notification_token=NOTIFY) | overrides
    return create_app(Settings(**values))


def auth_failures(url) -> list:
    records, _ = AuditStore(url).query(kinds=["auth-failure"], newest_first=False)
    return records


def assert_429(response):
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "throttled"


def test_the_reviewer_token_is_rate_limited_and_then_not_even_checked(url):
    before = counted("audit", "bad-token"), counted("audit", "rate-limited")
    with TestClient(make_app(url, auth_failure_limit=3, auth_failure_audit_per_window=2)) as client:
        for _ in range(3):
            assert client.get("/audit/events", headers=BAD).status_code == 401
        assert_429(client.get("/audit/events", headers=BAD))
        assert_429(client.get("/audit/events", headers=AUTH))  # the right token is not looked at either
        assert_429(client.get("/audit/verify", headers=AUTH))
        assert_429(client.get("/audit"))
        assert_429(client.post("/audit/login", data={"token": TOKEN}))
        assert auth_failures(url)[-1].detail == {"surface": "audit", "reason": "bad-token", "path": "/audit/events"}
        assert len(auth_failures(url)) == 2  # the third refusal waits for the window's summary
    client.app.state.services.audit.flush()
    # Every refusal counted in the metrics; the audit log holds two of them and the summaries.
    assert counted("audit", "bad-token") == before[0] + 3
    assert counted("audit", "rate-limited") == before[1] + 5
    summaries = {r.detail["reason"]: r.detail for r in auth_failures(url) if r.detail.get("summary")}
    assert summaries["bad-token"]["count"] == 3 and summaries["bad-token"]["individually"] == 2
    assert summaries["rate-limited"]["count"] == 5 and summaries["rate-limited"]["surface"] == "audit"


def test_a_flood_of_refusals_writes_a_bounded_number_of_audit_records(url):
    with TestClient(make_app(url, auth_failure_limit=1000, auth_failure_audit_per_window=3)) as client:
        for i in range(120):
            assert client.get("/audit/events", headers={"Authorization": f"Bearer guess-{i}"}).status_code == 401
        for _ in range(30):
            assert client.post("/audit/login", data={"token": "guess"}, follow_redirects=False).status_code == 303
    client.app.state.services.audit.flush()
    records = auth_failures(url)
    assert len(records) == 3 + 1  # three individually, then one summary for the window (never one per call)
    assert records[-1].detail == {"surface": "audit", "reason": "bad-token", "count": 150, "individually": 3,
                                  "window": 60, "summary": True}
    assert records[-1].actor == "testclient"


def test_the_notification_secret_is_rate_limited(url):
    with TestClient(make_app(url, auth_failure_limit=3)) as client:
        headers = {"Authorization": "Bearer wrong", "Content-Type": "application/fhir+json"}
        for _ in range(3):
            assert client.post("/fhir/notifications", content="{}", headers=headers).status_code == 401
        assert_429(client.post("/fhir/notifications", content="{}",
                               headers=headers | {"Authorization": f"Bearer {NOTIFY}"}))


def test_the_cds_jwt_is_rate_limited(tmp_path):
    env = make_env(tmp_path, auth_failure_limit=3, auth_failure_audit_per_window=1)
    try:
        for _ in range(3):
            assert env.client.get("/cds-services", headers=BAD).status_code == 401
        assert_429(env.discover())  # a valid JWT, not checked
        refused = env.audit_records("auth-failure")
        assert len(refused) == 1 and refused[0].detail["surface"] == "cds-hooks"
    finally:
        reset_audit()


# ---------------------------------------------------------------- security headers


def assert_secure_headers(response):
    h = response.headers
    assert h["cache-control"] == "no-store", response.request.url
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    csp = h["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    return csp


def assert_page_allowed_by_its_csp(response):
    csp = assert_secure_headers(response)
    html = response.text
    assert "<script" not in html and not re.search(r"\sstyle\s*=", html) and not re.search(r"\son\w+\s*=", html)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert styles, "the page has its style block"
    for css in styles:
        digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp


def test_the_audit_surface_sends_security_headers(url):
    with TestClient(make_app(url)) as client:
        assert_page_allowed_by_its_csp(client.get("/audit"))  # the sign-in form, 401
        assert_secure_headers(client.get("/audit/events"))  # bare 401
        assert_secure_headers(client.get("/audit/events", headers=AUTH))
        assert_secure_headers(client.get("/audit/events", params={"limit": "x"}, headers=AUTH))  # 400
        assert_secure_headers(client.get("/audit/verify", headers=AUTH))
        login = client.post("/audit/login", data={"token": TOKEN}, follow_redirects=False)
        assert_secure_headers(login)
        page = client.get("/audit")
        assert page.status_code == 200 and "Sign out" in page.text
        assert_page_allowed_by_its_csp(page)
        assert_secure_headers(client.post("/audit/logout", follow_redirects=False))
        assert "content-security-policy" not in client.get("/healthz").headers  # only the audit surface


# ---------------------------------------------------------------- the reviewer session


def cookie_header(value: str) -> dict:
    return {"Cookie": f"{SESSION_COOKIE}={value}"}


def test_the_session_cookie_has_a_lifetime_and_never_carries_the_token(url):
    with TestClient(make_app(url, reviewer_session_seconds=3600)) as client:
        login = client.post("/audit/login", data={"token": TOKEN}, follow_redirects=False)
        set_cookie = login.headers["set-cookie"]
        assert "Max-Age=3600" in set_cookie and "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie
        value = login.cookies[SESSION_COOKIE]
        assert TOKEN not in value
        old_style = hmac.new(TOKEN.encode(), b"spinewatch-review-session", hashlib.sha256).hexdigest()
        assert value != old_style
        # Two sign-ins, two sessions.
        again = client.post("/audit/login", data={"token": TOKEN}, follow_redirects=False).cookies[SESSION_COOKIE]
        assert again != value


def test_an_expired_session_is_refused_server_side(url):
    with TestClient(make_app(url, reviewer_session_seconds=3600)) as client:
        fresh = session_value(TOKEN, issued=int(time.time()) - 3500)
        assert client.get("/audit", headers=cookie_header(fresh)).status_code == 200
        stale = session_value(TOKEN, issued=int(time.time()) - 3601)
        refused = client.get("/audit", headers=cookie_header(stale))
        assert refused.status_code == 401 and 'id="login"' in refused.text
        assert f'{SESSION_COOKIE}=""' in refused.headers.get("set-cookie", "")  # told to drop it
        # The cookie of the old scheme (a MAC of the token, valid for ever) opens nothing now.
        old_style = hmac.new(TOKEN.encode(), b"spinewatch-review-session", hashlib.sha256).hexdigest()
        assert client.get("/audit", headers=cookie_header(old_style)).status_code == 401
        forged = session_value("another-token", issued=int(time.time()))
        assert client.get("/audit", headers=cookie_header(forged)).status_code == 401
    reasons = [r.detail["reason"] for r in auth_failures(url)]
    assert reasons == ["expired-session", "bad-session", "bad-session"]


def test_sign_out_revokes_the_session(url):
    with TestClient(make_app(url)) as client:
        value = client.post("/audit/login", data={"token": TOKEN}, follow_redirects=False).cookies[SESSION_COOKIE]
        assert client.get("/audit", headers=cookie_header(value)).status_code == 200
        out = client.post("/audit/logout", headers=cookie_header(value), follow_redirects=False)
        assert out.status_code == 303
        replayed = client.get("/audit", headers=cookie_header(value))  # a copy of the cookie kept after sign-out
        assert replayed.status_code == 401
        assert client.get("/audit/events", headers=cookie_header(value)).status_code == 401
    assert [r.detail["reason"] for r in auth_failures(url)][-2:] == ["revoked-session", "revoked-session"]
    assert json.dumps([r.detail for r in auth_failures(url)]).count(value) == 0  # the cookie is never stored


def test_a_session_signed_out_in_one_api_process_is_refused_by_another(url, redis_url):
    """Two apps on one shared Redis (SPINEWATCH_CDS_JTI_REDIS_URL), as `serve --workers 2` runs them."""
    import redis

    with TestClient(make_app(url, cds_jti_redis_url=redis_url)) as one, \
            TestClient(make_app(url, cds_jti_redis_url=redis_url)) as other:
        value = one.post("/audit/login", data={"token": TOKEN}, follow_redirects=False).cookies[SESSION_COOKIE]
        assert other.get("/audit", headers=cookie_header(value)).status_code == 200
        assert one.post("/audit/logout", headers=cookie_header(value), follow_redirects=False).status_code == 303
        assert other.get("/audit", headers=cookie_header(value)).status_code == 401
        assert other.get("/audit/events", headers=cookie_header(value)).status_code == 401
    client = redis.Redis.from_url(redis_url)
    try:
        (key,) = client.keys("spinewatch:review-revoked:*")
        assert value.split(".")[0].encode() in key  # the session id, never the cookie's MAC or the token
        assert 0 < client.ttl(key) <= Settings(environment="test").reviewer_session_seconds  # gone with the session
    finally:
        client.close()
    assert [r.detail["reason"] for r in auth_failures(url)][-2:] == ["revoked-session", "revoked-session"]


def test_an_unreachable_session_store_is_503_for_a_cookie_and_the_token_still_works(url):
    from tests.support.redis_server import free_port

    with TestClient(make_app(url, cds_jti_redis_url=f"redis://127.0.0.1:{free_port()}/0")) as client:
        value = client.post("/audit/login", data={"token": TOKEN}, follow_redirects=False).cookies[SESSION_COOKIE]
        refused = client.get("/audit/events", headers=cookie_header(value))
        assert refused.status_code == 503 and refused.json()["issue"][0]["code"] == "transient"
        assert value not in refused.text
        assert client.get("/audit/events", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_an_unreachable_jti_replay_cache_is_503_not_500(tmp_path):
    """A JWT that cannot be checked against the shared replay cache is refused as a dependency that is
    down (503, retry), not as the caller's fault and never as a crash."""
    from tests.support.cds_hooks import PATIENT_VIEW, make_env, reset_audit
    from tests.support.redis_server import free_port

    env = make_env(tmp_path, cds_jti_redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        response = env.call(PATIENT_VIEW, {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                                           "context": {"userId": "Practitioner/1", "patientId": "p1"}})
        assert response.status_code == 503, response.text
        assert response.json()["issue"][0]["code"] == "transient"
    finally:
        reset_audit()
