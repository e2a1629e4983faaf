"""Care-team alerts: the pure Communication builder and the alert flow (fake FHIR server and Redis
here; tests/workers/test_alerts_sekmet.py runs the same flow against a real server and Redis).

Shown: one alert per patient-tier-evidence (retries and duplicate notifications included), an
upgrade alerts again, recipients in the stated order, a webhook signature the receiver can verify,
failures raised for retry or dead-lettering, never dropped."""

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import respx
from fhir.resources.R4B.communication import Communication

from fhir_mappings.cds.alerts import (ALERT_ID_SYSTEM, SIGNATURE_HEADER, alert_id, alert_input, communication,
                                  resolve_recipients, sign, verify_signature, webhook_body)
from fhir_mappings.fhir.bundle import read_path
from fhir_mappings.clinical.evaluate import assess
from service.infra.audit.store import AuditStore
from service.infra.audit.writer import AuditLog
from service.core.settings import Settings
from workers.alerts import AlertFailed, AlertRetry, ClientAdapter, alert_if_needed
from tests.support.paths import ROOT

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
PATIENT = "Patient/example-emergency"


def resources(neuro: bool = True) -> list[dict]:
    out = read_path(str(ROOT / "examples" / "emergency-breast-cancer-leg-weakness.json"))
    return [r for r in out if neuro or r.get("id") != "neuro-note"]


def emergency():
    return assess(resources(), NOW)


def urgent():
    return assess(resources(neuro=False), NOW)


# -- fakes -------------------------------------------------------------------------------------------

class FakeRedis:
    """The few Redis commands alerts use, in memory (real Redis: tests/integration)."""

    def __init__(self):
        self.data: dict = {}

    def hgetall(self, key):
        return dict(self.data.get(key, {}))

    def hset(self, key, field=None, value=None, mapping=None):
        h = self.data.setdefault(key, {})
        h.update(mapping or {field: value})

    def expire(self, key, seconds):
        return True

    def set(self, key, value, nx=False, ex=None):
        if nx and key in self.data:
            return None
        self.data[key] = value
        return True

    def eval(self, script, numkeys, key, token):
        if self.data.get(key) == token:
            del self.data[key]


class FakeFhir:
    """A FHIR server with conditional create on identifier, CareTeam search and Patient read."""

    def __init__(self, care_teams=(), patient=None, fail_create: list[Exception] | None = None):
        self.care_teams, self.patient = list(care_teams), patient
        self.communications: list[dict] = []
        self.fail_create = list(fail_create or [])
        self.creates = 0

    def search(self, resource_type, params):
        assert resource_type == "CareTeam" and params["patient"] == PATIENT
        return self.care_teams

    def read(self, resource_type, resource_id):
        return self.patient

    def create(self, resource, *, if_none_exist=None):
        self.creates += 1
        if self.fail_create:
            raise self.fail_create.pop(0)
        system, value = if_none_exist.split("=", 1)[1].split("|")
        for c in self.communications:
            if any(i["system"] == system and i["value"] == value for i in c["identifier"]):
                return c
        stored = copy.deepcopy(resource) | {"id": f"c{len(self.communications) + 1}"}
        self.communications.append(stored)
        return stored


CARE_TEAM = {"resourceType": "CareTeam", "status": "active", "subject": {"reference": PATIENT},
             "participant": [{"member": {"reference": "Practitioner/oncologist"}},
                             {"member": {"reference": "Practitioner/left"}, "period": {"end": "2026-01-01"}},
                             {"member": {"reference": "Organization/acute-oncology"}}]}
GP_PATIENT = {"resourceType": "Patient", "id": "example-emergency",
              "generalPractitioner": [{"reference": "Practitioner/gp"}]}


@pytest.fixture
def store(tmp_path):
    s = AuditStore(f"sqlite:///{tmp_path}/audit.sqlite")
    yield s
    s.dispose()


def log(store: AuditStore) -> AuditLog:
    """The worker's audit log, writing to `store`."""
    return AuditLog(settings(), store=store)


def settings(**kw):
    return Settings(environment="test", **kw)


