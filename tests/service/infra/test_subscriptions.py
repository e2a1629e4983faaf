"""service.infra.fhir.subscriptions (`spinewatch subscribe`) against a respx-mocked FHIR server: classic or
backport per the CapabilityStatement, idempotent create, update, re-request on error, off left alone;
the status rules (created `active`, `requested` where the server refuses that, a stuck `requested`
asked for `active`), Medplum's signature secret, and what `subscribe` / `subscribe --check` say and
exit with."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import respx
from pydantic import SecretStr
from typer.testing import CliRunner

from service.infra.fhir.sync import FHIRClient
from service.core.settings import Settings
from service.infra.fhir.subscriptions import (BACKPORT_PROFILE, SECRET_EXTENSION, TAG_SYSTEM, TOPIC_CANONICAL, Plan,
                                              desired, ensure, subscription_capability, topic_triggers)
from tests.support.paths import SHARED

BASE = "http://ehr.test/fhir"
ENDPOINT = "https://spinewatch.test/fhir/notifications"
SUBS = SHARED / "data" / "subscriptions"
BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
GRACE = timedelta(seconds=600)  # the default of SPINEWATCH_SUBSCRIPTION_ACTIVATION_GRACE_SECONDS


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
    """A respx FHIR server that keeps the Subscriptions it is given, stamping meta.lastUpdated with
    `clock`. activates: a `requested` one becomes `active` (as sekmet does); off: kept as given (as
    Medplum does: a `requested` one stays so). refuses_active: a write asking for `active` gets 422.
    echoes_secrets: False leaves channel.header and the signature extension out of every answer."""

    def __init__(self, cap: dict, topics=(), existing=(), *, activates: bool = True, refuses_active: bool = False,
                 echoes_secrets: bool = True, clock: datetime = NOW):
        self.subs = {s["id"]: s for s in existing}
        self.created, self.updated = [], []
        self.activates, self.refuses_active, self.echoes_secrets, self.clock = \
            activates, refuses_active, echoes_secrets, clock
        respx.get(f"{BASE}/metadata").respond(200, json=cap)
        respx.get(f"{BASE}/Basic").respond(200, json=searchset(*topics))
        respx.get(f"{BASE}/SubscriptionTopic").respond(404)
        respx.get(f"{BASE}/Subscription").mock(side_effect=lambda req: httpx.Response(
            200, json=searchset(*[self._shown(s) for s in self.subs.values()
                                  if s["channel"]["endpoint"] == req.url.params.get("url")])))
        respx.post(f"{BASE}/Subscription").mock(side_effect=self._create)
        respx.put(url__regex=rf"{BASE}/Subscription/[^/]+$").mock(side_effect=self._update)
        respx.get(url__regex=rf"{BASE}/Subscription/[^/]+$").mock(side_effect=self._read)

    def _create(self, request):
        sub = json.loads(request.content) | {"id": f"s{len(self.subs) + 1}"}
        self.created.append(sub)
        return self._store(sub, 201)

    def _update(self, request):
        sub = json.loads(request.content)
        self.updated.append(sub)
        return self._store(sub, 200)

    def _store(self, sub: dict, code: int):
        if self.refuses_active and sub["status"] == "active":
            return httpx.Response(422, json={"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "invariant", "diagnostics": "a client may submit only requested or off"}]})
        stored = sub | {"meta": (sub.get("meta") or {}) | {"lastUpdated": self.clock.isoformat()}}
        if self.activates and sub["status"] == "requested":
            stored["status"] = "active"
        self.subs[sub["id"]] = stored
        return httpx.Response(code, json=self._shown(sub))  # the answer echoes the request

    def _shown(self, sub: dict) -> dict:
        if self.echoes_secrets:
            return sub
        channel = {k: v for k, v in sub["channel"].items() if k != "header"}
        return {k: v for k, v in sub.items() if k != "extension"} | {"channel": channel}

    def _read(self, request):
        sid = request.url.path.rsplit("/", 1)[1]
        return httpx.Response(200, json=self._shown(self.subs[sid])) if sid in self.subs else httpx.Response(404)


def ours(rtype: str, sid: str, status: str = "active", token: str = "sekrit", criteria: str | None = None,
         written: datetime = NOW - timedelta(days=1)) -> dict:
    return {"resourceType": "Subscription", "id": sid, "status": status, "criteria": criteria or f"{rtype}?",
            "meta": {"tag": [{"system": TAG_SYSTEM, "code": rtype.lower()}], "lastUpdated": written.isoformat()},
            "channel": {"type": "rest-hook", "endpoint": ENDPOINT, "payload": "application/fhir+json",
                        "header": [f"Authorization: Bearer {token}"]}}


def run(settings, now: datetime = NOW, check_only: bool = False) -> list[dict]:
    with FHIRClient(BASE) as fhir:
        return [r.to_json() for r in ensure(fhir, settings, now=now, check_only=check_only)]


def signed(settings, secret="sign-me"):
    return settings.model_copy(update={"notification_signature_secret": SecretStr(secret)})


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
    assert cond["status"] == "active" and cond["meta"]["tag"] == [{"system": TAG_SYSTEM, "code": "condition"}]
    assert "extension" not in cond  # no signature secret configured
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
    assert reports[0]["status"] == "active" and reports[0]["asked"] == "requested" and reports[0]["problem"] is None


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
    refused = respx.post(f"{BASE}/Subscription").respond(422, json={"resourceType": "OperationOutcome", "issue": []})
    assert [(r["action"], r["error"]) for r in run(settings)] == [("failed", "create Subscription: HTTP 422")] * 2
    # asked as `active`, then once more as `requested`, for each type
    assert [json.loads(c.request.content)["status"] for c in refused.calls] == ["active", "requested"] * 2


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


# ---------------- the status rules ----------------

@respx.mock
def test_a_server_that_accepts_active_gets_it_at_once(settings):
    server = Server(capability(), activates=False)  # as Medplum: keeps what it is given
    reports = run(settings)
    assert [(r["status"], r["asked"], r["problem"]) for r in reports] == [("active", "active", None)] * 2
    assert [c["status"] for c in server.created] == ["active", "active"]


@respx.mock
def test_a_server_that_refuses_active_on_create_is_asked_again_with_requested(settings):
    server = Server(capability(), refuses_active=True)  # the letter of R4; it activates `requested` itself
    reports = run(settings)
    assert [(r["action"], r["status"], r["asked"], r["problem"]) for r in reports] == \
        [("created", "active", "requested", None)] * 2
    assert [c["status"] for c in server.created] == ["active", "requested"] * 2
    assert [r["action"] for r in run(settings)] == ["exists", "exists"]


@respx.mock
def test_a_server_that_refuses_active_and_never_activates_is_reported_once_the_grace_period_is_over(settings):
    server = Server(capability(), refuses_active=True, activates=False)
    first = run(settings)
    assert [(r["action"], r["status"], r["problem"]) for r in first] == [("created", "requested", None)] * 2

    later = run(settings, now=NOW + GRACE)
    assert [r["action"] for r in later] == ["activation refused"] * 2
    assert [u["status"] for u in server.updated] == ["active", "active"]
    problem = later[0]["problem"]
    assert "`requested` for 10 min" in problem and "no notifications will arrive" in problem
    assert "refused `active` (update Subscription: HTTP 422)" in problem
    assert later[0]["error"] == "update Subscription: HTTP 422"


@respx.mock
def test_a_subscription_left_requested_past_the_grace_period_is_updated_to_active(settings):
    stuck = ours("Condition", "c-sub", status="requested", written=NOW - GRACE - timedelta(seconds=1))
    server = Server(capability(), existing=[stuck, ours("Observation", "o-sub")], activates=False)
    reports = run(settings)
    assert [(r["action"], r["status"], r["problem"]) for r in reports] == [
        ("activated", "active", None), ("exists", "active", None)]
    (put,) = server.updated
    assert put["id"] == "c-sub" and put["status"] == "active"
    assert put["channel"]["header"] == ["Authorization: Bearer sekrit"]


@respx.mock
def test_a_subscription_requested_within_the_grace_period_is_left_for_the_server(settings):
    fresh = ours("Condition", "c-sub", status="requested", written=NOW - GRACE + timedelta(seconds=5))
    server = Server(capability(), existing=[fresh, ours("Observation", "o-sub")], activates=False)
    assert [(r["action"], r["status"], r["problem"]) for r in run(settings)] == [
        ("exists", "requested", None), ("exists", "active", None)]
    assert server.updated == []


@respx.mock
def test_re_requesting_puts_back_the_secrets_a_server_left_out_of_its_answer(settings):
    broken = ours("Condition", "c-sub", status="error") | {"error": "HTTP 503",
                                                           "extension": [{"url": SECRET_EXTENSION, "valueString": "sign-me"}]}
    server = Server(capability(), existing=[broken, ours("Observation", "o-sub")], echoes_secrets=False)
    assert [r["action"] for r in run(signed(settings))] == ["re-requested", "exists"]
    (put,) = server.updated
    assert put["status"] == "requested" and put["channel"]["header"] == ["Authorization: Bearer sekrit"]
    assert put["extension"] == [{"url": SECRET_EXTENSION, "valueString": "sign-me"}]


@respx.mock
def test_check_reports_what_will_not_deliver_and_changes_nothing(settings):
    existing = [ours("Condition", "c-sub", status="requested", written=NOW - timedelta(hours=2))]
    server = Server(capability(), existing=existing, activates=False)
    reports = run(settings, check_only=True)
    assert [(r["resource_type"], r["action"], r["status"]) for r in reports] == [
        ("Condition", "exists", "requested"), ("Observation", "missing", None)]
    assert "`requested` for 120 min: no notifications will arrive" in reports[0]["problem"]
    assert reports[1]["problem"] == "not on the server: no notifications will arrive; run `spinewatch subscribe`"
    assert server.created == [] and server.updated == []


# ---------------- Medplum's signature secret ----------------

def test_the_signature_secret_rides_in_medplums_extension_and_never_in_a_report(settings):
    sub = desired(Plan("Condition", "classic", "Condition?"), signed(settings))
    assert sub["extension"] == [{"url": "https://www.medplum.com/fhir/StructureDefinition/subscription-secret",
                                 "valueString": "sign-me"}]
    assert "extension" not in desired(Plan("Condition", "classic", "Condition?"), settings)


@respx.mock
def test_a_signature_secret_added_changed_or_removed_updates_the_subscription(settings):
    server = Server(capability())
    run(settings)
    assert [r["action"] for r in run(signed(settings))] == ["updated", "updated"]  # added
    assert server.subs["s1"]["extension"] == [{"url": SECRET_EXTENSION, "valueString": "sign-me"}]
    assert [r["action"] for r in run(signed(settings))] == ["exists", "exists"]
    assert [r["action"] for r in run(signed(settings, "rotated"))] == ["updated", "updated"]  # changed
    assert server.subs["s1"]["extension"] == [{"url": SECRET_EXTENSION, "valueString": "rotated"}]
    assert [r["action"] for r in run(settings)] == ["updated", "updated"]  # removed
    assert "extension" not in server.subs["s1"]
    assert not any("sign-me" in json.dumps(r) or "rotated" in json.dumps(r) for r in run(signed(settings)))


@respx.mock
def test_a_server_that_withholds_secrets_is_not_updated_on_every_run(settings):
    server = Server(capability(), echoes_secrets=False)
    run(signed(settings))
    assert server.created[0]["extension"] == [{"url": SECRET_EXTENSION, "valueString": "sign-me"}]
    assert [r["action"] for r in run(signed(settings))] == ["exists", "exists"]
    assert server.updated == []


# ---------------- the command ----------------

@pytest.fixture
def cli(monkeypatch):
    """`spinewatch subscribe` in-process, with Redis unreachable (registering is best effort)."""
    from service.cli.main import app
    from service.core.settings import get_settings

    env = {"SPINEWATCH_FHIR_BASE_URL": BASE, "SPINEWATCH_SUBSCRIPTION_ENDPOINT": ENDPOINT,
           "SPINEWATCH_NOTIFICATION_TOKEN": "sekrit", "SPINEWATCH_REDIS_URL": "redis://127.0.0.1:1/0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield lambda *args: CliRunner().invoke(app, ["subscribe", *args])
    get_settings.cache_clear()


@respx.mock
def test_check_exits_0_when_every_subscription_is_active(cli):
    Server(capability(), existing=[ours("Condition", "c-sub"), ours("Observation", "o-sub")])
    result = cli("--check")
    assert result.exit_code == 0, result.output
    assert "!" not in result.stdout


@respx.mock
def test_check_exits_3_and_says_why_when_one_will_not_deliver(cli):
    stuck = ours("Condition", "c-sub", status="requested", written=datetime.now(timezone.utc) - timedelta(hours=1))
    Server(capability(), existing=[stuck, ours("Observation", "o-sub", status="error")])
    result = cli("--check")
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ! ")]
    assert len(lines) == 2
    assert lines[0].startswith("  ! Condition: the server has left it `requested` for 60 min: no notifications "
                               "will arrive")
    assert lines[1].startswith("  ! Observation: the server put it in `error`: no notifications will arrive")


@respx.mock
def test_check_exits_3_while_a_new_subscription_waits_for_the_server_and_subscribe_does_not(cli):
    fresh = ours("Condition", "c-sub", status="requested", written=datetime.now(timezone.utc))
    Server(capability(), existing=[fresh, ours("Observation", "o-sub")], activates=False)
    result = cli("--check")
    assert result.exit_code == 3, result.output
    assert "  ! Condition: `requested`, not yet activated by the server" in result.stdout
    assert cli().exit_code == 0  # within the grace period: the server may still activate it


@respx.mock
def test_subscribe_exits_3_when_the_server_refuses_to_activate_a_stuck_subscription(cli):
    stuck = ours("Condition", "c-sub", status="requested", written=datetime.now(timezone.utc) - timedelta(hours=1))
    Server(capability(), existing=[stuck, ours("Observation", "o-sub")], refuses_active=True, activates=False)
    result = cli("--json")
    assert result.exit_code == 3, result.output
    condition = json.loads(result.stdout.splitlines()[0])
    assert condition["action"] == "activation refused" and "have it activated on the server" in condition["problem"]


@respx.mock
def test_subscribe_exits_1_when_the_server_fails_a_create(cli):
    Server(capability())
    respx.post(f"{BASE}/Subscription").respond(500)
    assert cli().exit_code == 1
