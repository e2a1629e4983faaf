"""SMART Backend Services scopes that ask for exactly what SpineWatch reads and writes
(fhir_mappings/fhir/scopes.py, service/infra/fhir/auth.py), and a refused interaction named with the
scope it needed (service/infra/fhir/sync.py FHIRScopeRefused), against respx and a FHIR server that
enforces the scopes it granted (tests/support/enforced_scopes.py): `spinewatch subscribe`'s calls
here; the workers' and the alerts' in tests/workers/test_scope_refused.py."""

from __future__ import annotations

import pickle
from datetime import datetime, timezone
from urllib.parse import parse_qs

import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from fhir_mappings.fhir.scopes import RECORD_TYPES, granted, interaction_of, missing, needs, refusal, scope_string, uses
from service.cli.main import app
from service.core.config_check import scope_warnings
from service.core.errors import FHIRAuthError, FHIRScopeRefused
from service.core.settings import SUBSCRIBABLE_TYPES, Settings
from service.infra import config_problems
from service.infra.fhir.auth import requested_scope, scope_needs, scope_uses
from service.infra.fhir.subscriptions import BACKPORT_PROFILE, TOPIC_CANONICAL, ensure
from service.infra.fhir.sync import FHIRClient
from service.infra.redis import redis_client
from tests.support.enforced_scopes import EnforcedScopeServer
from workers.pipeline.record import record_queries

BASE = "https://ehr.example/fhir"
TOKEN_URL = "https://ehr.example/oauth2/token"
OLD_DEFAULT = "system/*.read system/Subscription.write"
V2_DEFAULT = ("system/Basic.s system/Binary.r system/CareTeam.s system/ClinicalImpression.rs "
              "system/Communication.cs system/Condition.rs system/DiagnosticReport.rs system/DocumentReference.rs "
              "system/ImagingStudy.rs system/Observation.rs system/Patient.r system/Procedure.rs "
              "system/ServiceRequest.rs system/Subscription.crus system/SubscriptionTopic.s")
V1_DEFAULT = ("system/Basic.read system/Binary.read system/CareTeam.read system/ClinicalImpression.read "
              "system/Communication.write system/Communication.read system/Condition.read "
              "system/DiagnosticReport.read system/DocumentReference.read system/ImagingStudy.read "
              "system/Observation.read system/Patient.read system/Procedure.read system/ServiceRequest.read "
              "system/Subscription.write system/Subscription.read system/SubscriptionTopic.read")


@pytest.fixture(scope="module")
def key_path(tmp_path_factory):
    key = rsa.generate_private_key(65537, 2048)
    path = tmp_path_factory.mktemp("smart") / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return str(path)


def smart(key_path: str, **kw) -> Settings:
    return Settings(environment="test", fhir_base_url=BASE, fhir_auth="smart-backend", smart_client_id="spinewatch",
                    smart_token_url=TOKEN_URL, smart_private_key_path=key_path,
                    subscription_endpoint="https://spinewatch.test/fhir/notifications", **kw)


# ---------------- the list, and the scope built from it ----------------

def test_the_default_scope_is_exactly_what_spinewatch_does_in_v2_syntax():
    assert requested_scope(Settings(environment="test")) == V2_DEFAULT


def test_v1_syntax_asks_write_before_read_for_a_type_that_needs_both():
    assert requested_scope(Settings(environment="test", smart_scope_version="v1")) == V1_DEFAULT


def test_the_list_follows_the_settings_where_they_matter():
    assert "Binary" not in scope_needs(Settings(environment="test", note_max_binary_reads=0))
    on_server = Settings(environment="test", fhir_base_url="https://ehr.example/fhir",
                         terminology_url="https://EHR.example:443/tx")
    assert scope_needs(on_server)["CodeSystem"] == "r"  # $subsumes with our token
    elsewhere = Settings(environment="test", fhir_base_url="https://ehr.example/fhir",
                         terminology_url="https://tx.example/fhir")
    assert "CodeSystem" not in scope_needs(elsewhere)  # it never gets our token


