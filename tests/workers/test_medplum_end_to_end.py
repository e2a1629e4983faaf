"""The whole path against a Medplum 4.5.2-style server (tests/support/medplum.py), nothing fixed by
hand: SMART Backend Services with the scopes enforced as an access policy, `spinewatch subscribe`
on a server that notifies only `active` Subscriptions, a real `spinewatch serve` taking Medplum's
POSTs to the bare endpoint (signed, the Subscription named only in a header), a real `spinewatch
worker` reading the record and writing the alert back, then a delete (`{}` + X-Medplum-Deleted-
Resource) answered 2xx, the patient re-evaluated and the care team told the alert's record is gone.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service.infra.assessments import AssessmentStore
from service.infra.audit.store import AuditStore
from tests.support import cds_hooks as ch
from tests.support.fault_stack import wait_for
from tests.support.medplum import MedplumStandIn
from tests.support.processes import ROOT, SPINEWATCH, Proc, http_up
from tests.support.sekmet_server import free_port

pytestmark = pytest.mark.integration
DB = 11  # a database of the session's redis-server of its own
PATIENT = "Patient/p1"


@pytest.fixture
def stack(redis_server, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    store = redis.Redis.from_url(url, decode_responses=True)
    store.flushdb()
    key = rsa.generate_private_key(65537, 2048)
    key_path = tmp_path / "spinewatch.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "k1", "alg": "RS384"}
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    with MedplumStandIn(auth_required=True, time_scale=1e-3) as medplum:
        medplum.register_client("spinewatch", jwks={"keys": [public]})
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
            "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": url, "SPINEWATCH_FHIR_BASE_URL": medplum.base_url,
            "SPINEWATCH_FHIR_AUTH": "smart-backend", "SPINEWATCH_SMART_CLIENT_ID": "spinewatch",
            "SPINEWATCH_SMART_PRIVATE_KEY_PATH": str(key_path), "SPINEWATCH_SMART_KEY_ID": "k1",
            "SPINEWATCH_SUBSCRIPTION_ENDPOINT": f"{api}/fhir/notifications",
            "SPINEWATCH_NOTIFICATION_TOKEN": "medplum-" + uuid.uuid4().hex,
            "SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET": "sign-" + uuid.uuid4().hex,
            "SPINEWATCH_PUBLIC_BASE_URL": api, "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp_path}/audit.sqlite",
            "SPINEWATCH_COALESCE_SECONDS": "0.2", "SPINEWATCH_RECONCILIATION_INTERVAL_SECONDS": "0",
            "SPINEWATCH_TASK_MAX_RETRIES": "2", "SPINEWATCH_TASK_RETRY_BACKOFF_SECONDS": "0.2",
            "SPINEWATCH_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        serve = Proc([*SPINEWATCH, "serve", "--port", str(port)], env, tmp_path / "api.log",
                     lambda: http_up(f"{api}/healthz"), "spinewatch serve")
        worker_log = tmp_path / "worker.log"
        worker = Proc([*SPINEWATCH, "worker", "--concurrency", "1", "--no-beat", "--loglevel", "INFO"], env,
                      worker_log, lambda: b"ready." in worker_log.read_bytes(), "spinewatch worker")
        try:
            yield {"env": env, "medplum": medplum, "redis": store, "audit": AuditStore(env["SPINEWATCH_AUDIT_DB_URL"])}
        finally:
            worker.stop()
            serve.stop()
            store.close()


def communications(medplum: MedplumStandIn) -> list[dict]:
    return [c for c in medplum.search("Communication") if c.get("subject", {}).get("reference") == PATIENT]


def test_medplum_subscribe_alert_delete_and_follow_up_with_enforced_scopes(stack):
    medplum = stack["medplum"]
    done = subprocess.run([*SPINEWATCH, "subscribe"], env=stack["env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert sorted(s["status"] for s in medplum.search("Subscription")) == ["active", "active"]

    record = ch.record("emergency", "p1")
    neuro = next(r for r in record if r["id"] == "neuro")  # the Box 2 evidence: new bilateral leg weakness
    medplum.preload(*[r for r in record if r is not neuro],
                    {"resourceType": "CareTeam", "status": "active", "subject": {"reference": PATIENT},
                     "participant": [{"member": {"reference": "Practitioner/oncologist"}}]})
    medplum.write(neuro)  # the clinician writes the red flag: Medplum notifies
    (alert,) = wait_for(lambda: communications(medplum), 40, "the emergency alert written back")
    assert alert["priority"] == "stat" and alert["recipient"] == [{"reference": "Practitioner/oncologist"}]
    assert AssessmentStore(stack["redis"]).get(PATIENT)["urgency"] == "emergency"

    medplum.delete("Observation", "neuro")  # entered on the wrong chart, deleted
    found = wait_for(lambda: (lambda cs: cs if len(cs) == 2 else None)(communications(medplum)), 40,
                     "the follow-up Communication")
    (follow_up,) = [c for c in found if c["id"] != alert["id"]]
    assert follow_up["inResponseTo"] == [{"reference": f"Communication/{alert['id']}"}]
    assert AssessmentStore(stack["redis"]).get(PATIENT)["urgency"] != "emergency"

    medplum.wait_for_deliveries()
    # Every delivery (the create and the delete, signed, the Subscription named only in a header)
    # answered 2xx on its first attempt: nothing for Medplum to retry for hours.
    assert medplum.deliveries and all(d.status == 200 for d in medplum.deliveries), \
        [(d.headers.get("x-medplum-interaction"), d.status) for d in medplum.deliveries]
    assert {d.headers.get("x-medplum-interaction") for d in medplum.deliveries} == {"create", "delete"}
    assert stack["redis"].llen("spinewatch:dead-letters") == 0
    retractions = stack["audit"].query(kinds=["alert-retraction"], newest_first=False)[0]
    assert [r.outcome for r in retractions] == ["success"]
    notifications = stack["audit"].query(kinds=["notification"], newest_first=False)[0]
    subscriptions = {s["id"] for s in medplum.search("Subscription")}
    assert len(notifications) == 2 and {n.actor for n in notifications} <= {f"Subscription/{s}" for s in subscriptions}
