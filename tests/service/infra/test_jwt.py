"""CDS Hooks 2.0 "Trusting CDS Clients": the JWT every call carries.

The matrix of issue 3: each bad token is a bare 401 (no reason in the body), whatever endpoint it is
sent to, and the reason is logged, counted and audited but never told to the caller.
"""

from __future__ import annotations

import json
import time

import httpx
import jwt
import pytest
import respx

from tests.support.cds_hooks import (PATIENT_VIEW, Issuer, hook_request, make_env, prefetch_for, record, reset_audit,
                                     url, validate_cds_response, validate_discovery)

SERVICE_PATH = f"/cds-services/{PATIENT_VIEW}"
JKU = "https://ehr.example.org/.well-known/jwks.json"


@pytest.fixture
def env(tmp_path):
    issuer = Issuer("https://ehr.example.org")
    env = make_env(tmp_path, issuer=issuer)
    yield env
    reset_audit()


def _body():
    return hook_request("patient-view", prefetch=prefetch_for(record("routine")))


def _post(env, token: str):
    response = env.client.post(SERVICE_PATH, json=_body(), headers={"Authorization": f"Bearer {token}"})
    if response.status_code == 200:
        validate_cds_response(response.json())
    return response


def assert_bare_401(response):
    assert response.status_code == 401
    assert response.text in ("", "{}"), "a 401 must not say why"
    assert "diagnostics" not in response.text
    assert response.headers.get("www-authenticate", "").lower().startswith("bearer")


def _hs384_with_public_key(issuer: Issuer, aud: str) -> str:
    # The classic algorithm-confusion attack: HMAC "signed" with the verifier's public key. PyJWT
    # refuses to do this itself, so the token is assembled by hand.
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS384", "typ": "JWT", "kid": issuer.kid}).encode())
    payload = b64(json.dumps(issuer.claims(aud)).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(issuer.public_pem, signing_input, hashlib.sha384).digest()
    return f"{header}.{payload}.{b64(signature)}"


def _alg_none(issuer: Issuer, aud: str) -> str:
    return jwt.encode(issuer.claims(aud), None, algorithm="none", headers={"kid": issuer.kid})


def _replayed(env, aud: str) -> str:
    token = env.issuer.token(aud)
    assert _post(env, token).status_code == 200  # first use: accepted
    return token


# Issue 3, "What must show": the JWT test matrix, in its order.
MATRIX = {
    "alg none": lambda env, aud: _alg_none(env.issuer, aud),
    "HS384 signed with the public key": lambda env, aud: _hs384_with_public_key(env.issuer, aud),
    "wrong aud": lambda env, aud: env.issuer.token(url("/cds-services/some-other-service")),
    "expired": lambda env, aud: env.issuer.token(aud, iat=int(time.time()) - 600, exp=int(time.time()) - 120),
    "future iat": lambda env, aud: env.issuer.token(aud, iat=int(time.time()) + 600, exp=int(time.time()) + 900),
    "replayed jti": _replayed,
    "unknown iss": lambda env, aud: env.issuer.token(aud, iss="https://attacker.example.com"),
    "jku not allowlisted": lambda env, aud: env.issuer.token(aud, headers={"jku": "https://attacker.example.com/jwks"}),
    "bad signature": lambda env, aud: Issuer(env.issuer.iss, kid=env.issuer.kid).token(aud),
}


# The reason each case is refused for, as logged and audited (never told to the caller).
REASONS = {"alg none": "alg-not-allowed", "HS384 signed with the public key": "alg-not-allowed",
           "wrong aud": "wrong-aud", "expired": "expired", "future iat": "not-yet-valid",
           "replayed jti": "replayed-jti", "unknown iss": "unknown-iss", "jku not allowlisted": "jku-not-allowed",
           "bad signature": "bad-signature"}


@pytest.mark.parametrize("case", list(MATRIX))
def test_jwt_matrix_each_case_is_a_bare_401(env, case):
    response = _post(env, MATRIX[case](env, url(SERVICE_PATH)))
    assert_bare_401(response)
    [failure] = env.audit_records("auth-failure")  # refused for the reason under test, not another
    assert failure.detail["reason"] == REASONS[case]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
                                     {"Authorization": "Bearer not-a-jwt"}])