def test_every_type_the_record_searches_and_every_subscribable_type_is_read_and_searched():
    searched = {rtype for rtype, _ in record_queries("p1", datetime(2026, 1, 1, tzinfo=timezone.utc))}
    assert searched == set(RECORD_TYPES)
    needed = needs(uses(SUBSCRIBABLE_TYPES, reads_binaries=False, terminology_on_fhir_server=False))
    assert {t for t in searched | set(SUBSCRIBABLE_TYPES) if needed.get(t) != "rs"} == set()


@pytest.mark.parametrize("scope, version, lacking", [
    (OLD_DEFAULT, "v2", {"Communication": "system/Communication.c"}),
    (OLD_DEFAULT, "v1", {"Communication": "system/Communication.write"}),
    ("system/*.cruds", "v2", {}),
    ("system/*.read system/*.write", "v2", {}),
    ("system/*.*", "v1", {}),
    (V1_DEFAULT, "v2", {}),
    ("user/*.cruds patient/*.rs openid system/Communication.dus", "v2", None),  # not system/, or out of order
])
def test_what_an_explicit_scope_lacks_is_named_in_the_chosen_syntax(scope, version, lacking):
    needed = needs(uses(("Condition", "Observation"), reads_binaries=True, terminology_on_fhir_server=False))
    if lacking is None:  # grants nothing: everything is lacking
        lacking = {t: scope_string({t: letters}, version) for t, letters in needed.items()}
    assert missing(needed, scope, version) == lacking


def test_v1_and_v2_scopes_read_alike():
    assert granted("system/Observation.read system/Communication.write system/*.cs") == {
        "Observation": {"r", "s"}, "Communication": {"c", "u", "d"}, "*": {"c", "s"}}


@pytest.mark.parametrize("method, path, expected", [
    ("GET", "Patient/p1", ("Patient", "r")),
    ("GET", "Observation?patient=p1&_count=200", ("Observation", "s")),
    ("GET", "Condition/c1/_history?_count=10", ("Condition", "r")),  # instance history: r (SMART 2.x)
    ("GET", "Condition/_history", ("Condition", "s")),  # type history: s
    ("GET", "Subscription/s1/$status", ("Subscription", "r")),
    ("GET", "Subscription/s1/$events?eventsSinceNumber=1", ("Subscription", "r")),
    ("GET", "CodeSystem/$subsumes?system=x", ("CodeSystem", "r")),
    ("GET", "Binary/b1/_history/2", ("Binary", "r")),
    ("POST", "Communication", ("Communication", "c")),
    ("POST", "Observation/_search", ("Observation", "s")),
    ("PUT", "Subscription/s1", ("Subscription", "u")),
    ("DELETE", "Subscription/s1", ("Subscription", "d")),
    ("GET", "metadata", None),
    ("GET", "?_getpages=abc", None),
    ("GET", "https://elsewhere.example/fhir/Binary/b1", None),
])
def test_each_request_maps_to_a_type_and_a_smart_letter(method, path, expected):
    assert interaction_of(method, path) == expected


def test_a_refusal_names_the_interaction_and_the_scope_never_an_id():
    said = refusal("POST", "Communication", 403, "create Communication", "v2", OLD_DEFAULT)
    assert (said.interaction, said.needed_scope, said.message) == (
        "Communication create", "system/Communication.c",
        "Communication create refused (403): the token needs system/Communication.c")
    asked = refusal("GET", "Patient/secret-id", 401, "read Patient", "v1", V1_DEFAULT)
    assert asked.message == ("Patient read refused (401): system/Patient.read was asked for, but the server's "
                             "policy for this client does not grant it")
    assert refusal("GET", "metadata", 403, "capabilities", "v2", None).message == \
        "capabilities refused (403): not authorised"


# ---------------- the token request ----------------

