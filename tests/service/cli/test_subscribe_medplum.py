"""`spinewatch subscribe` against the Medplum stand-in (tests/support/medplum.py), which notifies only
`active` Subscriptions and never activates a `requested` one: the Subscriptions it creates end up
active and their notifications, signed with Medplum's subscription-secret extension, reach a real
`spinewatch serve` and are queued. A `requested` one left by an older SpineWatch is activated."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import uuid

import pytest
import redis

from service.infra.fhir.subscriptions import TAG_SYSTEM
from tests.support.medplum import MedplumStandIn
from tests.support.processes import ROOT, SPINEWATCH, Proc, http_up
from tests.support.sekmet_server import free_port

pytestmark = pytest.mark.integration
DB = 9  # a database of the session's redis-server of its own


@pytest.fixture
def stack(redis_server, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    store = redis.Redis.from_url(url, decode_responses=True)
    store.flushdb()
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    with MedplumStandIn(time_scale=1e-3) as medplum:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
            "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": url, "SPINEWATCH_FHIR_BASE_URL": medplum.base_url,
            "SPINEWATCH_SUBSCRIPTION_ENDPOINT": f"{api}/fhir/notifications",
            "SPINEWATCH_NOTIFICATION_TOKEN": "medplum-" + uuid.uuid4().hex,
            "SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET": "sign-" + uuid.uuid4().hex,
            "SPINEWATCH_PUBLIC_BASE_URL": api, "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp_path}/audit.sqlite",
            "SPINEWATCH_RECONCILIATION_INTERVAL_SECONDS": "0", "PYTHONUNBUFFERED": "1"}
        serve = Proc([*SPINEWATCH, "serve", "--port", str(port)], env, tmp_path / "api.log",
                     lambda: http_up(f"{api}/healthz"), "spinewatch serve")
        try:
            yield {"env": env, "medplum": medplum, "redis": store, "log": tmp_path / "api.log"}
        finally:
            serve.stop()
            store.close()


def subscribe(stack, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPINEWATCH, "subscribe", *args], env=stack["env"] | env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def reports(done: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def queued_patients(store) -> list[str]:
    import base64

    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["patient"]
            for raw in store.lrange("celery", 0, -1) if json.loads(raw)["headers"]["task"] == "spinewatch.evaluate_patient"]


def write_condition(medplum: MedplumStandIn) -> str:
    (patient,) = medplum.preload({"resourceType": "Patient", "name": [{"family": "Medplum"}]})
    medplum.write({"resourceType": "Condition", "subject": {"reference": f"Patient/{patient['id']}"},
                   "code": {"text": "low back pain"}})
    medplum.wait_for_deliveries()
    return f"Patient/{patient['id']}"


def test_subscribe_creates_active_subscriptions_that_deliver_signed_notifications(stack):
    medplum = stack["medplum"]
    done = subscribe(stack, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [(r["resource_type"], r["mode"], r["status"], r["asked"], r["action"]) for r in reports(done)] == [
        ("Condition", "classic", "active", "active", "created"), ("Observation", "classic", "active", "active", "created")]
    assert subscribe(stack, "--check").returncode == 0

    patient = write_condition(medplum)
    (delivery,) = medplum.deliveries  # one Subscription matches a Condition
    assert delivery.status == 200, stack["log"].read_text(errors="replace")[-2000:]
    secret = stack["env"]["SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET"].encode()
    assert delivery.headers["x-signature"] == hmac.new(secret, delivery.body, hashlib.sha256).hexdigest()
    assert queued_patients(stack["redis"]) == [patient]


def test_a_requested_subscription_from_an_older_spinewatch_is_activated(stack):
    medplum = stack["medplum"]
    done = subscribe(stack, "--json")
    condition = reports(done)[0]["id"]
    stale = medplum.read("Subscription", condition) | {"status": "requested"}  # as SpineWatch created them before
    medplum.write(stale)

    write_condition(medplum)
    assert medplum.deliveries == []  # Medplum never activates it: silent
    check = subscribe(stack, "--check", SPINEWATCH_SUBSCRIPTION_ACTIVATION_GRACE_SECONDS="0")
    assert check.returncode == 3 and "Condition: the server has left it `requested`" in check.stdout

    fixed = subscribe(stack, "--json", SPINEWATCH_SUBSCRIPTION_ACTIVATION_GRACE_SECONDS="0")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr[-2000:]
    assert [(r["action"], r["status"]) for r in reports(fixed)] == [("activated", "active"), ("exists", "active")]
    sub = medplum.read("Subscription", condition)
    assert sub["status"] == "active" and {"system": TAG_SYSTEM, "code": "condition"} in sub["meta"]["tag"]

    patient = write_condition(medplum)
    assert [d.status for d in medplum.deliveries] == [200]
    assert patient in queued_patients(stack["redis"])