def test_missing_or_malformed_bearer_is_a_bare_401(env, headers):
    assert_bare_401(env.client.post(SERVICE_PATH, json=_body(), headers=headers))


def test_discovery_and_feedback_need_the_jwt_too(env):
    # 2.0: "this is for every single CDS Service call, whether that be a Discovery call, a single
    # CDS Service invocation, or multiple exchanges relating to a single service".
    assert_bare_401(env.client.get("/cds-services"))
    assert_bare_401(env.client.post(f"{SERVICE_PATH}/feedback", json={"feedback": []}))
    # A token for the service endpoint is not one for discovery (aud is the URL called).
    assert_bare_401(env.client.get("/cds-services", headers=env.headers(SERVICE_PATH)))
    response = env.discover()
    assert response.status_code == 200
    validate_discovery(response.json())


def test_missing_required_claims_are_refused(env):
    aud = url(SERVICE_PATH)
    for claim in ("jti", "exp", "iat"):
        assert_bare_401(_post(env, env.issuer.token(aud, **{claim: None})))
    assert_bare_401(_post(env, env.issuer.token(None)))  # no aud
    assert_bare_401(_post(env, env.issuer.token(aud, headers={"kid": None})))  # kid is REQUIRED


def test_failure_is_logged_counted_and_audited_without_the_token(env, caplog):
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("spinewatch_auth_failures_total",
                                       {"surface": "cds-hooks", "reason": "expired"}) or 0
    token = MATRIX["expired"](env, url(SERVICE_PATH))
    assert_bare_401(_post(env, token))
    after = REGISTRY.get_sample_value("spinewatch_auth_failures_total", {"surface": "cds-hooks", "reason": "expired"})
    assert after == before + 1
    assert "cds.auth_failed" in caplog.text and "'reason': 'expired'" in caplog.text
    assert token not in caplog.text and token.split(".")[1] not in caplog.text
    [failure] = env.audit_records("auth-failure")
    assert failure.outcome == "failure" and failure.actor == env.issuer.iss
    assert failure.detail["reason"] == "expired" and failure.detail["surface"] == "cds-hooks"
    assert token not in json.dumps(failure.detail)


def test_clock_skew_is_allowed(env):
    aud = url(SERVICE_PATH)
    now = int(time.time())
    assert _post(env, env.issuer.token(aud, iat=now + 10, exp=now + 300)).status_code == 200  # within 30 s
    assert _post(env, env.issuer.token(aud, iat=now - 300, exp=now - 10)).status_code == 200


def test_aud_as_an_array_is_accepted(env):
    assert _post(env, env.issuer.token([url(SERVICE_PATH), "https://elsewhere.example.org"])).status_code == 200


def test_rs384_is_accepted(tmp_path):
    env = make_env(tmp_path, issuer=Issuer("https://rsa-ehr.example.org", alg="RS384"))
    try:
        assert _post(env, env.issuer.token(url(SERVICE_PATH))).status_code == 200
        # An RS256 token from the same key is still refused: only ES384 and RS384.
        assert_bare_401(_post(env, env.issuer.token(url(SERVICE_PATH), alg="RS256")))
    finally:
        reset_audit()


def test_key_rotation_unknown_kid_is_refetched(tmp_path, monkeypatch):
    monkeypatch.setattr("service.infra.jwks._REFETCH_UNKNOWN_KID_AFTER", 0.0)
    issuer = Issuer("https://ehr.example.org")
    jwks_url = "https://keys.example.org/jwks.json"
    env = make_env(tmp_path, issuer=Issuer("https://other.example.org"), extra_issuers={issuer.iss: jwks_url})
    env.issuer = issuer
    rotated = Issuer(issuer.iss)
    try:
        with respx.mock() as mock:
            route = mock.get(jwks_url).respond(json=issuer.jwks)
            assert _post(env, issuer.token(url(SERVICE_PATH))).status_code == 200
            route.respond(json={"keys": [issuer.public_jwk, rotated.public_jwk]})  # the EHR adds a key
            env.issuer = rotated
            assert _post(env, rotated.token(url(SERVICE_PATH))).status_code == 200
            assert route.call_count == 2
    finally:
        reset_audit()