@respx.mock
@pytest.mark.parametrize("explicit, expected", [(None, V2_DEFAULT), ("system/*.cruds", "system/*.cruds")])
def test_the_token_is_asked_for_the_built_scope_unless_one_is_set(key_path, explicit, expected):
    token = respx.post(TOKEN_URL).respond(200, json={"access_token": "at", "expires_in": 300})
    respx.get(f"{BASE}/Patient/p1").respond(200, json={"resourceType": "Patient", "id": "p1"})
    with FHIRClient.from_settings(smart(key_path, smart_scope=explicit)) as client:
        client.read("Patient", "p1")
    assert parse_qs(token.calls[0].request.content.decode())["scope"] == [expected]


@respx.mock
def test_a_refused_scope_at_the_token_endpoint_says_what_to_do(key_path):
    respx.post(TOKEN_URL).respond(400, json={"error": "invalid_scope"})
    with FHIRClient.from_settings(smart(key_path)) as client, pytest.raises(FHIRAuthError) as caught:
        client.read("Patient", "p1")
    assert "invalid_scope" in caught.value.message and "SPINEWATCH_SMART_SCOPE_VERSION=v1" in caught.value.message
    assert config_problems.find(caught.value).kind == "fhir-auth"


# ---------------- a refused request ----------------

@respx.mock
def test_a_403_is_a_permanent_scope_refusal_naming_what_it_needed_and_never_the_token(key_path):
    respx.post(TOKEN_URL).respond(200, json={"access_token": "secret-access-token", "expires_in": 300})
    respx.post(f"{BASE}/Communication").respond(403, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "forbidden"}]})
    with FHIRClient.from_settings(smart(key_path, smart_scope=OLD_DEFAULT)) as client, \
            pytest.raises(FHIRScopeRefused) as caught:
        client.create({"resourceType": "Communication", "status": "completed"})
    error = caught.value
    assert (error.status, error.interaction, error.needed_scope, error.transient) == (
        403, "Communication create", "system/Communication.c", False)
    assert error.message == "Communication create refused (403): the token needs system/Communication.c"
    assert "secret-access-token" not in repr(pickle.loads(pickle.dumps(error)).__dict__)
    again = pickle.loads(pickle.dumps(error))  # Celery pickles a failed task's exception
    assert (type(again), again.message, again.needed_scope) == (FHIRScopeRefused, error.message, error.needed_scope)


@respx.mock
def test_a_401_insufficient_scope_asks_for_no_new_token_and_is_a_refusal(key_path):
    token = respx.post(TOKEN_URL).respond(200, json={"access_token": "at", "expires_in": 300})
    reads = respx.get(f"{BASE}/Binary/b1").respond(401, headers={
        "WWW-Authenticate": 'Bearer realm="ehr", error="insufficient_scope", scope="system/Binary.r"'})
    with FHIRClient.from_settings(smart(key_path, smart_scope_version="v1")) as client, \
            pytest.raises(FHIRScopeRefused) as caught:
        client.read_binary(f"{BASE}/Binary/b1", 1000)  # an absolute URL on the server
    assert (token.call_count, reads.call_count) == (1, 1)  # the same scopes would be granted again
    assert caught.value.message == ("Binary read refused (401): system/Binary.read was asked for, but the server's "
                                    "policy for this client does not grant it")


@respx.mock
def test_a_refused_next_page_is_named_as_the_search_it_belongs_to():
    page = {"resourceType": "Bundle", "type": "searchset", "entry": [],
            "link": [{"relation": "next", "url": f"{BASE}/Observation?page=2"}]}
    respx.get(f"{BASE}/Observation", params={"patient": "p1"}).respond(200, json=page)
    respx.get(f"{BASE}/Observation", params={"page": "2"}).respond(403)
    with FHIRClient(BASE) as client, pytest.raises(FHIRScopeRefused) as caught:
        client.search_all("Observation", {"patient": "p1"})
    assert caught.value.needed_scope == "system/Observation.s" and "p1" not in caught.value.message


# ---------------- `spinewatch subscribe` on a server that enforces its scopes ----------------

