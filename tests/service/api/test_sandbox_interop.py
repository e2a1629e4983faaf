"""SpineWatch as the public CDS Hooks Sandbox (https://sandbox.cds-hooks.org) uses it, unchanged.

The sandbox cannot run here, so `Sandbox` below behaves as it does:
- it signs every call with its published key pair (ES384, `typ` JWT, its `kid`, `jku` its
  /.well-known/jwks.json, `iss` https://sandbox.cds-hooks.org, `aud` the exact URL called, feedback
  included, `exp` now + 300 s, `iat` now as its jwt-generator.js sets it, `jti` a uuid); SpineWatch
  fetches the JWKS from the `jku` URL (respx serves the published jwks.json there);
- it files services by `{discovery URL}/{id}`, a later entry overwriting an earlier one;
- a call is `{hookInstance, hook, fhirServer, context: {patientId, userId:
  "Practitioner/COREPRACTITIONER1", ...}}` with a `prefetch` holding only the keys it managed to
  fetch (a failed key is left out, never null), and no fhirAuthorization (no SMART login);
- its PAMA screen sends one draft ServiceRequest (`example-request-id`, intent `plan`, a CPT code
  from its procedure list) to order-select and order-sign;
- it posts feedback itself: `accepted` with acceptedSuggestions, `overridden` with or without a reason;
- in Chrome, its preflight to a service on localhost asks for Private Network Access.

Its default FHIR server is DSTU2; SpineWatch reads R4 only and says so with a 412.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jwt
import pytest
import respx

from tests.support.cds_hooks import (DSTU2_METADATA, PREFETCH_TYPES, R4_METADATA, as_dstu2, draft_bundle, make_env,
                                     record, reset_audit, searchset, validate_cds_response, validate_discovery)

SANDBOX = "https://sandbox.cds-hooks.org"
JWKS_URL = f"{SANDBOX}/.well-known/jwks.json"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"
PUBLIC = "http://localhost:8000"  # SPINEWATCH_PUBLIC_BASE_URL: where the sandbox's browser calls
DISCOVERY = f"{PUBLIC}/cds-services"
R4_SERVER = "https://launch.smarthealthit.org/v/r4/fhir"
DSTU2_SERVER = "https://launch.smarthealthit.org/v/r2/fhir"  # the sandbox's default
PRACTITIONER = "Practitioner/COREPRACTITIONER1"
SPINE_XRAY_CPT = {"system": "http://www.ama-assn.org/go/cpt", "code": "72100",
                  "display": "Radiologic examination, spine, lumbosacral; 2 or 3 views"}


@pytest.fixture(scope="module")
def sandbox_data(shared_data) -> Path:
    folder = shared_data / "cds-hooks-sandbox"
    if not (folder / "jwk-keypair.json").is_file():
        pytest.skip(f"the CDS Hooks Sandbox's key pair is not at {folder}")
    return folder


@pytest.fixture
def net(sandbox_data):
    """The internet SpineWatch sees: the sandbox's JWKS at its jku, and the SMART launcher's FHIR
    servers (R4 and the DSTU2 default) as routes each test fills."""
    with respx.mock(assert_all_called=False) as mock:
        mock.get(JWKS_URL, name="jwks").respond(200, json=json.loads((sandbox_data / "jwks.json").read_text()))
        yield mock


@pytest.fixture
def env(tmp_path, net):
    # What the README's "Try it from the CDS Hooks Sandbox" sets.
    env = make_env(tmp_path, cds_trusted_issuers=json.dumps({SANDBOX: {"jwks": JWKS_URL, "jku": [JWKS_URL]}}),
                   cors_origins=SANDBOX, fhir_allowed_hosts="launch.smarthealthit.org", public_base_url=PUBLIC)
    yield env
    reset_audit()


@pytest.fixture
def sandbox(env, sandbox_data) -> "Sandbox":
    return Sandbox(env.client, json.loads((sandbox_data / "jwk-keypair.json").read_text())["keys"][0])


@dataclass
class Sandbox:
    """The CDS Hooks Sandbox as a client of SpineWatch (see the module docstring)."""

    http: Any  # the app's TestClient: the sandbox's browser
    keypair: dict
    services: dict[str, dict] = field(default_factory=dict)  # `{discovery URL}/{id}` -> service

    def token(self, aud: str) -> str:
        now = int(time.time())
        claims = {"iss": SANDBOX, "aud": aud, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
        key = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(self.keypair))
        return jwt.encode(claims, key, algorithm="ES384",
                          headers={"typ": "JWT", "kid": self.keypair["kid"], "jku": JWKS_URL})

    def _post(self, url: str, body: dict):
        return self.http.post(url.removeprefix(PUBLIC), json=body,
                              headers={"Authorization": f"Bearer {self.token(url)}", "Origin": SANDBOX})

    def discover(self):
        response = self.http.get("/cds-services", headers={"Authorization": f"Bearer {self.token(DISCOVERY)}",
                                                           "Origin": SANDBOX})
        self.file(response.json())
        return response

    def file(self, discovery: dict) -> None:
        for service in discovery["services"]:
            self.services[f"{DISCOVERY}/{service['id']}"] = service

    def urls_for(self, hook: str) -> list[str]:
        return [url for url, service in self.services.items() if service["hook"] == hook]

    def call(self, hook: str, fhir_server: str, fetched: dict, context: dict | None = None):
        """`hook` on every service filed for it; `fetched`: the prefetch keys it managed to fetch."""
        [url] = self.urls_for(hook)
        body = {"hookInstance": str(uuid.uuid4()), "hook": hook, "fhirServer": fhir_server,
                "context": {"patientId": "p1", "userId": PRACTITIONER} | (context or {}), "prefetch": fetched}
        return self._post(url, body)

    def feedback(self, hook: str, item: dict):
        [url] = self.urls_for(hook)
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return self._post(f"{url}/feedback", {"feedback": [item | {"outcomeTimestamp": stamp}]})


def fetched_by_the_sandbox(resources: list[dict], failed: tuple[str, ...] = ()) -> dict:
    """The sandbox's prefetch: each template's result from its FHIR server (an empty searchset when
    nothing matched), the keys it failed to fetch left out."""
    out: dict[str, Any] = {}
    for key, rtype in PREFETCH_TYPES.items():
        if key in failed:
            continue
        found = [r for r in resources if r["resourceType"] == rtype]
        out[key] = found[0] if rtype == "Patient" else searchset(found)
    return out


def serve(net, base: str, resources: list[dict], metadata: dict) -> dict:
    """A FHIR server at `base` holding `resources`; its routes by resource type."""
    routes = {"metadata": net.get(f"{base}/metadata").respond(200, json=metadata)}
    for rtype in PREFETCH_TYPES.values():
        found = [r for r in resources if r["resourceType"] == rtype]
        if rtype == "Patient":
            routes[rtype] = net.get(f"{base}/Patient/p1").respond(200, json=found[0])
        else:
            routes[rtype] = net.get(f"{base}/{rtype}", params={"patient": "p1"}).respond(200, json=searchset(found))
    return routes


def pama_order(coding: dict) -> dict:
    """The PAMA screen's draft order."""
    return {"resourceType": "ServiceRequest", "id": "example-request-id", "status": "draft", "intent": "plan",
            "code": {"coding": [coding]}, "subject": {"reference": "Patient/p1"},
            "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "279039007",
                                        "display": "Low back pain"}]}]}