def test_jwks_outage_does_not_hold_every_caller(tmp_path):
    issuer = Issuer("https://ehr.example.org")
    jwks_url = "https://keys.example.org/jwks.json"
    env = make_env(tmp_path, issuer=Issuer("https://other.example.org"), extra_issuers={issuer.iss: jwks_url})
    try:
        with respx.mock() as mock:
            route = mock.get(jwks_url).mock(side_effect=httpx.ConnectError("down"))
            for _ in range(3):
                assert_bare_401(_post(env, issuer.token(url(SERVICE_PATH))))
            assert route.call_count == 1  # the failure is remembered for a few seconds
    finally:
        reset_audit()


def test_jku_that_is_not_a_string_is_refused(env):
    assert_bare_401(_post(env, env.issuer.token(url(SERVICE_PATH), headers={"jku": ["https://x"]})))


def test_es256_is_refused(env):
    from cryptography.hazmat.primitives.asymmetric import ec

    p256 = ec.generate_private_key(ec.SECP256R1())
    assert_bare_401(_post(env, env.issuer.token(url(SERVICE_PATH), key=p256, alg="ES256")))


def test_allowlisted_jku_is_fetched_and_cached(tmp_path):
    issuer = Issuer("https://ehr.example.org")
    env = make_env(tmp_path, issuer=Issuer("https://other.example.org"),
                   extra_issuers={issuer.iss: {"jku": [JKU]}})
    env.issuer = issuer
    try:
        with respx.mock(assert_all_called=True) as mock:
            route = mock.get(JKU).respond(json=issuer.jwks)
            for _ in range(3):
                assert _post(env, issuer.token(url(SERVICE_PATH), headers={"jku": JKU})).status_code == 200
            assert route.call_count == 1  # the JWK Set is cached
            # Without the jku header this issuer has no out-of-band JWKS: refused.
            assert_bare_401(_post(env, issuer.token(url(SERVICE_PATH))))
    finally:
        reset_audit()


def test_jwks_url_unreachable_is_a_401_then_recovers(tmp_path, monkeypatch):
    monkeypatch.setattr("service.infra.jwks._RETRY_FAILED_FETCH_AFTER", 0.0)
    issuer = Issuer("https://ehr.example.org")
    jwks_url = "https://keys.example.org/jwks.json"
    env = make_env(tmp_path, issuer=Issuer("https://other.example.org"), extra_issuers={issuer.iss: jwks_url})
    env.issuer = issuer
    try:
        with respx.mock() as mock:
            route = mock.get(jwks_url).mock(side_effect=httpx.ConnectError("down"))
            assert_bare_401(_post(env, issuer.token(url(SERVICE_PATH))))
            route.mock(side_effect=None, return_value=httpx.Response(200, json=issuer.jwks))  # back up
            assert _post(env, issuer.token(url(SERVICE_PATH))).status_code == 200
    finally:
        reset_audit()


def test_public_base_url_is_the_audience_behind_a_proxy(tmp_path):
    env = make_env(tmp_path, public_base_url="https://cds.example.org/spinewatch")
    try:
        ok = env.client.post(SERVICE_PATH, json=_body(), headers=env.issuer.auth(
            "https://cds.example.org/spinewatch" + SERVICE_PATH))
        assert ok.status_code == 200
        # The URL the app itself sees is not what the client called: refused.
        assert_bare_401(env.client.post(SERVICE_PATH, json=_body(),
                                        headers=env.issuer.auth("http://testserver" + SERVICE_PATH)))
    finally:
        reset_audit()