def backport_capability() -> dict:
    sub = {"type": "Subscription", "supportedProfile": [BACKPORT_PROFILE],
           "extension": [{"url": TOPIC_CANONICAL, "valueCanonical": "http://example.org/topics/condition"}]}
    return {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": [sub]}]}


@pytest.mark.parametrize("semantics", ["spec", "medplum"])
@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("capability", [None, backport_capability()], ids=["classic", "backport"])
def test_subscribe_makes_only_calls_the_default_scope_allows(key_path, semantics, version, capability):
    with respx.mock(assert_all_called=False) as router:
        server = EnforcedScopeServer(router, BASE, TOKEN_URL, semantics=semantics, capability=capability)
        settings = smart(key_path, smart_scope_version=version)
        with FHIRClient.from_settings(settings) as fhir:
            first = [r.action for r in ensure(fhir, settings)]
            subs = server.of_type("Subscription")
            server.load(subs[0] | {"status": "error"})  # the server gave up on one: re-requested
            second = [r.action for r in ensure(fhir, settings)]
    assert (first, sorted(second)) == (["created", "created"], ["exists", "re-requested"])
    assert server.refused == []
    searched = {r.split("?")[0] for r in server.requests if r.startswith("GET ")}
    if capability:  # topic definitions were looked for, and allowed
        assert {"GET Basic", "GET SubscriptionTopic"} <= searched


# ---------------- check-config ----------------

def test_check_config_names_what_an_explicit_scope_lacks(monkeypatch, key_path, redis_url):
    for name, value in {"FHIR_AUTH": "smart-backend", "SMART_CLIENT_ID": "c", "SMART_PRIVATE_KEY_PATH": key_path,
                        "SMART_SCOPE": OLD_DEFAULT, "REDIS_URL": redis_url}.items():
        monkeypatch.setenv(f"SPINEWATCH_{name}", value)
    result = CliRunner().invoke(app, ["check-config"])
    assert result.exit_code == 0, result.output
    assert ("spinewatch: warning: SPINEWATCH_SMART_SCOPE lacks system/Communication.c, needed by alerts: the "
            "Communication found by its identifier, else created") in result.output
    assert f"spinewatch: SMART scope requested: {OLD_DEFAULT}" in result.output
    monkeypatch.delenv("SPINEWATCH_SMART_SCOPE")
    result = CliRunner().invoke(app, ["check-config"])
    assert f"spinewatch: SMART scope requested: {V2_DEFAULT}" in result.output and "lacks" not in result.output


def test_check_config_shows_the_last_configuration_problem_and_no_token(monkeypatch, redis_url):
    client = redis_client(redis_url)
    problem = config_problems.find(FHIRScopeRefused(
        "Communication create refused (403): the token needs system/Communication.c", 403,
        "Communication create", "system/Communication.c"))
    config_problems.record(client, problem, task="spinewatch.evaluate_patient")
    assert 0 < client.ttl(config_problems.KEY) <= config_problems.PROBLEM_TTL_SECONDS
    monkeypatch.setenv("SPINEWATCH_REDIS_URL", redis_url)
    result = CliRunner().invoke(app, ["check-config"])
    line = next(x for x in result.output.splitlines() if "last configuration problem" in x)
    assert line.startswith("spinewatch: warning: last configuration problem (20")
    assert line.endswith("spinewatch.evaluate_patient): Communication create refused (403): the token needs "
                         "system/Communication.c")
    client.delete(config_problems.KEY)
    client.close()


def test_check_config_says_when_the_last_problem_cannot_be_known(monkeypatch):
    monkeypatch.setenv("SPINEWATCH_REDIS_URL", "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(app, ["check-config"])
    assert "last configuration problem: unknown (Redis unreachable: ConnectionError)" in result.output
    assert result.exit_code == 0


def test_scope_warnings_need_an_explicit_scope(key_path):
    settings = smart(key_path)
    assert scope_warnings(settings.smart_scope, scope_uses(settings), "v2") == []
    assert scope_warnings("system/*.rs", scope_uses(settings), "v2") == [
        "SPINEWATCH_SMART_SCOPE lacks system/Communication.c, needed by alerts: the Communication found by its "
        "identifier, else created",
        "SPINEWATCH_SMART_SCOPE lacks system/Subscription.cu, needed by subscribe: search, create, update, read; "
        "watchdog: read, $status, $events, re-request"]