# -- pure --------------------------------------------------------------------------------------------

def test_only_emergency_and_urgent_alert():
    assert alert_input(emergency()).tier == "emergency"
    assert alert_input(urgent()).tier == "urgent"
    routine = emergency()
    routine.urgency = "routine"
    assert alert_input(routine) is None


def test_alert_id_is_stable_and_changes_with_tier_or_evidence():
    a, b = alert_input(emergency()), alert_input(assess(resources(), NOW))
    assert alert_id(a) == alert_id(b)
    assert alert_id(a) != alert_id(alert_input(urgent()))
    # The stored JSON form gives the same id as the object (the pipeline may pass either).
    assert alert_id(alert_input(emergency().to_json())) == alert_id(a)


def test_communication_is_valid_r4_with_identifier_priority_recipients_and_evidence():
    alert = alert_input(emergency())
    resource = communication(alert, ["Practitioner/oncologist"], NOW)
    Communication.model_validate(resource)
    assert resource["identifier"] == [{"system": ALERT_ID_SYSTEM, "value": alert_id(alert)}]
    assert resource["priority"] == "stat" and resource["subject"] == {"reference": PATIENT}
    assert resource["category"][0]["coding"][0]["code"] == "alert"
    assert resource["payload"][0]["contentString"].startswith("Suspected spinal cord compression")
    refs = [p["contentReference"]["reference"] for p in resource["payload"][1:]]
    assert "Observation/neuro-note" in refs
    assert {"reference": "Condition/breast-cancer"} in resource["reasonReference"]
    # The payload quotes no patient text (that stays in the chart).
    assert "bilateral" not in json.dumps(resource)
    assert communication(alert_input(urgent()), ["Practitioner/x"], NOW)["priority"] == "urgent"


def test_recipients_care_team_then_general_practitioner_then_default():
    assert resolve_recipients([CARE_TEAM], GP_PATIENT, "Organization/default", NOW) == (
        ["Practitioner/oncologist", "Organization/acute-oncology"], "care-team")
    inactive = CARE_TEAM | {"status": "inactive"}
    assert resolve_recipients([inactive], GP_PATIENT, "Organization/default", NOW) == (["Practitioner/gp"],
                                                                                       "general-practitioner")
    assert resolve_recipients([], {"resourceType": "Patient"}, "Organization/default", NOW) == (
        ["Organization/default"], "default")
    assert resolve_recipients([], None, None, NOW) == ([], "none")


def test_another_patients_care_team_is_never_used():
    # A server may ignore CareTeam?patient= (FHIR R4 lenient search; sekmet does) and return every team.
    other = CARE_TEAM | {"subject": {"reference": "Patient/someone-else"}}
    assert resolve_recipients([other], GP_PATIENT, None, NOW, patient_ref=PATIENT) == (["Practitioner/gp"],
                                                                                       "general-practitioner")
    absolute = CARE_TEAM | {"subject": {"reference": "https://fhir.example.org/r4/" + PATIENT}}
    assert resolve_recipients([absolute], None, None, NOW, patient_ref=PATIENT)[1] == "care-team"


def test_webhook_signature_verifies_and_detects_tampering():
    body = webhook_body(alert_input(emergency()), "Communication/c1", ["Practitioner/x"], NOW)
    header = sign(body, "s3cret")
    assert header.startswith("sha256=") and verify_signature(body, "s3cret", header)
    assert not verify_signature(body.replace(b"emergency", b"urgent"), "s3cret", header)
    assert not verify_signature(body, "other", header)
    assert not verify_signature(body, "s3cret", None)


# -- the flow ----------------------------------------------------------------------------------------

def test_alerted_once_across_duplicate_notifications_and_audited(store):
    fhir, r = FakeFhir([CARE_TEAM]), FakeRedis()
    first = alert_if_needed(emergency(), settings(), fhir=fhir, audit=log(store), redis_client=r, now=NOW)
    again = alert_if_needed(emergency(), settings(), fhir=fhir, audit=log(store), redis_client=r, now=NOW)
    assert first.status == "sent" and again.status == "duplicate"
    assert len(fhir.communications) == 1 and fhir.creates == 1
    assert first.recipients == ["Practitioner/oncologist", "Organization/acute-oncology"]
    records, _ = store.query(kinds=["alert"])
    assert [(x.outcome, x.detail["communication"]) for x in records] == [("success", "Communication/c1")]
    assert records[0].patient == PATIENT