def test_verification_off_is_development_only(tmp_path):
    from pydantic import ValidationError

    from service.core.settings import Settings

    with pytest.raises(ValidationError, match="CDS_VERIFY_JWT"):
        Settings(environment="production", cds_verify_jwt=False, reviewer_token="x" * 32)
    env = make_env(tmp_path, environment="development", cds_verify_jwt=False)
    try:
        response = env.client.post(SERVICE_PATH, json=_body())
        assert response.status_code == 200
        validate_cds_response(response.json())
    finally:
        reset_audit()


def test_no_trusted_issuers_outside_development_trusts_nobody(tmp_path):
    from service.core.trusted_issuers import SANDBOX_ISSUER, parse_trusted_issuers

    assert parse_trusted_issuers(None, "production") == {}
    assert parse_trusted_issuers(None, "test") == {}
    assert SANDBOX_ISSUER in parse_trusted_issuers(None, "development")
    with pytest.raises(ValueError):
        parse_trusted_issuers("[1, 2]", "production")
    with pytest.raises(ValueError):
        parse_trusted_issuers('{"https://x": {}}', "production")


@pytest.mark.integration
def test_replay_cache_in_redis_is_shared(tmp_path, redis_url):
    """Two API processes (two apps) share the jti cache through Redis."""
    issuer = Issuer("https://ehr.example.org")
    first = make_env(tmp_path, issuer=issuer, cds_jti_redis_url=redis_url)
    second = make_env(tmp_path, issuer=issuer, cds_jti_redis_url=redis_url)
    try:
        token = issuer.token(url(SERVICE_PATH))
        assert _post(first, token).status_code == 200
        assert_bare_401(_post(second, token))
    finally:
        reset_audit()


# -- exp / iat must be finite numbers; lifetime and iat age are capped ---------

def _now() -> int:
    return int(time.time())


BAD_CLAIMS = {
    "exp a string": lambda: {"exp": str(_now() + 300)},
    "iat a string": lambda: {"iat": str(_now())},
    "exp a bool": lambda: {"exp": True},
    "iat a bool": lambda: {"iat": True},
    "exp NaN": lambda: {"exp": float("nan")},
    "exp infinite": lambda: {"exp": float("inf")},
    "exp 1e300": lambda: {"exp": 1e300},
    "iat -1e300": lambda: {"iat": -1e300},
    "exp a list": lambda: {"exp": [_now() + 300]},
    "exp null": lambda: {"exp": None, "extra": 1},
}


@pytest.mark.parametrize("case", list(BAD_CLAIMS))
def test_exp_and_iat_that_are_not_finite_numbers_are_a_bare_401(env, case):
    claims = BAD_CLAIMS[case]()
    aud = url(SERVICE_PATH)
    token = jwt.encode({**env.issuer.claims(aud), **claims}, env.issuer.private_key, algorithm=env.issuer.alg,
                       headers={"kid": env.issuer.kid, "typ": "JWT"})
    assert_bare_401(_post(env, token))


@pytest.mark.parametrize("iat,exp,reason", [
    (0, 10 * 365 * 86400, "lifetime-too-long"),   # a ten-year token, issued now
    (0, 3601, "lifetime-too-long"),
    (-7200, 300, "lifetime-too-long"),             # issued two hours ago: iat older than the cap
])
def test_token_lifetime_and_iat_age_are_capped(env, iat, exp, reason):
    now = _now()
    response = _post(env, env.issuer.token(url(SERVICE_PATH), iat=now + iat, exp=now + exp))
    assert_bare_401(response)
    [failure] = env.audit_records("auth-failure")
    assert failure.detail["reason"] == reason


def test_the_lifetime_cap_is_a_setting(tmp_path):
    env = make_env(tmp_path, jwt_max_lifetime_seconds=300)
    try:
        now = _now()
        assert _post(env, env.issuer.token(url(SERVICE_PATH), iat=now, exp=now + 300)).status_code == 200
        assert_bare_401(_post(env, env.issuer.token(url(SERVICE_PATH), iat=now, exp=now + 600)))
        assert_bare_401(_post(env, env.issuer.token(url(SERVICE_PATH), iat=now - 400, exp=now + 60)))
    finally:
        reset_audit()
