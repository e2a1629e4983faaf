"""service.infra.fhir.sync (the workers' FHIR client) with respx at the transport: typed errors with FHIR
meaning, paging, timeouts, bearer and SMART Backend Services authentication (service.infra.fhir.auth);
the base both faces share (service.infra.fhir.base); the old module names still export the old names."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.core.errors import (FHIRAuthError, FHIRBadRequest, FHIRNotFound, FHIRNotSupported, FHIRPagingError,
                                 FHIRPreconditionFailed, FHIRResponseError, FHIRServerError, FHIRTransportError)
from service.core.settings import Settings
from service.infra.fhir.auth import BearerAuth, SmartBackendAuth, auth_from_settings
from service.infra.fhir.base import host_allowed, origin, parse_hosts
from service.infra.fhir.sync import FHIRClient

BASE = "https://ehr.example/fhir"
TOKEN_URL = "https://ehr.example/auth/token"
OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}


def bundle(*resources, next_url=None, outcome=False):
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    if outcome:
        entries.append({"resource": OUTCOME, "search": {"mode": "outcome"}})
    b = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    if next_url:
        b["link"] = [{"relation": "next", "url": next_url}]
    return b


@pytest.fixture
def fhir():
    with FHIRClient(BASE, timeout=2) as client:
        yield client


# ---------------- errors ----------------

@pytest.mark.parametrize("status, error, transient", [
    (400, FHIRBadRequest, False), (422, FHIRBadRequest, False), (404, FHIRNotFound, False),
    (410, FHIRNotFound, False), (412, FHIRPreconditionFailed, False), (405, FHIRNotSupported, False),
    (501, FHIRNotSupported, False), (401, FHIRAuthError, False), (403, FHIRAuthError, False),
    (409, FHIRServerError, True), (429, FHIRServerError, True), (500, FHIRServerError, True),
    (502, FHIRServerError, True), (503, FHIRServerError, True), (504, FHIRServerError, True),
])
@respx.mock
def test_http_errors_are_typed_and_say_whether_to_retry(fhir, status, error, transient):
    respx.get(f"{BASE}/Patient/p1").respond(status, json=OUTCOME)
    with pytest.raises(error) as caught:
        fhir.read("Patient", "p1")
    assert caught.value.transient is transient
    assert "p1" not in caught.value.message  # ids in the path stay out of the message
    if status not in (401, 403):
        assert caught.value.status == status and caught.value.outcome == OUTCOME


@respx.mock
def test_timeouts_and_refused_connections_are_transient(fhir):
    respx.get(f"{BASE}/Patient/slow").mock(side_effect=httpx.ReadTimeout("slow"))
    respx.get(f"{BASE}/Patient/down").mock(side_effect=httpx.ConnectError("refused"))
    for rid, text in (("slow", "timed out"), ("down", "ConnectError")):
        with pytest.raises(FHIRTransportError, match=text) as caught:
            fhir.read("Patient", rid)
        assert caught.value.transient


def test_timeout_is_enforced_against_a_real_socket():
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    threading.Thread(target=lambda: (server.accept(), time.sleep(2)), daemon=True).start()
    started = time.monotonic()
    with FHIRClient(f"http://127.0.0.1:{server.getsockname()[1]}/fhir", timeout=0.3) as client:
        with pytest.raises(FHIRTransportError):
            client.read("Patient", "p1")
    assert time.monotonic() - started < 1.5
    server.close()


@respx.mock
def test_non_json_success_is_an_error(fhir):
    respx.get(f"{BASE}/Patient/p1").respond(200, text="<html>proxy</html>")
    with pytest.raises(Exception, match="not JSON"):
        fhir.read("Patient", "p1")


@respx.mock
@pytest.mark.parametrize("body", [[], [{"resourceType": "Patient"}], "Patient", 42, None, True])
def test_json_success_that_is_not_an_object_is_a_permanent_response_error(fhir, body):
    # A 200 whose JSON is not an object was an AttributeError (dead-lettered untyped).
    respx.get(f"{BASE}/Patient/p1").respond(200, content=json.dumps(body).encode(),
                                            headers={"Content-Type": "application/fhir+json"})
    respx.get(f"{BASE}/Condition").respond(200, content=json.dumps(body).encode())
    for call in (lambda: fhir.read("Patient", "p1"), lambda: fhir.search_all("Condition", {"patient": "p1"})):
        with pytest.raises(FHIRResponseError, match="not a JSON object") as caught:
            call()
        assert not caught.value.transient and caught.value.status == 200


@respx.mock
def test_token_endpoint_refusal_whose_json_is_not_an_object_is_an_auth_error():
    pem, _ = keypair("RS384")
    respx.post(TOKEN_URL).respond(400, json=["invalid_client"])
    with FHIRClient(BASE, auth=SmartBackendAuth("c", pem, token_url=TOKEN_URL)) as client:
        with pytest.raises(FHIRAuthError, match="HTTP 400"):
            client.read("Patient", "p1")


# ---------------- search and paging ----------------

@respx.mock
def test_search_follows_next_links_and_skips_outcomes(fhir):
    # respx matches params by inclusion, so the more specific route goes first
    second = respx.get(f"{BASE}/Condition", params={"patient": "p1", "_offset": "1"}).respond(
        200, json=bundle({"resourceType": "Condition", "id": "c2"}, outcome=True))
    first = respx.get(f"{BASE}/Condition", params={"patient": "p1"}).respond(
        200, json=bundle({"resourceType": "Condition", "id": "c1"}, next_url=f"{BASE}/Condition?patient=p1&_offset=1"))
    assert [c["id"] for c in fhir.search("Condition", {"patient": "p1"})] == ["c1", "c2"]
    assert first.called and second.called
    assert first.calls[0].request.headers["accept"] == "application/fhir+json"


@respx.mock
def test_next_link_to_another_origin_is_not_followed(fhir):
    respx.get(f"{BASE}/Condition").respond(200, json=bundle(next_url="https://evil.example/fhir/Condition?page=2"))
    evil = respx.get("https://evil.example/fhir/Condition")
    with pytest.raises(FHIRPagingError, match="another origin"):
        fhir.search_all("Condition", {})
    assert not evil.called


@respx.mock
def test_relative_next_link_is_read_against_the_base(fhir):
    # RFC 3986 §5.2: a relative link resolves against the base, so it stays on the server's origin.
    second = respx.get(f"{BASE}/Condition", params={"page": "2"}).respond(
        200, json=bundle({"resourceType": "Condition", "id": "c2"}))
    respx.get(f"{BASE}/Condition").respond(200, json=bundle({"resourceType": "Condition", "id": "c1"},
                                                            next_url="Condition?page=2"))
    assert [c["id"] for c in fhir.search("Condition", {})] == ["c1", "c2"]
    assert second.called


@respx.mock
@pytest.mark.parametrize("link", ["https://user:pw@ehr.example/fhir/Condition?page=2", "http://ehr.example/fhir/C",
                                  "https://ehr.example:8443/fhir/C", "javascript:alert(1)"])
def test_next_link_with_credentials_or_another_scheme_or_port_is_not_followed(fhir, link):
    respx.get(f"{BASE}/Condition").respond(200, json=bundle(next_url=link))
    with pytest.raises(FHIRPagingError, match="another origin"):
        fhir.search_all("Condition", {})


def test_origins_default_the_port_and_hosts_are_allow_listed_with_or_without_one():
    assert origin("https://EHR.example/fhir") == origin("https://ehr.example:443/x") == ("https", "ehr.example", 443)
    assert origin("urn:uuid:1") is None and origin("Binary/1") is None and origin("http://h:99999/") is None
    allowed = parse_hosts(" ehr.example , other.example:8443,")
    assert allowed == {"ehr.example", "other.example:8443"}
    assert host_allowed("https://ehr.example:9999/fhir", allowed)
    assert host_allowed("https://other.example:8443/fhir", allowed)
    assert not host_allowed("https://other.example/fhir", allowed)
    assert not host_allowed("https://evil.example/fhir", allowed)


@respx.mock
def test_binary_on_another_origin_is_not_read(fhir):
    evil = respx.get("https://evil.example/fhir/Binary/b1")
    with pytest.raises(FHIRPagingError, match="another origin"):
        fhir.read_binary("https://evil.example/fhir/Binary/b1", 1000)
    assert not evil.called


@respx.mock
def test_too_many_pages_fails_rather_than_returning_half_a_record():
    respx.get(f"{BASE}/Observation").respond(200, json=bundle({"resourceType": "Observation", "id": "o"},
                                                              next_url=f"{BASE}/Observation?p=next"))
    with FHIRClient(BASE, max_pages=3) as client:
        with pytest.raises(FHIRPagingError, match="more than 3 pages"):
            client.search_all("Observation", {})


@respx.mock
def test_create_update_and_conditional_create(fhir):
    created = respx.post(f"{BASE}/Communication").respond(201, json={"resourceType": "Communication", "id": "m1"})
    updated = respx.put(f"{BASE}/Subscription/s1").respond(200, json={"resourceType": "Subscription", "id": "s1"})
    assert fhir.create({"resourceType": "Communication"}, if_none_exist="identifier=a|b")["id"] == "m1"
    request = created.calls[0].request
    assert request.headers["If-None-Exist"] == "identifier=a|b"
    assert request.headers["content-type"] == "application/fhir+json"
    assert fhir.update({"resourceType": "Subscription", "id": "s1", "status": "requested"})["id"] == "s1"
    assert json.loads(updated.calls[0].request.content)["status"] == "requested"


@respx.mock
def test_injected_transport_is_the_seam():
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"resourceType": "Patient", "id": "p9"}))
    with FHIRClient(BASE, transport=transport) as client:
        assert client.read("Patient", "p9")["id"] == "p9"


# ---------------- bearer ----------------

@respx.mock
def test_static_bearer_token_is_sent():
    route = respx.get(f"{BASE}/metadata").respond(200, json={"resourceType": "CapabilityStatement"})
    with FHIRClient(BASE, auth=BearerAuth("static-token")) as client:
        client.capabilities()
    assert route.calls[0].request.headers["authorization"] == "Bearer static-token"


def test_bearer_without_token_is_a_settings_error():
    with pytest.raises(ValueError, match="BEARER_TOKEN"):
        auth_from_settings(Settings(fhir_auth="bearer"))


# ---------------- SMART Backend Services ----------------

def keypair(alg: str):
    key = ec.generate_private_key(ec.SECP384R1()) if alg == "ES384" else rsa.generate_private_key(65537, 2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem, key.public_key()


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
@respx.mock
def test_smart_backend_services_client_credentials_with_private_key_jwt(alg):
    pem, public = keypair(alg)
    token = respx.post(TOKEN_URL).respond(200, json={"access_token": "at-1", "token_type": "bearer", "expires_in": 300})
    reads = respx.get(f"{BASE}/Patient/p1").respond(200, json={"resourceType": "Patient", "id": "p1"})
    auth = SmartBackendAuth("spinewatch", pem, alg=alg, key_id="k1", token_url=TOKEN_URL,
                            scope="system/Patient.read")
    with FHIRClient(BASE, auth=auth) as client:
        for _ in range(3):
            client.read("Patient", "p1")
    assert token.call_count == 1  # cached until expiry
    assert {c.request.headers["authorization"] for c in reads.calls} == {"Bearer at-1"}
    form = parse_qs(token.calls[0].request.content.decode())
    assert form["grant_type"] == ["client_credentials"]
    assert form["scope"] == ["system/Patient.read"]
    assert form["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
    assertion = form["client_assertion"][0]
    header = jwt.get_unverified_header(assertion)
    assert (header["alg"], header["kid"], header["typ"]) == (alg, "k1", "JWT")
    claims = jwt.decode(assertion, public, algorithms=[alg], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == "spinewatch"
    assert 0 < claims["exp"] - claims["iat"] <= 300 and len(claims["jti"]) >= 16


@respx.mock
def test_smart_token_is_refreshed_before_expiry_with_a_fresh_jti():
    pem, _ = keypair("ES384")
    token = respx.post(TOKEN_URL).mock(side_effect=[
        httpx.Response(200, json={"access_token": "at-1", "expires_in": 120}),
        httpx.Response(200, json={"access_token": "at-2", "expires_in": 120})])
    reads = respx.get(f"{BASE}/Patient/p1").respond(200, json={"resourceType": "Patient", "id": "p1"})
    clock = Clock()
    auth = SmartBackendAuth("c", pem, alg="ES384", token_url=TOKEN_URL, clock=clock)
    with FHIRClient(BASE, auth=auth) as client:
        client.read("Patient", "p1")
        clock.now += 60
        client.read("Patient", "p1")
        clock.now += 40  # 100 s of 120: inside the refresh margin
        client.read("Patient", "p1")
    assert [c.request.headers["authorization"] for c in reads.calls] == ["Bearer at-1", "Bearer at-1", "Bearer at-2"]
    jtis = {jwt.decode(parse_qs(c.request.content.decode())["client_assertion"][0],
                       options={"verify_signature": False})["jti"] for c in token.calls}
    assert len(jtis) == 2


@respx.mock
def test_a_401_from_the_fhir_server_fetches_a_new_token_once():
    pem, _ = keypair("RS384")
    respx.post(TOKEN_URL).mock(side_effect=[httpx.Response(200, json={"access_token": "old", "expires_in": 3600}),
                                            httpx.Response(200, json={"access_token": "new", "expires_in": 3600})])
    reads = respx.get(f"{BASE}/Patient/p1").mock(side_effect=[
        httpx.Response(401), httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})])
    with FHIRClient(BASE, auth=SmartBackendAuth("c", pem, token_url=TOKEN_URL)) as client:
        assert client.read("Patient", "p1")["id"] == "p1"
    assert [c.request.headers["authorization"] for c in reads.calls] == ["Bearer old", "Bearer new"]


@respx.mock
def test_token_endpoint_refusal_is_a_permanent_auth_error_without_secrets():
    pem, _ = keypair("RS384")
    respx.post(TOKEN_URL).respond(401, json={"error": "invalid_client", "error_description": "unknown key"})
    with FHIRClient(BASE, auth=SmartBackendAuth("c", pem, token_url=TOKEN_URL)) as client:
        with pytest.raises(FHIRAuthError, match="invalid_client") as caught:
            client.read("Patient", "p1")
    assert not caught.value.transient and "BEGIN" not in caught.value.message


@respx.mock
def test_token_endpoint_is_discovered_from_smart_configuration():
    pem, _ = keypair("ES384")
    respx.get(f"{BASE}/.well-known/smart-configuration").respond(200, json={"token_endpoint": TOKEN_URL})
    token = respx.post(TOKEN_URL).respond(200, json={"access_token": "at", "expires_in": 300})
    respx.get(f"{BASE}/metadata").respond(200, json={"resourceType": "CapabilityStatement"})
    with FHIRClient(BASE, auth=SmartBackendAuth("c", pem, alg="ES384", fhir_base_url=BASE)) as client:
        client.capabilities()
    assert token.called


def test_smart_settings_build_the_authenticator(tmp_path):
    pem, _ = keypair("RS384")
    key = tmp_path / "key.pem"
    key.write_text(pem)
    auth = auth_from_settings(Settings(fhir_auth="smart-backend", smart_client_id="c", smart_token_url=TOKEN_URL,
                                       smart_private_key_path=str(key)))
    assert isinstance(auth, SmartBackendAuth) and auth.alg == "RS384"
    with pytest.raises(ValueError, match="RS384 or ES384"):
        SmartBackendAuth("c", pem, alg="HS256", token_url=TOKEN_URL)
