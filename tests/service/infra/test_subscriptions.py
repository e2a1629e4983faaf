"""service.infra.fhir.subscriptions (`spinewatch subscribe`) against a respx-mocked FHIR server: classic or
backport per the CapabilityStatement, idempotent create, update, re-request on error, off left alone."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import respx
from typer.testing import CliRunner

from service.infra.fhir.sync import FHIRClient
from service.core.settings import Settings
from service.infra.fhir.subscriptions import (BACKPORT_PROFILE, TAG_SYSTEM, TOPIC_CANONICAL, desired, ensure,
                                   subscription_capability, topic_triggers)
from tests.support.paths import SHARED

BASE = "http://ehr.test/fhir"
ENDPOINT = "https://spinewatch.test/fhir/notifications"
SUBS = SHARED / "data" / "subscriptions"
BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"


@pytest.fixture
def settings():
    return Settings(fhir_base_url=BASE, subscription_endpoint=ENDPOINT, notification_token="sekrit",
                    heartbeat_watchdog_seconds=120)


def capability(backport: bool = False, topics=()) -> dict:
    sub = {"type": "Subscription", "interaction": [{"code": "create"}]}
    if backport:
        sub["supportedProfile"] = [BACKPORT_PROFILE]
        sub["extension"] = [{"url": TOPIC_CANONICAL, "valueCanonical": t} for t in topics]
    return {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": [sub]}]}


def searchset(*resources):
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def topic_basic(url: str, resource: str) -> dict:
    st = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic"
    return {"resourceType": "Basic", "id": resource.lower(), "extension": [
        {"url": f"{st}.url", "valueUri": url},
        {"url": f"{st}.resourceTrigger", "extension": [
            {"url": "resource", "valueUri": f"http://hl7.org/fhir/StructureDefinition/{resource}"},
            {"url": "supportedInteraction", "valueCode": "create"}]}]}


class Server:
    """A respx FHIR server that keeps the Subscriptions it is given."""

    def __init__(self, cap: dict, topics=(), existing=()):
        self.subs = {s["id"]: s for s in existing}
        self.created, self.updated = [], []
        respx.get(f"{BASE}/metadata").respond(200, json=cap)
        respx.get(f"{BASE}/Basic").respond(200, json=searchset(*topics))
        respx.get(f"{BASE}/SubscriptionTopic").respond(404)
        respx.get(f"{BASE}/Subscription").mock(side_effect=lambda req: httpx.Response(
            200, json=searchset(*[s for s in self.subs.values()
                                  if s["channel"]["endpoint"] == req.url.params.get("url")])))
        respx.post(f"{BASE}/Subscription").mock(side_effect=self._create)
        respx.put(url__regex=rf"{BASE}/Subscription/[^/]+$").mock(side_effect=self._update)
        respx.get(url__regex=rf"{BASE}/Subscription/[^/]+$").mock(side_effect=self._read)

    def _create(self, request):
        sub = json.loads(request.content) | {"id": f"s{len(self.subs) + 1}"}
        self.subs[sub["id"]] = sub | {"status": "active"}  # activated at once, as sekmet does
        self.created.append(sub)
        return httpx.Response(201, json=sub)

    def _update(self, request):
        sub = json.loads(request.content)
        self.subs[sub["id"]] = sub | {"status": "active" if sub["status"] == "requested" else sub["status"]}
        self.updated.append(sub)
        return httpx.Response(200, json=sub)

    def _read(self, request):
        sid = request.url.path.rsplit("/", 1)[1]
        return httpx.Response(200, json=self.subs[sid]) if sid in self.subs else httpx.Response(404)


def ours(rtype: str, sid: str, status: str = "active", token: str = "sekrit", criteria: str | None = None) -> dict:
    return {"resourceType": "Subscription", "id": sid, "status": status, "criteria": criteria or f"{rtype}?",
            "meta": {"tag": [{"system": TAG_SYSTEM, "code": rtype.lower()}]},
            "channel": {"type": "rest-hook", "endpoint": ENDPOINT, "payload": "application/fhir+json",
                        "header": [f"Authorization: Bearer {token}"]}}


def run(settings) -> list[dict]:
    with FHIRClient(BASE) as fhir:
        return [r.to_json() for r in ensure(fhir, settings)]


def test_inferno_capability_statement_offers_backport_topics():
    cs = json.loads((SUBS / "inferno" / "capability_statement_example.json").read_text()) \
        if (SUBS / "inferno").exists() else pytest.skip("shared data not found")
    assert subscription_capability(cs) == (True, ["http://fhirserver.org/topics/patient-admission",
                                                  "http://fhirserver.org/topics/patient-discharge"])


def test_backport_ig_topic_as_basic_names_its_trigger():
    path = SUBS / "backport-ig" / "Basic-r4-encounter-complete.json"
    if not path.exists():
        pytest.skip("shared data not found")
    assert topic_triggers(json.loads(path.read_text())) == (
        "http://hl7.org/fhir/uv/subscriptions-backport/SubscriptionTopic/r4-encounter-complete", ["Encounter"])


@respx.mock
def test_classic_subscriptions_are_created_with_the_secret_in_channel_header(settings):
    server = Server(capability())
    reports = run(settings)
    assert [(r["resource_type"], r["mode"], r["criteria"], r["status"], r["action"]) for r in reports] == [
        ("Condition", "classic", "Condition?", "active", "created"),
        ("Observation", "classic", "Observation?", "active", "created")]
    cond = server.created[0]
    assert cond["status"] == "requested" and cond["meta"]["tag"] == [{"system": TAG_SYSTEM, "code": "condition"}]
    assert cond["channel"] == {"type": "rest-hook", "endpoint": ENDPOINT, "payload": "application/fhir+json",
                               "header": ["Authorization: Bearer sekrit"]}


@respx.mock
def test_running_it_again_changes_nothing(settings):
    server = Server(capability())
    run(settings)
    again = run(settings)
    assert [r["action"] for r in again] == ["exists", "exists"]
    assert len(server.created) == 2 and server.updated == []


@respx.mock
def test_a_subscription_in_error_is_re_requested(settings):
    broken = ours("Condition", "c-sub", status="error") | {"error": "Delivery failed: HTTP 503"}
    server = Server(capability(), existing=[broken, ours("Observation", "o-sub")])
    reports = run(settings)
    assert [r["action"] for r in reports] == ["re-requested", "exists"]
    (put,) = server.updated
    assert put["status"] == "requested" and "error" not in put
    assert reports[0]["status"] == "active"


@respx.mock
def test_a_subscription_turned_off_is_left_alone_and_reported(settings):
    server = Server(capability(), existing=[ours("Condition", "c-sub", status="off"), ours("Observation", "o-sub")])
    assert [r["action"] for r in run(settings)] == ["off (left alone)", "exists"]
    assert server.updated == [] and server.created == []


@respx.mock
def test_a_rotated_secret_updates_the_subscription(settings):
    server = Server(capability(), existing=[ours("Condition", "c-sub", token="old"), ours("Observation", "o-sub")])
    assert [r["action"] for r in run(settings)] == ["updated", "exists"]
    assert server.updated[0]["channel"]["header"] == ["Authorization: Bearer sekrit"]


@respx.mock
def test_someone_elses_subscription_to_our_endpoint_is_not_ours(settings):
    foreign = ours("Condition", "x") | {"meta": {}}
    server = Server(capability(), existing=[foreign])
    assert [r["action"] for r in run(settings)] == ["created", "created"]
    assert "x" in server.subs and server.updated == []


@respx.mock
def test_backport_topics_are_used_where_the_server_offers_them(settings):
    topics = [topic_basic("http://ehr.test/topic/condition", "Condition"),
              topic_basic("http://ehr.test/topic/encounter", "Encounter")]
    server = Server(capability(True, ["http://ehr.test/topic/condition", "http://ehr.test/topic/encounter"]), topics)
    reports = run(settings)
    assert [(r["mode"], r["criteria"]) for r in reports] == [("backport", "http://ehr.test/topic/condition"),
                                                            ("classic", "Observation?")]
    sub = server.created[0]
    assert sub["meta"]["profile"] == [BACKPORT_PROFILE]
    assert sub["channel"]["_payload"] == {"extension": [{"url": f"{BP}/backport-payload-content", "valueCode": "id-only"}]}
    assert {"url": f"{BP}/backport-heartbeat-period", "valueUnsignedInt": 60} in sub["channel"]["extension"]


@respx.mock
def test_a_topic_defined_but_not_advertised_is_not_used(settings):
    Server(capability(True, []), [topic_basic("http://ehr.test/topic/condition", "Condition")])
    assert [r["mode"] for r in run(settings)] == ["classic", "classic"]


@respx.mock
def test_the_server_refusing_a_subscription_is_reported(settings):
    Server(capability())
    respx.post(f"{BASE}/Subscription").respond(422, json={"resourceType": "OperationOutcome", "issue": []})
    assert [(r["action"], r["error"]) for r in run(settings)] == [("failed", "create Subscription: HTTP 422")] * 2


@respx.mock
def test_cli_reports_each_subscription_and_fails_on_errors(settings, monkeypatch, tmp_path):
    from service.cli.main import app

    env = {"SPINEWATCH_FHIR_BASE_URL": BASE, "SPINEWATCH_SUBSCRIPTION_ENDPOINT": ENDPOINT,
           "SPINEWATCH_NOTIFICATION_TOKEN": "sekrit", "SPINEWATCH_REDIS_URL": "redis://127.0.0.1:1/0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from service.core.settings import get_settings

    get_settings.cache_clear()
    try:
        Server(capability())
        result = CliRunner().invoke(app, ["subscribe", "--json"])
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert [(x["resource_type"], x["action"]) for x in lines] == [("Condition", "created"), ("Observation", "created")]
        assert "not registered with the watchdog" in result.stderr  # Redis is down here: said, not fatal
        assert "sekrit" not in result.output
    finally:
        get_settings.cache_clear()


def test_desired_subscription_never_logs_or_reports_the_secret(settings):
    from service.infra.fhir.subscriptions import Plan, Report

    sub = desired(Plan("Condition", "classic", "Condition?"), settings)
    assert sub["channel"]["header"] == ["Authorization: Bearer sekrit"]
    assert "sekrit" not in json.dumps(Report("Condition", "classic", "Condition?", "s1", "active", "created").to_json())


@respx.mock
def test_the_subscribed_types_are_a_setting_with_document_reference_where_the_operator_adds_it(settings):
    notes = settings.model_copy(update={"subscription_types": "Condition,Observation,DocumentReference"})
    topics = [topic_basic("http://ehr.test/topic/note", "DocumentReference")]
    server = Server(capability(True, ["http://ehr.test/topic/note"]), topics)
    reports = run(notes)
    assert [(r["resource_type"], r["mode"], r["criteria"], r["action"]) for r in reports] == [
        ("Condition", "classic", "Condition?", "created"), ("Observation", "classic", "Observation?", "created"),
        ("DocumentReference", "backport", "http://ehr.test/topic/note", "created")]
    assert server.created[2]["meta"]["tag"] == [{"system": TAG_SYSTEM, "code": "documentreference"}]
    assert [r["action"] for r in run(notes)] == ["exists"] * 3
    assert [r["resource_type"] for r in run(settings)] == ["Condition", "Observation"]  # the default pair


def test_a_subscribed_type_the_workers_do_not_read_is_refused_at_start_up():
    from pydantic import ValidationError

    for bad in ("Condition,DocRef", "", "Condition,Condition"):
        with pytest.raises(ValidationError):
            Settings(subscription_types=bad)
    assert Settings(subscription_types=" DocumentReference , Condition ").subscribed_types == \
        ("DocumentReference", "Condition")
