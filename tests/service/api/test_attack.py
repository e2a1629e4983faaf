"""Attacks on the service's surfaces (issue 7), in process (TestClient, respx, a real Redis):

    the JWT matrix of issue 3, extended   clock skew just past the allowance; a key rotated out of the
                                          JWKS; a kid reused with another key
    notifications                         wrong, missing, partial or misplaced secret: 401, nothing
                                          queued, nothing recorded in Redis, audited
    fhirServer outside the allowlist      never contacted (respx would see it), whatever the disguise:
                                          userinfo, suffix domains, metadata IPs, next links, redirects
    oversized and deeply nested bodies    413 / 400 at once, on every body-reading endpoint
"""

from __future__ import annotations

import json
import time

import pytest
import redis
import respx
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.settings import Settings
from tests.support.cds_hooks import (PATIENT_VIEW, R4_METADATA, Issuer, hook_request, make_env, prefetch_for, record,
                                     reset_audit, url, validate_cds_response)

SERVICE_PATH = f"/cds-services/{PATIENT_VIEW}"
TOKEN = "attack-notification-secret-0123456789"
QUICK = 2.0  # seconds: a refusal that takes longer is itself a denial of service


def assert_bare_401(response):
    assert response.status_code == 401, response.text
    assert response.text in ("", "{}")
    assert response.headers.get("www-authenticate", "").lower().startswith("bearer")


