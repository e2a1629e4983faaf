"""End to end against a real FHIR server, sekmet-fhir, with every SpineWatch process started as a
user starts it: `spinewatch serve`, `spinewatch worker`, `spinewatch subscribe`.

A cancer Condition, a back-pain Condition and a leg-weakness Observation are written to sekmet;
sekmet's own rest-hook notifications reach the API, the worker evaluates the patient from sekmet's
data and stores the assessment, and a patient-view call with neither prefetch nor fhirServer gets
the emergency card. Once with classic R4 criteria (sekmet 0.1.1 has no Condition/Observation topic),
once with R5 Backport topics added to sekmet (handshake, id-only event notifications).

What sekmet does with the status SpineWatch asks for (sekmet 0.1.1, subscriptions/engine.py): a
create as `active` is kept as given (no second write) and notified; a backport one still gets its
handshake first. `requested` it activates itself; `error` and `off` written by a client it keeps, so
`subscribe --check` reports them and `subscribe` re-requests the one in error. It keeps and returns
the signature-secret extension, so adding, rotating and removing it are updates.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import httpx
import pytest
import redis

from tests.support import cds_hooks as ch
from tests.support.processes import ROOT, SPINEWATCH, Proc, http_up
from tests.support.sekmet_server import SekmetServer, free_port

pytestmark = pytest.mark.integration
DB = 8  # a database of the session's redis-server of its own
PATIENT_VIEW = "spinewatch-patient-view"


@pytest.fixture(scope="module")
def spinewatch(sekmet_server: SekmetServer, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-subscribe")
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    issuer = ch.Issuer("https://ehr.e2e.example")
    (tmp / "jwks.json").write_text(json.dumps(issuer.jwks))
    port = free_port()
    api_base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
        "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": url,
        "SPINEWATCH_FHIR_BASE_URL": sekmet_server.base_url,
        "SPINEWATCH_SUBSCRIPTION_ENDPOINT": f"{api_base}/fhir/notifications",
        "SPINEWATCH_NOTIFICATION_TOKEN": "e2e-" + uuid.uuid4().hex, "SPINEWATCH_COALESCE_SECONDS": "0.3",
        "SPINEWATCH_PUBLIC_BASE_URL": api_base,
        "SPINEWATCH_CDS_TRUSTED_ISSUERS": json.dumps({issuer.iss: str(tmp / "jwks.json")}),
        "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp}/audit.sqlite",
        "SPINEWATCH_ALERT_DEFAULT_RECIPIENT": "Organization/acute-oncology",
        "SPINEWATCH_RECONCILIATION_INTERVAL_SECONDS": "0", "PYTHONUNBUFFERED": "1",
    }
    api = Proc([*SPINEWATCH, "serve", "--port", str(port)], env, tmp / "api.log", lambda: http_up(f"{api_base}/healthz"),
               "spinewatch serve")
    worker = Proc([*SPINEWATCH, "worker", "--concurrency", "2", "--no-beat"], env, tmp / "worker.log",
                  lambda: b"ready." in (tmp / "worker.log").read_bytes(), "spinewatch worker")
    try:
        yield {"env": env, "api": api_base, "issuer": issuer, "redis": redis.Redis.from_url(url, decode_responses=True),
               "fhir": sekmet_server, "tmp": tmp}
    finally:
        sekmet_server.delete_subscriptions()  # before our endpoint goes away (docs/sekmet.md)
        worker.stop()
        api.stop()


def run_subscribe(stack, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPINEWATCH, "subscribe", *args], env=stack["env"] | env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def subscribe(stack, **env: str) -> list[dict]:
    done = run_subscribe(stack, "--json", **env)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def write_chart(fhir: httpx.Client) -> str:
    """A patient with breast cancer, low back pain and new leg weakness (NICE NG234 Box 2), written
    the way an EHR writes it: one resource at a time, ids assigned by the server."""
    pid = fhir.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "E2E"}]}).json()["id"]
    for resource in ch.record("emergency", pid)[1:]:
        body = {k: v for k, v in resource.items() if k != "id"}
        assert fhir.post(f"/{body['resourceType']}", json=body).status_code == 201
    return pid


def wait_for_assessment(stack, pid: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = stack["redis"].hget(f"spinewatch:assessment:Patient/{pid}", "json")
        if raw and json.loads(raw)["urgency"] == "emergency":
            return json.loads(raw)
        time.sleep(0.1)
    log = (stack["tmp"] / "worker.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"no emergency assessment for Patient/{pid} within {timeout} s\n{log}")


def patient_view(stack, pid: str) -> httpx.Response:
    path = f"/cds-services/{PATIENT_VIEW}"
    body = ch.hook_request("patient-view", pid)  # no prefetch, no fhirServer: the stored assessment answers
    return httpx.post(stack["api"] + path, json=body, headers=stack["issuer"].auth(stack["api"] + path), timeout=10)


def test_classic_rest_hook_subscription_leads_to_assessment_and_card(spinewatch):
    reports = subscribe(spinewatch)
    assert [(r["resource_type"], r["mode"], r["criteria"], r["status"], r["asked"], r["action"]) for r in reports] == [
        ("Condition", "classic", "Condition?", "active", "active", "created"),
        ("Observation", "classic", "Observation?", "active", "active", "created")]
    with spinewatch["fhir"].client() as fhir:  # created `active`, kept as given: sekmet wrote it once
        assert {fhir.get(f"/Subscription/{r['id']}").json()["meta"]["versionId"] for r in reports} == {"1"}
    assert [r["action"] for r in subscribe(spinewatch)] == ["exists", "exists"]  # idempotent
    assert run_subscribe(spinewatch, "--check").returncode == 0

    with spinewatch["fhir"].client() as fhir:
        pid = write_chart(fhir)
        assessment = wait_for_assessment(spinewatch, pid)
    assert assessment["red_flags"] == ["limb-weakness"] and assessment["patient"] == f"Patient/{pid}"
    assert assessment["seen"][f"Patient/{pid}"] == "1"

    response = patient_view(spinewatch, pid)
    assert response.status_code == 200, response.text
    cards = ch.validate_cds_response(response.json())
    assert [c["indicator"] for c in cards] == ["critical"]
    assert "24 h" in cards[0]["summary"]


def test_backport_topic_subscription_leads_to_assessment_and_card(spinewatch):
    fhir_server = spinewatch["fhir"]
    fhir_server.delete_subscriptions()
    run = uuid.uuid4().hex[:8]
    fhir_server.add_topic(f"http://spinewatch.test/SubscriptionTopic/condition-{run}", "Condition")
    fhir_server.add_topic(f"http://spinewatch.test/SubscriptionTopic/observation-{run}", "Observation")
    reports = subscribe(spinewatch)
    assert [(r["mode"], r["asked"], r["action"]) for r in reports] == [("backport", "active", "created")] * 2
    assert all(r["criteria"].endswith(run) for r in reports)
    for r in reports:  # the handshake activated each one and was recorded
        key = f"spinewatch:subscription:Subscription/{r['id']}"
        deadline = time.monotonic() + 10
        while not spinewatch["redis"].hget(key, "last_handshake_at") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spinewatch["redis"].hget(key, "last_handshake_at")

    with fhir_server.client() as fhir:
        pid = write_chart(fhir)
        assert wait_for_assessment(spinewatch, pid)["red_flags"] == ["limb-weakness"]
    # sekmet numbered the events; we saw them all, in order or not
    for r in reports:
        highest = spinewatch["redis"].hget(f"spinewatch:subscription:Subscription/{r['id']}", "highest")
        assert int(highest) == (2 if r["resource_type"] == "Condition" else 1)
    response = patient_view(spinewatch, pid)
    assert response.status_code == 200 and [c["indicator"] for c in response.json()["cards"]] == ["critical"]


def test_a_subscription_sekmet_holds_in_error_is_reported_then_re_requested(spinewatch):
    fhir_server = spinewatch["fhir"]
    fhir_server.delete_subscriptions()
    condition, observation = subscribe(spinewatch)
    with fhir_server.client() as fhir:
        broken = fhir.get(f"/Subscription/{condition['id']}").json() | {"status": "error", "error": "test"}
        assert fhir.put(f"/Subscription/{condition['id']}", json=broken).status_code == 200
        assert fhir.get(f"/Subscription/{condition['id']}").json()["status"] == "error"  # sekmet keeps it

        check = run_subscribe(spinewatch, "--check")
        assert check.returncode == 3, check.stdout + check.stderr
        assert "  ! Condition: the server put it in `error`: no notifications will arrive" in check.stdout

        again = subscribe(spinewatch)  # exit 0: the server may activate it within the grace period
        assert [(r["action"], r["asked"], r["problem"]) for r in again] == [
            ("re-requested", "requested", None), ("exists", None, None)]
        # sekmet activates a `requested` one a moment after the write (the read-back may not show it yet)
        deadline = time.monotonic() + 10
        while fhir.get(f"/Subscription/{condition['id']}").json()["status"] != "active":
            assert time.monotonic() < deadline, "sekmet did not activate the re-requested Subscription"
            time.sleep(0.1)
        assert "error" not in fhir.get(f"/Subscription/{condition['id']}").json()
    assert run_subscribe(spinewatch, "--check").returncode == 0
    assert spinewatch["redis"].hget(f"spinewatch:subscription:Subscription/{condition['id']}", "status") == "active"


def test_one_turned_off_is_left_alone_and_reported(spinewatch):
    fhir_server = spinewatch["fhir"]
    fhir_server.delete_subscriptions()
    condition, _ = subscribe(spinewatch)
    with fhir_server.client() as fhir:
        off = fhir.get(f"/Subscription/{condition['id']}").json() | {"status": "off"}
        assert fhir.put(f"/Subscription/{condition['id']}", json=off).status_code == 200
    done = run_subscribe(spinewatch)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "off (left alone)" in done.stdout and "  ! Condition: turned off on the server" in done.stdout


def test_the_signature_secret_is_written_rotated_and_removed(spinewatch):
    fhir_server = spinewatch["fhir"]
    fhir_server.delete_subscriptions()
    secret = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret"
    subscribe(spinewatch)
    # only `subscribe` gets the secret: the running API would refuse sekmet's unsigned notifications
    assert [r["action"] for r in subscribe(spinewatch, SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET="one")] == \
        ["updated", "updated"]
    assert [r["action"] for r in subscribe(spinewatch, SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET="one")] == \
        ["exists", "exists"]
    reports = subscribe(spinewatch, SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET="two")
    assert [r["action"] for r in reports] == ["updated", "updated"]
    with fhir_server.client() as fhir:
        assert fhir.get(f"/Subscription/{reports[0]['id']}").json()["extension"] == [
            {"url": secret, "valueString": "two"}]
        assert [r["action"] for r in subscribe(spinewatch)] == ["updated", "updated"]
        assert "extension" not in fhir.get(f"/Subscription/{reports[0]['id']}").json()