def order_context(hook: str, order: dict) -> dict:
    context = {"draftOrders": draft_bundle(order)}
    return context | ({"selections": ["ServiceRequest/example-request-id"]} if hook == "order-select" else {})


def assert_412(response, *texts: str) -> None:
    assert response.status_code == 412, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "incomplete"
    for text in texts:
        assert text in outcome["issue"][0]["diagnostics"]


# ---------------------------------------------------------------- discovery and the registry


def test_the_sandbox_files_all_three_hooks(sandbox, net):
    response = sandbox.discover()
    assert response.status_code == 200, response.text
    assert net.routes["jwks"].call_count == 1  # its key, from the jku it names
    assert response.headers["access-control-allow-origin"] == SANDBOX
    validate_discovery(response.json())
    assert {hook: sandbox.urls_for(hook) for hook in ("patient-view", "order-select", "order-sign")} == {
        "patient-view": [f"{DISCOVERY}/spinewatch-patient-view"],
        "order-select": [f"{DISCOVERY}/spinewatch-order-select"],
        "order-sign": [f"{DISCOVERY}/spinewatch-order-sign"]}


def test_the_registry_stand_in_overwrites_a_shared_id_as_the_sandbox_does(sandbox):
    """Why the ids are one per hook: the old discovery (one id for both order hooks) lost order-select."""
    shared = {"id": "spinewatch-order-imaging", "description": "d", "prefetch": {}}
    sandbox.file({"services": [shared | {"hook": "order-select"}, shared | {"hook": "order-sign"}]})
    assert sandbox.urls_for("order-select") == []
    assert sandbox.urls_for("order-sign") == [f"{DISCOVERY}/spinewatch-order-imaging"]