def test_a_retry_after_a_transient_failure_writes_no_second_communication(store):
    # The create reached the server but the answer was lost: the retry's conditional create finds it.
    fhir, r = FakeFhir([CARE_TEAM]), FakeRedis()
    fhir.create(communication(alert_input(emergency()), ["Practitioner/oncologist"], NOW),
                if_none_exist=f"identifier={ALERT_ID_SYSTEM}|{alert_id(alert_input(emergency()))}")
    fhir.fail_create = [httpx.ReadTimeout("lost")]
    with pytest.raises(AlertRetry):
        alert_if_needed(emergency(), settings(), fhir=fhir, audit=log(store), redis_client=r, now=NOW)
    result = alert_if_needed(emergency(), settings(), fhir=fhir, audit=log(store), redis_client=r, now=NOW)
    assert result.status == "sent" and len(fhir.communications) == 1
    outcomes = [x.outcome for x in store.query(kinds=["alert"], newest_first=False)[0]]
    assert outcomes == ["failure", "success"]


def test_an_upgrade_from_urgent_to_emergency_alerts_again(store):
    fhir, r = FakeFhir([CARE_TEAM]), FakeRedis()
    assert alert_if_needed(urgent(), settings(), fhir=fhir, audit=log(store), redis_client=r, now=NOW).status == "sent"
    assert alert_if_needed(urgent(), settings(), fhir=fhir, audit=log(store), redis_client=r, now=NOW).status == "duplicate"
    assert alert_if_needed(emergency(), settings(), fhir=fhir, audit=log(store), redis_client=r, now=NOW).status == "sent"
    assert [c["priority"] for c in fhir.communications] == ["urgent", "stat"]


def test_routine_never_alerts(store):
    fhir = FakeFhir([CARE_TEAM])
    a = emergency()
    a.urgency = "routine"
    assert alert_if_needed(a, settings(), fhir=fhir, audit=log(store), redis_client=FakeRedis(), now=NOW).status == "not-needed"
    assert fhir.creates == 0


def test_general_practitioner_then_default_recipient(store):
    fhir = FakeFhir([], GP_PATIENT)
    assert alert_if_needed(emergency(), settings(), fhir=fhir, audit=log(store), redis_client=FakeRedis(), now=NOW).recipients == \
        ["Practitioner/gp"]
    fhir = FakeFhir([], {"resourceType": "Patient", "id": "example-emergency"})
    result = alert_if_needed(emergency(), settings(alert_default_recipient="Organization/acute-oncology"),
                             fhir=fhir, audit=log(store), redis_client=FakeRedis(), now=NOW)
    assert result.recipients == ["Organization/acute-oncology"]


def test_no_recipient_at_all_fails_for_the_dead_letter_list(store):
    fhir = FakeFhir([], {"resourceType": "Patient", "id": "example-emergency"})
    with pytest.raises(AlertFailed):
        alert_if_needed(emergency(), settings(), fhir=fhir, audit=log(store), redis_client=FakeRedis(), now=NOW)
    assert store.query(kinds=["alert"], outcome="failure")[1] == 1


def test_a_lock_held_by_another_worker_means_retry_later(store):
    r = FakeRedis()
    ident = alert_id(alert_input(emergency()))
    r.set(f"spinewatch:alert:{ident}:lock", "someone-else", nx=True)
    with pytest.raises(AlertRetry):
        alert_if_needed(emergency(), settings(), fhir=FakeFhir([CARE_TEAM]), audit=log(store), redis_client=r, now=NOW)
    assert r.data[f"spinewatch:alert:{ident}:lock"] == "someone-else"


