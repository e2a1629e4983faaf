"""The Medplum stand-in (tests/support/medplum.py) does what Medplum 4.5.2 does, over real HTTP:
FHIR REST and search, classic rest-hook Subscriptions (headers, bodies, retries, AuditEvents,
concurrency), client credentials and SMART Backend Services with scopes as an access policy.
SpineWatch's own clients (FHIRClient, SmartBackendAuth) are used where SpineWatch would talk to it."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.core.errors import FHIRAuthError, FHIRNotFound, FHIRPreconditionFailed
from service.infra.fhir.auth import SmartBackendAuth
from service.infra.fhir.subscriptions import plan, subscription_capability
from service.infra.fhir.sync import FHIRClient
from tests.support.medplum import ATTEMPTS, MedplumStandIn, LocalHTTPServer, retry_delay
from tests.support.medplum import medplum_standin  # noqa: F401  (the fixture)
from tests.support.redis_server import free_port

SECRET_EXTENSION = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret"
ALERT_SYSTEM = "https://spinewatch.example.org/fhir/alert"


# ---------------- a tiny notification receiver ----------------

@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float


class Receiver:
    """Records every request; POSTs answered with `answer(received)` (a status), GETs with `document`."""

    def __init__(self):
        self.requests: list[Received] = []
        self.answer = lambda received: 200
        self.document: dict = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                got = Received("POST", self.path, headers, body, time.monotonic())
                receiver.requests.append(got)
                self._reply(receiver.answer(got), b"")

            def do_GET(self):
                self._reply(200, json.dumps(receiver.document).encode())

            def _reply(self, status, data):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = LocalHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def fhir(medplum_standin):
    with httpx.Client(base_url=medplum_standin.base_url, timeout=10) as client:
        yield client


def subscription(endpoint: str, *, status="active", criteria="Condition?", headers=None, secret=None,
                 payload="application/fhir+json") -> dict:
    channel = {"type": "rest-hook", "endpoint": endpoint, "header": headers or []}
    if payload:
        channel["payload"] = payload
    sub = {"resourceType": "Subscription", "status": status, "reason": "test", "criteria": criteria, "channel": channel}
    if secret:
        sub["extension"] = [{"url": SECRET_EXTENSION, "valueString": secret}]
    return sub


def condition(patient="p1", **extra) -> dict:
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient}"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "363346000"}]}} | extra


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def is_uuid(value) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (TypeError, ValueError):
        return False


# ---------------- FHIR REST ----------------

def test_metadata_is_r4_without_backport_subscriptions(medplum_standin):
    with FHIRClient(medplum_standin.base_url) as client:
        capability = client.capabilities()
        assert capability["fhirVersion"] == "4.0.1"
        assert subscription_capability(capability) == (False, [])
        assert [(p.mode, p.criteria) for p in plan(client, ("Condition", "Observation"))] == \
            [("classic", "Condition?"), ("classic", "Observation?")]


def test_create_adds_medplum_meta_and_read_returns_it(medplum_standin, fhir):
    r = fhir.post("/Condition", json=condition("p1", meta={"tag": [{"code": "t"}], "versionId": "7"}))
    assert r.status_code == 201
    created = r.json()
    meta = created["meta"]
    assert is_uuid(meta["versionId"]) and meta["versionId"] != "7" and meta["tag"] == [{"code": "t"}]
    assert meta["lastUpdated"].endswith("Z") and meta["author"]["reference"].startswith("Practitioner/")
    assert meta["project"] == medplum_standin.project_id
    assert meta["compartment"] == [{"reference": f"Project/{medplum_standin.project_id}"}, {"reference": "Patient/p1"}]
    assert r.headers["location"] == f"{medplum_standin.base_url}/Condition/{created['id']}/_history/{meta['versionId']}"
    assert fhir.get(f"/Condition/{created['id']}").json() == created


def test_update_writes_a_new_version_and_an_unchanged_update_none(fhir):
    created = fhir.post("/Condition", json=condition()).json()
    updated = fhir.put(f"/Condition/{created['id']}", json=created | {"clinicalStatus": {"text": "active"}})
    assert updated.status_code == 200
    assert updated.json()["meta"]["versionId"] != created["meta"]["versionId"]
    again = fhir.put(f"/Condition/{created['id']}", json=updated.json())
    assert again.json()["meta"]["versionId"] == updated.json()["meta"]["versionId"]
    assert len(fhir.get(f"/Condition/{created['id']}/_history").json()["entry"]) == 2
    assert fhir.put(f"/Condition/{created['id']}", json=condition() | {"id": "other"}).status_code == 400


def test_a_deleted_resource_reads_410_and_keeps_its_history(medplum_standin, fhir):
    created = fhir.post("/Condition", json=condition()).json()
    cid, first = created["id"], created["meta"]["versionId"]
    assert fhir.delete(f"/Condition/{cid}").status_code == 200
    gone = fhir.get(f"/Condition/{cid}")
    assert gone.status_code == 410 and gone.json()["resourceType"] == "OperationOutcome"
    history = fhir.get(f"/Condition/{cid}/_history").json()
    assert history["type"] == "history"
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert "resource" not in history["entry"][0] and history["entry"][1]["resource"] == created
    assert fhir.get(f"/Condition/{cid}/_history/{first}").json() == created
    assert fhir.delete(f"/Condition/{cid}").status_code == 410
    with FHIRClient(medplum_standin.base_url) as client, pytest.raises(FHIRNotFound) as caught:
        client.read("Condition", cid)
    assert caught.value.status == 410


def test_conditional_create_returns_the_existing_match(medplum_standin):
    communication = {"resourceType": "Communication", "status": "completed",
                     "identifier": [{"system": ALERT_SYSTEM, "value": "a1"}]}
    with FHIRClient(medplum_standin.base_url) as client:
        first = client.create(communication, if_none_exist=f"identifier={ALERT_SYSTEM}|a1")
        second = client.create(communication, if_none_exist=f"identifier={ALERT_SYSTEM}|a1")
        assert second["id"] == first["id"]
        assert len(client.search_all("Communication", {"identifier": f"{ALERT_SYSTEM}|a1"})) == 1
        client.create(communication)  # an unconditional copy: now two match
        with pytest.raises(FHIRPreconditionFailed):
            client.create(communication, if_none_exist=f"identifier={ALERT_SYSTEM}|a1")


def test_search_parameters_spinewatch_sends(medplum_standin, fhir):
    medplum_standin.preload(
        condition("p1", id="c1", status="x"), condition("p1", id="c2"), condition("p2", id="c3"),
        {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"},
         "effectiveDateTime": "2026-01-01T10:00:00Z"},
        {"resourceType": "Observation", "id": "o2", "subject": {"reference": "Patient/p1"},
         "effectivePeriod": {"start": "2026-03-01"}},
        {"resourceType": "Observation", "id": "o3", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Basic", "id": "b1", "code": {"coding": [{"system": "s", "code": "SubscriptionTopic"}]}},
        {"resourceType": "CareTeam", "id": "t1", "status": "active", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "CareTeam", "id": "t2", "status": "inactive", "subject": {"reference": "Patient/p1"}},
        subscription("http://a.example/hook") | {"id": "s1"}, subscription("http://b.example/hook") | {"id": "s2"})

    def ids(rtype, params):
        r = fhir.get(f"/{rtype}", params=params)
        assert r.status_code == 200, r.text
        return [e["resource"]["id"] for e in r.json()["entry"]]

    assert ids("Condition", {"patient": "p1"}) == ["c1", "c2"]
    assert ids("Condition", {"patient": "Patient/p1"}) == ["c1", "c2"]
    assert ids("Condition", {"subject": "Patient/p2"}) == ["c3"]
    assert ids("Condition", [("patient", "p1"), ("_id", "c2,c3")]) == ["c2"]
    assert ids("CareTeam", {"patient": "Patient/p1", "status": "active"}) == ["t1"]
    assert ids("Basic", {"code": "SubscriptionTopic", "_count": "200"}) == ["b1"]
    assert ids("Basic", {"code": "other|SubscriptionTopic"}) == []
    assert ids("Subscription", {"url": "http://b.example/hook"}) == ["s2"]
    assert ids("Observation", {"patient": "p1", "date": "ge2026-02-01"}) == ["o2"]
    assert ids("Observation", {"patient": "p1", "_sort": "-date"})[:2] == ["o2", "o1"]
    assert ids("Condition", [("_lastUpdated", "ge2000-01-01T00:00:00.000Z"), ("_elements", "subject")]) == \
        ["c1", "c2", "c3"]
    assert ids("Condition", {"_lastUpdated": "ge2999-01-01T00:00:00.000Z"}) == []


def test_search_pages_with_next_links(medplum_standin, fhir):
    medplum_standin.preload(*[condition("p1", id=f"c{n}") for n in range(5)])
    page = fhir.get("/Condition", params={"patient": "p1", "_count": "2"}).json()
    assert len(page["entry"]) == 2
    assert any(link["relation"] == "next" for link in page["link"])
    with FHIRClient(medplum_standin.base_url) as client:
        found = client.search_all("Condition", {"patient": "p1", "_count": "2"})
    assert sorted(r["id"] for r in found) == [f"c{n}" for n in range(5)]


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/Condition?unknown=1", None, 400),
    ("POST", "/Condition", b"{not json", 400),
    ("POST", "/Condition", json.dumps({"resourceType": "Observation"}).encode(), 400),
    ("GET", "/Condition/nope", None, 404),
    ("GET", "/Subscription/s1/$status", None, 404),
    ("GET", "/Subscription/$events", None, 404),
])
def test_errors_are_operation_outcomes(fhir, method, path, body, status):
    r = fhir.request(method, path, content=body, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == status
    assert r.json()["resourceType"] == "OperationOutcome"


# ---------------- Subscriptions ----------------

@pytest.mark.parametrize("payload", ["application/fhir+json", None, "id-only"])
def test_active_subscription_gets_the_resource_with_medplum_headers(medplum_standin, fhir, receiver, payload):
    sub = fhir.post("/Subscription", json=subscription(
        receiver.url, headers=["Authorization: Bearer capture-secret"], payload=payload)).json()
    created = fhir.post("/Condition", json=condition()).json()
    medplum_standin.wait_for_deliveries()
    [got] = receiver.requests
    assert got.path == "/hook"
    assert json.loads(got.body) == created == fhir.get(f"/Condition/{created['id']}").json()
    h = got.headers
    assert h["content-type"] == "application/fhir+json"
    assert h["x-medplum-subscription"] == sub["id"]
    assert h["x-medplum-interaction"] == "create"
    assert h["authorization"] == "Bearer capture-secret"
    assert is_uuid(h["x-trace-id"])
    assert h["user-agent"] == "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)"
    assert "x-medplum-deleted-resource" not in h and "x-signature" not in h
    [delivery] = medplum_standin.deliveries
    assert (delivery.status, delivery.body, delivery.attempt) == (200, got.body, 0)
    assert delivery.headers["x-medplum-subscription"] == sub["id"]


def test_a_requested_subscription_stays_requested_and_silent(medplum_standin, fhir, receiver):
    quiet = Receiver()
    try:
        requested = fhir.post("/Subscription", json=subscription(quiet.url, status="requested")).json()
        fhir.post("/Subscription", json=subscription(receiver.url))
        fhir.post("/Condition", json=condition())
        medplum_standin.wait_for_deliveries()
        time.sleep(0.1)
        assert len(receiver.requests) == 1 and quiet.requests == []
        assert fhir.get(f"/Subscription/{requested['id']}").json()["status"] == "requested"
    finally:
        quiet.close()


def test_channel_header_values_are_cut_at_a_second_colon(medplum_standin, fhir, receiver):
    headers = ["Authorization: Bearer abc:def", "X-Extra:a:b"]
    fhir.post("/Subscription", json=subscription(receiver.url, headers=headers))
    fhir.post("/Condition", json=condition())
    medplum_standin.wait_for_deliveries()
    assert receiver.requests[0].headers["authorization"] == "Bearer abc"
    assert receiver.requests[0].headers["x-extra"] == "a"


def test_signature_extension_signs_the_body(medplum_standin, fhir, receiver):
    fhir.post("/Subscription", json=subscription(receiver.url, secret="s3cret"))
    cid = fhir.post("/Condition", json=condition()).json()["id"]
    fhir.delete(f"/Condition/{cid}")
    medplum_standin.wait_for_deliveries()
    assert len(receiver.requests) == 2
    for got in receiver.requests:
        assert got.headers["x-signature"] == hmac.new(b"s3cret", got.body, hashlib.sha256).hexdigest()


def test_update_and_delete_notifications(medplum_standin, fhir, receiver):
    fhir.post("/Subscription", json=subscription(receiver.url))
    created = fhir.post("/Condition", json=condition()).json()
    medplum_standin.wait_for_deliveries()
    updated = fhir.put(f"/Condition/{created['id']}", json=created | {"note": [{"text": "x"}]}).json()
    medplum_standin.wait_for_deliveries()
    fhir.delete(f"/Condition/{created['id']}")
    medplum_standin.wait_for_deliveries()
    create, update, delete = receiver.requests
    assert update.headers["x-medplum-interaction"] == "update" and json.loads(update.body) == updated
    assert delete.headers["x-medplum-interaction"] == "delete"
    assert delete.body == b"{}" and delete.headers["content-length"] == "2"
    assert delete.headers["x-medplum-deleted-resource"] == f"Condition/{created['id']}"


def test_criteria_search_parameters_and_type_select_what_is_notified(medplum_standin, fhir, receiver):
    fhir.post("/Subscription", json=subscription(receiver.url, criteria="Condition?subject=Patient/p1"))
    fhir.post("/Condition", json=condition("p2"))
    fhir.post("/Observation", json={"resourceType": "Observation", "subject": {"reference": "Patient/p1"}})
    mine = fhir.post("/Condition", json=condition("p1")).json()
    medplum_standin.wait_for_deliveries()
    assert [json.loads(r.body)["id"] for r in receiver.requests] == [mine["id"]]


def test_preload_notifies_nobody_and_write_notifies(medplum_standin, receiver):
    medplum_standin.preload(subscription(receiver.url), condition(id="old"))
    medplum_standin.wait_for_deliveries()
    assert receiver.requests == []
    written = medplum_standin.write(condition(id="new"))
    medplum_standin.wait_for_deliveries()
    medplum_standin.write(written | {"note": [{"text": "changed"}]})
    medplum_standin.wait_for_deliveries()  # a job finding its resource deleted would be dropped
    medplum_standin.delete("Condition", "new")
    medplum_standin.wait_for_deliveries()
    assert [r.headers["x-medplum-interaction"] for r in receiver.requests] == ["create", "update", "delete"]
    assert medplum_standin.read("Condition", "old")["meta"]["project"] == medplum_standin.project_id
    assert medplum_standin.read("Condition", "new") is None


def test_audit_events_notify_nobody(medplum_standin, fhir, receiver):
    audits = Receiver()
    try:
        fhir.post("/Subscription", json=subscription(audits.url, criteria="AuditEvent?"))
        fhir.post("/Subscription", json=subscription(receiver.url))
        fhir.post("/Condition", json=condition())
        medplum_standin.wait_for_deliveries()
        assert len(receiver.requests) == 1 and audits.requests == []
    finally:
        audits.close()


# ---------------- retries ----------------

def audit_descriptions(fhir, sub_id: str) -> list[tuple[str, str]]:
    bundle = fhir.get("/AuditEvent", params={"entity": f"Subscription/{sub_id}", "_sort": "date"}).json()
    return [(e["resource"]["outcomeDesc"], e["resource"]["outcome"]) for e in bundle["entry"]]


def test_a_failed_delivery_is_retried_with_backoff_and_each_attempt_audited(medplum_standin, fhir, receiver):
    medplum_standin.time_scale = 0.02  # 1 s -> 20 ms
    answers = iter([500, 404, 200])
    receiver.answer = lambda got: next(answers)
    sub = fhir.post("/Subscription", json=subscription(receiver.url)).json()
    fhir.post("/Condition", json=condition())
    medplum_standin.wait_for_deliveries()
    first, second, third = receiver.requests
    assert second.at - first.at >= 0.02 * retry_delay(1) * 0.9
    assert third.at - second.at >= 0.02 * retry_delay(2) * 0.9
    assert first.body == second.body == third.body
    assert [d.status for d in medplum_standin.deliveries] == [500, 404, 200]
    assert audit_descriptions(fhir, sub["id"]) == [("Attempt 0 received status 500", "4"),
                                                   ("Attempt 1 received status 404", "4"),
                                                   ("Attempt 2 received status 200", "0")]
    assert fhir.get(f"/Subscription/{sub['id']}").json()["status"] == "active"


def test_gives_up_after_18_attempts_and_never_sets_error(medplum_standin, fhir, receiver):
    medplum_standin.time_scale = 1e-6
    receiver.answer = lambda got: 503
    sub = fhir.post("/Subscription", json=subscription(receiver.url)).json()
    fhir.post("/Condition", json=condition())
    medplum_standin.wait_for_deliveries()
    assert ATTEMPTS == 18 and len(receiver.requests) == 18
    assert [d.attempt for d in medplum_standin.deliveries] == list(range(18))
    assert len(audit_descriptions(fhir, sub["id"])) == 18
    assert fhir.get(f"/Subscription/{sub['id']}").json()["status"] == "active"


def test_no_answer_is_retried_and_audited(medplum_standin, fhir):
    medplum_standin.time_scale = 1e-6
    sub = fhir.post("/Subscription", json=subscription(f"http://127.0.0.1:{free_port()}/hook")).json()
    fhir.post("/Condition", json=condition())
    medplum_standin.wait_for_deliveries()
    assert len(medplum_standin.deliveries) == 18 and {d.status for d in medplum_standin.deliveries} == {None}
    assert audit_descriptions(fhir, sub["id"])[0] == ("Attempt 0 received error ConnectError", "4")


def test_retry_schedule_is_bullmq_exponential():
    assert [retry_delay(n) for n in (1, 2, 3, 17)] == [1, 2, 4, 65536]
    assert sum(retry_delay(n) for n in range(1, ATTEMPTS)) == 2 ** 17 - 1  # ~36 h between 18 attempts


def test_a_retry_of_a_superseded_version_is_dropped(medplum_standin, fhir, receiver):
    medplum_standin.time_scale = 0.5  # the first retry would come 500 ms later
    receiver.answer = lambda got: 500 if len(receiver.requests) == 1 else 200
    fhir.post("/Subscription", json=subscription(receiver.url))
    created = fhir.post("/Condition", json=condition()).json()
    wait_until(lambda: len(medplum_standin.deliveries) == 1)  # the first attempt failed
    updated = fhir.put(f"/Condition/{created['id']}", json=created | {"note": [{"text": "x"}]}).json()
    medplum_standin.wait_for_deliveries()
    assert [json.loads(r.body)["meta"]["versionId"] for r in receiver.requests] == \
        [created["meta"]["versionId"], updated["meta"]["versionId"]]


def test_a_retry_for_a_deleted_resource_is_dropped(medplum_standin, fhir, receiver):
    medplum_standin.time_scale = 0.5
    receiver.answer = lambda got: 500 if len(receiver.requests) == 1 else 200
    fhir.post("/Subscription", json=subscription(receiver.url))
    created = fhir.post("/Condition", json=condition()).json()
    wait_until(lambda: len(medplum_standin.deliveries) == 1)
    fhir.delete(f"/Condition/{created['id']}")
    medplum_standin.wait_for_deliveries()
    assert [r.headers["x-medplum-interaction"] for r in receiver.requests] == ["create", "delete"]


def test_retries_stop_when_the_subscription_is_no_longer_active(medplum_standin, fhir, receiver):
    medplum_standin.time_scale = 0.5
    receiver.answer = lambda got: 500
    sub = fhir.post("/Subscription", json=subscription(receiver.url)).json()
    fhir.post("/Condition", json=condition())
    wait_until(lambda: len(medplum_standin.deliveries) == 1)
    fhir.put(f"/Subscription/{sub['id']}", json=sub | {"status": "off"})
    medplum_standin.wait_for_deliveries()
    assert len(receiver.requests) == 1


# ---------------- concurrency ----------------

def test_jobs_run_concurrently(medplum_standin, fhir, receiver):
    """Each answer waits for the other request to arrive: one job at a time would break the barrier."""
    barrier = threading.Barrier(2, timeout=5)
    receiver.answer = lambda got: 200 if barrier.wait() is not None else 500
    fhir.post("/Subscription", json=subscription(receiver.url))
    fhir.post("/Condition", json=condition("p1"))
    fhir.post("/Condition", json=condition("p1"))  # a second notification for the same patient
    medplum_standin.wait_for_deliveries()
    assert [d.status for d in medplum_standin.deliveries] == [200, 200]
    assert abs(receiver.requests[0].at - receiver.requests[1].at) < 1


def test_each_matching_subscription_is_its_own_job(medplum_standin, fhir, receiver):
    barrier = threading.Barrier(2, timeout=5)
    receiver.answer = lambda got: 200 if barrier.wait() is not None else 500
    subs = {fhir.post("/Subscription", json=subscription(receiver.url)).json()["id"] for _ in range(2)}
    fhir.post("/Condition", json=condition())
    medplum_standin.wait_for_deliveries()
    assert {r.headers["x-medplum-subscription"] for r in receiver.requests} == subs
    assert [d.status for d in medplum_standin.deliveries] == [200, 200]


# ---------------- auth ----------------

def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_pair(alg: str):
    """(private key PEM, public JWK) for alg."""
    private = ec.generate_private_key(ec.SECP384R1()) if alg.startswith("ES") else rsa_key()
    algorithm = jwt.algorithms.ECAlgorithm if alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
    jwk = json.loads(algorithm.to_jwk(private.public_key())) | {"kid": f"k-{alg}", "alg": alg}
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return pem, jwk


def client_token(medplum: MedplumStandIn, scope: str | None = None) -> str:
    medplum.register_client("cc-client", secret="cc-secret")
    form = {"grant_type": "client_credentials", "client_id": "cc-client", "client_secret": "cc-secret"}
    r = httpx.post(medplum.token_url, data=form | ({"scope": scope} if scope else {}))
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def test_smart_configuration_names_the_token_endpoint(medplum_standin, fhir):
    config = fhir.get("/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == medplum_standin.token_url
    assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
    assert config["token_endpoint_auth_signing_alg_values_supported"] == \
        ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]


def test_auth_mode_refuses_requests_without_a_valid_token():
    with MedplumStandIn(auth_required=True) as medplum:
        assert httpx.get(f"{medplum.base_url}/metadata").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"}):
            r = httpx.get(f"{medplum.base_url}/Patient", headers=headers)
            assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
            assert r.headers["www-authenticate"] == "Bearer"
        token = client_token(medplum)
        assert httpx.get(f"{medplum.base_url}/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_client_credentials_by_form_or_basic(medplum_standin):
    medplum_standin.register_client("cc", secret="pa:ss")
    form = {"grant_type": "client_credentials"}
    by_form = form | {"client_id": "cc", "client_secret": "pa:ss"}
    assert httpx.post(medplum_standin.token_url, data=by_form).status_code == 200
    assert httpx.post(medplum_standin.token_url, data=form, auth=("cc", "pa:ss")).status_code == 200
    wrong = httpx.post(medplum_standin.token_url, data=form, auth=("cc", "nope"))
    assert (wrong.status_code, wrong.json()) == (401, {"error": "invalid_client"})
    other = httpx.post(medplum_standin.token_url, data={"grant_type": "password"}, auth=("cc", "pa:ss"))
    assert (other.status_code, other.json()) == (400, {"error": "unsupported_grant_type"})


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_spinewatch_smart_backend_auth_is_accepted(alg):
    pem, jwk = key_pair(alg)
    with MedplumStandIn(auth_required=True) as medplum:
        medplum.register_client("spinewatch", jwks={"keys": [jwk]})
        medplum.preload({"resourceType": "Patient", "id": "p1"})
        auth = SmartBackendAuth("spinewatch", pem, alg=alg, key_id=jwk["kid"], fhir_base_url=medplum.base_url,
                                scope="system/*.read system/Condition.c")
        with FHIRClient(medplum.base_url, auth=auth) as client:
            assert client.read("Patient", "p1")["id"] == "p1"
            written = client.create(condition())
        assert written["meta"]["author"] == {"reference": "ClientApplication/spinewatch"}


def test_an_expired_token_answers_401_and_spinewatch_fetches_a_new_one():
    pem, jwk = key_pair("RS384")
    with MedplumStandIn(auth_required=True) as medplum:
        medplum.register_client("spinewatch", jwks={"keys": [jwk]})
        medplum.preload({"resourceType": "Patient", "id": "p1"})
        auth = SmartBackendAuth("spinewatch", pem, alg="RS384", key_id=jwk["kid"], token_url=medplum.token_url)
        with FHIRClient(medplum.base_url, auth=auth) as client:
            client.read("Patient", "p1")
            old = auth.headers(client._http)
            medplum.expire_tokens()
            assert httpx.get(f"{medplum.base_url}/Patient/p1", headers=old).status_code == 401
            assert client.read("Patient", "p1")["id"] == "p1"
            assert auth.headers(client._http) != old


def test_the_jwks_uri_is_fetched(receiver):
    pem, jwk = key_pair("RS384")
    receiver.document = {"keys": [jwk]}
    with MedplumStandIn(auth_required=True) as medplum:
        medplum.register_client("spinewatch", jwks_uri=receiver.url.replace("/hook", "/jwks.json"))
        auth = SmartBackendAuth("spinewatch", pem, alg="RS384", key_id=jwk["kid"], token_url=medplum.token_url)
        with FHIRClient(medplum.base_url, auth=auth) as client:
            assert client.search_all("Patient") == []


def _claims(medplum, **changes):
    now = int(time.time())
    return {"iss": "c", "sub": "c", "aud": medplum.token_url, "exp": now + 300, "iat": now,
            "jti": uuid.uuid4().hex} | changes


@pytest.mark.parametrize("case", ["other key", "wrong aud", "sub differs", "exp too late", "HS256", "no jti",
                                  "unknown kid", "replayed"])
def test_bad_client_assertions_are_refused(medplum_standin, case):
    pem, jwk = key_pair("RS384")
    medplum_standin.register_client("c", jwks={"keys": [jwk]})
    key, headers, alg = pem, {"kid": jwk["kid"]}, "RS384"
    claims = _claims(medplum_standin)
    if case == "other key":
        key = key_pair("RS384")[0]
    elif case == "wrong aud":
        claims["aud"] = medplum_standin.base_url
    elif case == "sub differs":
        claims["sub"] = "someone"
    elif case == "exp too late":
        claims["exp"] += 3600
    elif case == "HS256":
        key, alg = "a-shared-secret-long-enough-for-hs256-0123456789", "HS256"
    elif case == "no jti":
        del claims["jti"]
    elif case == "unknown kid":
        headers = {"kid": "other"}
    form = {"grant_type": "client_credentials", "scope": "system/*.read",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": jwt.encode(claims, key, algorithm=alg, headers=headers)}
    if case == "replayed":
        assert httpx.post(medplum_standin.token_url, data=form).status_code == 200
    r = httpx.post(medplum_standin.token_url, data=form)
    assert (r.status_code, r.json()) == (401, {"error": "invalid_client"})


def test_requested_scopes_become_the_access_policy(medplum_standin, receiver):
    token = client_token(medplum_standin, "system/*.read system/Subscription.write")
    with httpx.Client(base_url=medplum_standin.base_url, headers={"Authorization": f"Bearer {token}"}) as fhir:
        refused = fhir.post("/Communication", json={"resourceType": "Communication", "status": "completed"})
        assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
        assert fhir.post("/Subscription", json=subscription(receiver.url)).status_code == 201
        assert fhir.get("/Condition", params={"patient": "p1"}).status_code == 200
    pem, jwk = key_pair("ES384")
    medplum_standin.register_client("spinewatch", jwks={"keys": [jwk]})
    auth = SmartBackendAuth("spinewatch", pem, alg="ES384", key_id=jwk["kid"], fhir_base_url=medplum_standin.base_url,
                            scope="system/*.read system/Subscription.write")
    with FHIRClient(medplum_standin.base_url, auth=auth) as client, pytest.raises(FHIRAuthError):
        client.create({"resourceType": "Communication", "status": "completed"})


def _interaction(fhir: httpx.Client, name: str) -> int:
    body = condition() | {"id": "c1", "note": [{"text": "changed"}]}
    return {"create": lambda: fhir.post("/Condition", json=condition()),
            "read": lambda: fhir.get("/Condition/c1"),
            "history": lambda: fhir.get("/Condition/c1/_history"),
            "search": lambda: fhir.get("/Condition", params={"patient": "p1"}),
            "update": lambda: fhir.put("/Condition/c1", json=body),
            "delete": lambda: fhir.delete("/Condition/c1")}[name]().status_code


@pytest.mark.parametrize("scope, interaction, status", [
    ("system/Condition.rs", "read", 200), ("system/Condition.rs", "search", 200),
    ("system/Condition.rs", "create", 403),
    ("system/Condition.r", "read", 200), ("system/Condition.r", "history", 200), ("system/Condition.r", "search", 403),
    ("system/Condition.s", "search", 200), ("system/Condition.s", "read", 403),
    ("system/Condition.c", "create", 201), ("system/Condition.c", "update", 403),
    ("system/Condition.cu", "update", 200), ("system/Condition.cu", "delete", 403),
    ("system/Condition.d", "delete", 200), ("system/Condition.d", "read", 403),
    ("system/Condition.read", "search", 200), ("system/Condition.read", "update", 403),
    ("system/Condition.write", "create", 201), ("system/Condition.write", "delete", 200),
    ("system/Condition.write", "read", 403),
    ("system/Condition.*", "delete", 200), ("system/*.cruds", "update", 200),
    ("system/Observation.cruds", "read", 403), ("openid system/Condition.r system/Condition.s", "search", 200),
])
def test_scope_letters_map_to_interactions(medplum_standin, scope, interaction, status):
    medplum_standin.preload(condition(id="c1"))
    token = client_token(medplum_standin, scope)
    with httpx.Client(base_url=medplum_standin.base_url, headers={"Authorization": f"Bearer {token}"}) as fhir:
        assert _interaction(fhir, interaction) == status


@pytest.mark.parametrize("scope", ["system/Condition.sr", "system/Condition.dus", "system/Condition.rs?category=x",
                                   "openid", "system/Condition.readwrite"])
def test_undefined_scopes_are_rejected(medplum_standin, scope):
    medplum_standin.register_client("cc", secret="s")
    r = httpx.post(medplum_standin.token_url, data={"grant_type": "client_credentials", "scope": scope},
                   auth=("cc", "s"))
    assert (r.status_code, r.json()) == (400, {"error": "invalid_scope"})


@pytest.mark.parametrize("scope, interaction, status", [
    ("system/*.read system/Subscription.write", "create", 403),  # the case both readings agree on
    ("system/Condition.c", "read", 200), ("system/Condition.c", "delete", 200),  # .c is read-write
    ("system/Condition.rs", "create", 403), ("system/Condition.s", "read", 200),  # r or s: read-only
    ("system/*.cruds system/Condition.rs", "update", 403),  # the type's own scope wins over *
    ("system/Observation.rs", "read", 403),  # a type no scope names
    ("openid", "create", 201), ("system/Condition.sr", "update", 200),  # nothing parsable: whole access
])
def test_medplum_scope_semantics(scope, interaction, status):
    with MedplumStandIn(scope_semantics="medplum") as medplum:
        medplum.preload(condition(id="c1"))
        token = client_token(medplum, scope)
        with httpx.Client(base_url=medplum.base_url, headers={"Authorization": f"Bearer {token}"}) as fhir:
            assert _interaction(fhir, interaction) == status


def test_no_scope_gives_the_clients_whole_access(medplum_standin):
    token = client_token(medplum_standin)
    with httpx.Client(base_url=medplum_standin.base_url, headers={"Authorization": f"Bearer {token}"}) as fhir:
        assert fhir.post("/Communication", json={"resourceType": "Communication", "status": "done"}).status_code == 201


def test_stop_closes_the_socket():
    medplum = MedplumStandIn().start()
    url = medplum.base_url
    assert httpx.get(f"{url}/metadata").status_code == 200
    medplum.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/metadata")