# ---------------------------------------------------------------- patient-view


def test_patient_view_with_the_sandbox_s_prefetch(env, sandbox, net):
    sandbox.discover()
    response = sandbox.call("patient-view", R4_SERVER, fetched_by_the_sandbox(record("emergency")))
    [card] = validate_cds_response(response.json())
    assert card["indicator"] == "critical" and card["overrideReasons"]
    assert not [c for c in net.calls if c.request.url.host == "launch.smarthealthit.org"]  # all prefetched
    [audited] = env.audit_records("card")
    assert audited.actor == SANDBOX and audited.detail["service"] == "spinewatch-patient-view"


def test_a_key_the_sandbox_failed_to_fetch_is_read_from_its_fhir_server(sandbox, net):
    resources = record("emergency")
    routes = serve(net, R4_SERVER, resources, R4_METADATA)
    sandbox.discover()
    response = sandbox.call("patient-view", R4_SERVER, fetched_by_the_sandbox(resources, failed=("observations",)))
    [card] = validate_cds_response(response.json())
    assert card["indicator"] == "critical"  # the leg weakness is in the Observations SpineWatch read
    assert routes["Observation"].call_count == 1 and routes["metadata"].call_count == 1
    assert routes["Condition"].call_count == 0
    assert "authorization" not in routes["Observation"].calls.last.request.headers  # no SMART login: no token


# ---------------------------------------------------------------- order-select / order-sign (PAMA)


def pama_spine_codes(sandbox_data: Path) -> list[dict]:
    codes = json.loads((sandbox_data / "pama-procedure-codes.json").read_text())["expansion"]["contains"]
    return [c for c in codes if any(w in c["display"].lower() for w in ("spine", "spinal canal"))]


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_the_pama_list_s_spine_codes_get_no_card_and_read_nothing(sandbox, net, sandbox_data, hook):
    """The sandbox's PAMA list has spine CT and MRI but no plain spine X-ray: an MRI of the spine is
    the right test, a CT is no X-ray, so neither is challenged and no data is read."""
    spine = pama_spine_codes(sandbox_data)
    assert {c["code"] for c in spine} >= {"72131", "72148"}  # CT lumbar spine, MRI lumbar spine
    assert not [c for c in spine if "radiologic examination" in c["display"].lower()]  # no X-ray in the list
    sandbox.discover()
    for coding in spine:
        response = sandbox.call(hook, R4_SERVER, {}, order_context(hook, pama_order(coding)))
        assert response.status_code == 200, (coding["code"], response.text)
        assert validate_cds_response(response.json()) == [], coding["code"]
    assert not [c for c in net.calls if c.request.url.host == "launch.smarthealthit.org"]


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_a_spine_x_ray_in_the_pama_shape_gets_the_mri_card(sandbox, hook):
    sandbox.discover()
    response = sandbox.call(hook, R4_SERVER, fetched_by_the_sandbox(record("urgent")),
                            order_context(hook, pama_order(SPINE_XRAY_CPT)))
    [card] = validate_cds_response(response.json())
    assert card["indicator"] == "warning" and "X-ray cannot exclude metastasis" in card["summary"]
    # One `update` of the draft, the only action the sandbox applies to draft orders.
    [update] = card["suggestions"][0]["actions"]
    assert update["type"] == "update" and update["resource"]["id"] == "example-request-id"
    assert update["resource"]["intent"] == "plan"  # the MRI takes the draft's intent


# ---------------------------------------------------------------- feedback