@respx.mock
def test_webhook_is_signed_retried_and_sent_once(store):
    received = []

    def receiver(request):
        received.append(request)
        return httpx.Response(503) if len(received) == 1 else httpx.Response(204)

    respx.post("https://hooks.example.org/alerts").mock(side_effect=receiver)
    s = settings(alert_webhook_url="https://hooks.example.org/alerts", alert_webhook_secret="s3cret")
    fhir, r = FakeFhir([CARE_TEAM]), FakeRedis()
    with pytest.raises(AlertRetry):
        alert_if_needed(emergency(), s, fhir=fhir, audit=log(store), redis_client=r, now=NOW)
    result = alert_if_needed(emergency(), s, fhir=fhir, audit=log(store), redis_client=r, now=NOW)
    assert result.status == "sent" and result.channels == ["fhir", "webhook"]
    assert alert_if_needed(emergency(), s, fhir=fhir, audit=log(store), redis_client=r, now=NOW).status == "duplicate"
    assert len(received) == 2 and len(fhir.communications) == 1
    last = received[-1]
    assert verify_signature(last.content, "s3cret", last.headers[SIGNATURE_HEADER])
    body = json.loads(last.content)
    assert body["tier"] == "emergency" and body["communication"] == "Communication/c1"
    assert body["patient"] == PATIENT and "bilateral" not in last.content.decode()


@respx.mock
def test_webhook_without_secret_or_refusing_fails_permanently(store):
    respx.post("https://hooks.example.org/alerts").mock(return_value=httpx.Response(404))
    fhir = FakeFhir([CARE_TEAM])
    with pytest.raises(AlertFailed):
        alert_if_needed(emergency(), settings(alert_webhook_url="https://hooks.example.org/alerts"),
                        fhir=fhir, audit=log(store), redis_client=FakeRedis(), now=NOW)
    with pytest.raises(AlertFailed):
        alert_if_needed(emergency(), settings(alert_webhook_url="https://hooks.example.org/alerts",
                                              alert_webhook_secret="s"), fhir=fhir, audit=log(store), redis_client=FakeRedis(), now=NOW)


@respx.mock
def test_the_fhir_client_adapter_searches_then_conditionally_creates():
    from service.infra.fhir.sync import FHIRClient

    base = "https://fhir.example.org/r4"
    existing = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    search = respx.get(f"{base}/Communication").mock(return_value=httpx.Response(200, json=existing))
    create = respx.post(f"{base}/Communication").mock(
        return_value=httpx.Response(201, json={"resourceType": "Communication", "id": "new"}))
    teams = respx.get(f"{base}/CareTeam").mock(return_value=httpx.Response(
        200, json={"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": CARE_TEAM}]}))
    with FHIRClient(base) as client:
        adapter = ClientAdapter(client)
        alert = alert_input(emergency())
        created = adapter.create(communication(alert, ["Practitioner/x"], NOW),
                                 if_none_exist=f"identifier={ALERT_ID_SYSTEM}|{alert_id(alert)}")
        assert created["id"] == "new"
        assert search.calls[0].request.url.params["identifier"] == f"{ALERT_ID_SYSTEM}|{alert_id(alert)}"
        assert create.call_count == 1
        assert adapter.search("CareTeam", {"patient": PATIENT, "status": "active"}) == [CARE_TEAM]
        assert teams.calls[0].request.url.params["status"] == "active"


@respx.mock
def test_fhir_server_errors_are_retried_and_client_errors_are_not(store):
    from service.infra.fhir.sync import FHIRClient

    base = "https://fhir.example.org/r4"
    respx.get(f"{base}/CareTeam").mock(return_value=httpx.Response(503))
    with FHIRClient(base) as client, pytest.raises(AlertRetry):
        alert_if_needed(emergency(), settings(), fhir=ClientAdapter(client), audit=log(store), redis_client=FakeRedis(), now=NOW)
    respx.get(f"{base}/CareTeam").mock(return_value=httpx.Response(400))
    with FHIRClient(base) as client, pytest.raises(AlertFailed):
        alert_if_needed(emergency(), settings(), fhir=ClientAdapter(client), audit=log(store), redis_client=FakeRedis(), now=NOW)