def _post(env, token: str, body: dict | None = None):
    body = body or hook_request("patient-view", prefetch=prefetch_for(record("routine")))
    return env.client.post(SERVICE_PATH, json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def env(tmp_path):
    env = make_env(tmp_path, issuer=Issuer("https://ehr.example.org"), jwt_clock_skew_seconds=30,
                   cds_jwks_cache_seconds=0)
    yield env
    reset_audit()


# ---------------------------------------------------------------- the JWT matrix, extended


SKEW = 30
SKEW_CASES = {  # (iat offset, exp offset) from now, and whether it must pass with 30 s of skew
    "iat 20 s ahead (within skew)": (20, 300, True),
    "iat 60 s ahead (past skew)": (60, 300, False),
    "exp 20 s ago (within skew)": (-300, -20, True),
    "exp 60 s ago (past skew)": (-300, -60, False),
    # A one-year token was once accepted; lifetime and iat age are now capped (1 h by default).
    "iat far past, exp far future": (-86400, 86400 * 365, False),
}


@pytest.mark.parametrize("case", list(SKEW_CASES))
def test_clock_skew_is_allowed_up_to_the_setting_and_not_a_second_more(env, case):
    iat, exp, ok = SKEW_CASES[case]
    now = int(time.time())
    response = _post(env, env.issuer.token(url(SERVICE_PATH), iat=now + iat, exp=now + exp))
    if ok:
        assert response.status_code == 200, response.text
    else:
        assert_bare_401(response)


def test_no_skew_allowed_when_set_to_zero(tmp_path):
    env = make_env(tmp_path, jwt_clock_skew_seconds=0)
    try:
        now = int(time.time())
        assert_bare_401(_post(env, env.issuer.token(url(SERVICE_PATH), iat=now + 5, exp=now + 300)))
        assert_bare_401(_post(env, env.issuer.token(url(SERVICE_PATH), iat=now - 300, exp=now - 2)))
    finally:
        reset_audit()


def test_a_key_rotated_out_of_the_jwks_is_refused_and_the_new_one_accepted(env, tmp_path):
    old = env.issuer
    jwks_path = tmp_path / f"jwks-{old.kid}.json"
    assert jwks_path.exists()
    assert _post(env, old.token(url(SERVICE_PATH))).status_code == 200
    new = Issuer(old.iss)  # the EHR rotates: a new key, a new kid; the old key leaves the JWK Set
    jwks_path.write_text(json.dumps(new.jwks))
    assert_bare_401(_post(env, old.token(url(SERVICE_PATH))))
    assert _post(env, new.token(url(SERVICE_PATH))).status_code == 200
    failures = env.audit_records("auth-failure")
    assert [f.detail["reason"] for f in failures] == ["unknown-kid"]


def test_a_kid_reused_with_another_key_refuses_tokens_of_the_old_key(env, tmp_path):
    old = env.issuer
    jwks_path = tmp_path / f"jwks-{old.kid}.json"
    replacement = Issuer(old.iss, kid=old.kid)  # same kid, new key material
    jwks_path.write_text(json.dumps(replacement.jwks))
    assert_bare_401(_post(env, old.token(url(SERVICE_PATH))))
    assert _post(env, replacement.token(url(SERVICE_PATH))).status_code == 200


def test_a_rotated_out_key_stays_refused_for_tokens_signed_before_the_rotation(env, tmp_path):
    """A token minted before the rotation (still inside exp) is not rescued by being older."""
    old = env.issuer
    minted = old.token(url(SERVICE_PATH))
    (tmp_path / f"jwks-{old.kid}.json").write_text(json.dumps(Issuer(old.iss).jwks))
    assert_bare_401(_post(env, minted))


def test_a_token_for_another_issuer_signed_with_a_trusted_key_is_refused(tmp_path):
    trusted, other = Issuer("https://ehr.example.org"), Issuer("https://other.example.org")
    other_jwks = tmp_path / "other.json"
    other_jwks.write_text(json.dumps(other.jwks))
    env = make_env(tmp_path, issuer=trusted, extra_issuers={other.iss: str(other_jwks)})
    try:
        # the trusted EHR's key, the other issuer's name: the key is looked up in the other's JWKS
        assert_bare_401(_post(env, trusted.token(url(SERVICE_PATH), iss=other.iss)))
    finally:
        reset_audit()


# ---------------------------------------------------------------- notifications without the secret


@pytest.fixture
def notifications(redis_url, tmp_path):
    settings = Settings(environment="test", redis_url=redis_url, notification_token=TOKEN,
                        audit_db_url=f"sqlite:///{tmp_path / 'audit.sqlite'}", notification_max_bytes=65536)
    with TestClient(create_app(settings)) as client:
        yield client, redis.Redis.from_url(redis_url, decode_responses=True)


REST_HOOK = {"resourceType": "Condition", "id": "c1", "meta": {"versionId": "1"},
             "subject": {"reference": "Patient/p1"}, "code": {"text": "back pain"}}
BAD_CREDENTIALS = {
    "none": {},
    "empty bearer": {"Authorization": "Bearer "},
    "wrong secret": {"Authorization": "Bearer not-the-secret"},
    "secret plus a character": {"Authorization": f"Bearer {TOKEN}x"},
    "secret minus a character": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "secret as Basic": {"Authorization": f"Basic {TOKEN}"},
    "secret without scheme": {"Authorization": TOKEN},
    "secret in another header": {"X-Notification-Token": TOKEN},
    "secret upper-cased": {"Authorization": f"Bearer {TOKEN.upper()}"},
}


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
@pytest.mark.parametrize("route", ["backport", "rest-hook"])
def test_a_notification_without_the_secret_is_refused_and_changes_nothing(notifications, case, route):
    client, r = notifications
    headers = BAD_CREDENTIALS[case] | {"Content-Type": "application/fhir+json"}
    if route == "rest-hook":
        response = client.put("/fhir/notifications/Condition/c1", content=json.dumps(REST_HOOK), headers=headers)
    else:
        response = client.post(f"/fhir/notifications?token={TOKEN}", content=json.dumps(REST_HOOK), headers=headers)
    assert_bare_401(response)
    assert r.dbsize() == 0, f"a refused notification left {r.keys('*')} in Redis"


def test_a_notification_with_the_secret_is_accepted(notifications):
    client, r = notifications
    response = client.put("/fhir/notifications/Condition/c1", content=json.dumps(REST_HOOK),
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"})
    assert response.status_code == 200, response.text
    assert r.llen("celery") == 1


# ---------------------------------------------------------------- fhirServer outside the allowlist


OUTSIDE = [
    "https://evil.example.com/fhir",
    "https://fhir.example.org.evil.example.com/fhir",  # the allowed name as a prefix
    "https://evilfhir.example.org/fhir",
    "https://fhir.example.org@evil.example.com/fhir",  # userinfo: the host is evil.example.com
    "https://evil.example.com#@fhir.example.org/fhir",
    "http://169.254.169.254/latest/meta-data",  # cloud metadata
    "http://127.0.0.1:6379/",  # our own Redis
    "http://[::1]/fhir",
    "http://2130706433/fhir",  # 127.0.0.1 as a number
    "file:///etc/passwd",
    "gopher://evil.example.com/_",
]


@pytest.mark.parametrize("server", OUTSIDE)
def test_a_fhir_server_outside_the_allowlist_is_never_contacted(env, server):
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mock:
        anything = mock.route().respond(200, json={"resourceType": "Bundle", "type": "searchset", "entry": []})
        body = hook_request("patient-view", fhirServer=server,
                            fhirAuthorization={"access_token": "stolen?", "token_type": "Bearer"})
        response = env.call(PATIENT_VIEW, body)
        assert response.status_code == 412, response.text
        assert not anything.called, f"{server} was contacted: {[c.request.url for c in mock.calls]}"
        assert "stolen?" not in response.text


def test_a_next_link_or_a_redirect_to_outside_the_allowlist_is_never_followed(env):
    allowed = "https://fhir.example.org/fhir"
    with respx.mock(assert_all_called=False) as mock:
        evil = mock.route(host="evil.example.com").respond(200, json=record("emergency")[0])
        mock.get(f"{allowed}/metadata").respond(200, json=R4_METADATA)
        mock.get(f"{allowed}/Patient/p1").respond(302, headers={"Location": "https://evil.example.com/fhir/Patient/p1"})
        response = env.call(PATIENT_VIEW, hook_request("patient-view", fhirServer=allowed))
        assert response.status_code == 412 and not evil.called

        prefetch = prefetch_for(record("emergency"))
        prefetch["observations"]["link"] = [{"relation": "next", "url": "https://evil.example.com/fhir/Observation?page=2"}]
        response = env.call(PATIENT_VIEW, hook_request("patient-view", prefetch=prefetch, fhirServer=allowed,
                                                       fhirAuthorization={"access_token": "t", "token_type": "Bearer"}))
        assert response.status_code == 412 and not evil.called
        # same host, another scheme/port: another origin, refused as well
        prefetch["observations"]["link"] = [{"relation": "next", "url": "http://fhir.example.org:8080/fhir/Observation"}]
        other_port = mock.route(host="fhir.example.org", port=8080).respond(200, json={"resourceType": "Bundle"})
        response = env.call(PATIENT_VIEW, hook_request("patient-view", prefetch=prefetch, fhirServer=allowed))
        assert response.status_code == 412 and not other_port.called


def test_an_allowlisted_fhir_server_is_used(env):
    allowed = "https://fhir.example.org/fhir"
    with respx.mock(assert_all_mocked=True) as mock:
        resources = record("emergency")
        mock.get(f"{allowed}/metadata").respond(200, json=R4_METADATA)
        mock.get(f"{allowed}/Patient/p1").respond(200, json=resources[0])
        for rtype in ("Condition", "Observation", "DiagnosticReport", "ImagingStudy", "ServiceRequest", "Procedure",
                      "DocumentReference"):
            mock.get(f"{allowed}/{rtype}").respond(200, json={
                "resourceType": "Bundle", "type": "searchset",
                "entry": [{"resource": r} for r in resources if r["resourceType"] == rtype]})
        response = env.call(PATIENT_VIEW, hook_request("patient-view", fhirServer=allowed))
        assert response.status_code == 200, response.text
        [card] = validate_cds_response(response.json())
        assert card["indicator"] == "critical"


# ---------------------------------------------------------------- oversized and deeply nested bodies


@pytest.fixture
def small(tmp_path, redis_url):
    env = make_env(tmp_path, max_body_bytes=65536, redis_url=redis_url, notification_token=TOKEN,
                   notification_max_bytes=65536)
    yield env
    reset_audit()


def _targets(env):
    """Every endpoint that reads a body: (name, callable(content, extra headers))."""
    def cds(path):
        return lambda content, headers: env.client.post(path, content=content,
                                                         headers=env.headers(path) | headers)

    def notify(method, path):
        return lambda content, headers: env.client.request(method, path, content=content, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"} | headers)

    return {
        "patient-view": cds(SERVICE_PATH),
        "feedback": cds(SERVICE_PATH + "/feedback"),
        "notification": notify("POST", "/fhir/notifications"),
        "rest-hook": notify("PUT", "/fhir/notifications/Condition/c1"),
    }


TARGETS = ["patient-view", "feedback", "notification", "rest-hook"]


def _big(size: int) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "history", "padding": "x" * size}).encode()


@pytest.mark.parametrize("target", TARGETS)
def test_an_oversized_body_is_413_at_once(small, target):
    send = _targets(small)[target]
    started = time.monotonic()
    response = send(_big(5_000_000), {})
    assert response.status_code == 413, response.text
    assert time.monotonic() - started < QUICK


@pytest.mark.parametrize("target", TARGETS)
def test_an_oversized_body_without_content_length_is_413(small, target):
    send = _targets(small)[target]

    def chunks():  # chunked transfer: no Content-Length to refuse on, so the stream is counted
        for _ in range(100):
            yield b" " * 10_000

    response = send(chunks(), {})
    assert response.status_code == 413, response.text


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape,depth", [("object", 990), ("object", 5_000), ("array", 990), ("array", 30_000)])
def test_a_deeply_nested_body_is_400_at_once(small, target, shape, depth):
    """json.loads raises RecursionError past ~1000 levels: it was a 500 before issue 7."""
    send = _targets(small)[target]
    started = time.monotonic()
    nested = ('{"a":' * depth + "1" + "}" * depth if shape == "object" else "[" * depth + "]" * depth).encode()
    response = send(nested, {})
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert time.monotonic() - started < QUICK


@pytest.mark.parametrize("target", ["patient-view", "notification"])
def test_nesting_inside_a_plausible_body_is_400_not_500(small, target):
    send = _targets(small)[target]
    deep = "[" * 5000 + "]" * 5000
    body = (json.dumps(hook_request("patient-view", prefetch=prefetch_for(record("routine"))))[:-1]
            + f', "extension": {{"x": {deep}}}}}').encode()
    if target == "notification":
        body = ('{"resourceType": "Bundle", "type": "history", "entry": ' + deep + "}").encode()
    response = send(body, {})
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"NaN", b'"just a string"', b"1e999999", b"9" * 5000,
                                     b'{"resourceType": "Bundle", "entry": {"not": "a list"}}'])
def test_garbage_is_4xx_never_5xx(small, target, content):
    response = _targets(small)[target](content, {})
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