@pytest.mark.parametrize("outcome", ["overridden with a reason", "overridden", "accepted"])
def test_the_sandbox_s_feedback_is_recorded(env, sandbox, outcome):
    sandbox.discover()
    [card] = validate_cds_response(sandbox.call("patient-view", R4_SERVER,
                                                fetched_by_the_sandbox(record("emergency"))).json())
    reason = card["overrideReasons"][0]
    item = {"card": card["uuid"], "outcome": outcome.split()[0]}
    if outcome == "overridden with a reason":
        item["overrideReason"] = {"reason": {"code": reason["code"], "system": reason["system"]}}
    if outcome == "accepted":
        item["acceptedSuggestions"] = [{"id": card["suggestions"][0]["uuid"]}]
    response = sandbox.feedback("patient-view", item)
    assert response.status_code == 200, response.text
    [recorded] = env.audit_records("feedback")
    assert recorded.actor == SANDBOX and recorded.outcome == item["outcome"]
    assert recorded.detail["service"] == "spinewatch-patient-view" and recorded.detail["card"] == card["uuid"]
    assert recorded.detail.get("overrideReason") == (
        {"system": reason["system"], "code": reason["code"]} if "overrideReason" in item else None)
    assert recorded.detail.get("acceptedSuggestions") == (
        [card["suggestions"][0]["uuid"]] if outcome == "accepted" else None)


def test_feedback_signed_for_the_service_url_instead_of_feedback_is_refused(sandbox):
    """`aud` is the exact URL called: the sandbox signs …/feedback, and a token for the hook URL is
    not accepted there."""
    sandbox.discover()
    url = f"{DISCOVERY}/spinewatch-patient-view"
    response = sandbox.http.post("/cds-services/spinewatch-patient-view/feedback", json={"feedback": []},
                                 headers={"Authorization": f"Bearer {sandbox.token(url)}"})
    assert response.status_code == 401


# ---------------------------------------------------------------- Chrome's Private Network Access


def preflight(env, origin: str, private_network: bool = True):
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
    if private_network:
        headers["Access-Control-Request-Private-Network"] = "true"
    return env.client.options("/cds-services/spinewatch-patient-view", headers=headers)


def test_chrome_s_private_network_preflight_from_the_sandbox_is_granted(env):
    response = preflight(env, SANDBOX)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-private-network"] == "true"
    assert response.headers["access-control-allow-origin"] == SANDBOX
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


def test_private_network_access_is_not_granted_to_other_origins(env):
    response = preflight(env, "https://evil.example.com")
    assert response.status_code == 400
    assert "access-control-allow-private-network" not in response.headers
    assert "access-control-allow-origin" not in response.headers


def test_a_preflight_that_does_not_ask_for_private_network_access_gets_no_grant(env):
    response = preflight(env, SANDBOX, private_network=False)
    assert response.status_code == 200
    assert "access-control-allow-private-network" not in response.headers


# ---------------------------------------------------------------- the sandbox's DSTU2 default


def test_a_dstu2_prefetch_is_412_naming_the_problem(sandbox, net):
    sandbox.discover()
    response = sandbox.call("patient-view", DSTU2_SERVER, fetched_by_the_sandbox(as_dstu2(record("emergency"))))
    assert_412(response, "prefetch.conditions is not FHIR R4",
               "a Condition with `patient` instead of R4's `subject` (FHIR DSTU2)", "FHIR R4 (4.0.x) or R4B (4.3.x)")
    assert not [c for c in net.calls if c.request.url.host == "launch.smarthealthit.org"]


def test_a_dstu2_fhir_server_is_412_naming_it(sandbox, net):
    """The sandbox failed every prefetch key on its DSTU2 server (they are R4 queries): SpineWatch
    reads the server, whose /metadata answers a Conformance with fhirVersion 1.0.2."""
    routes = serve(net, DSTU2_SERVER, record("emergency"), DSTU2_METADATA)
    sandbox.discover()
    response = sandbox.call("patient-view", DSTU2_SERVER, {})
    assert_412(response, "fhirServer is FHIR DSTU2 (its /metadata says fhirVersion 1.0.2)", "choose an R4 FHIR server")
    assert routes["metadata"].call_count == 1
