"""Clinical notes end to end on real parts: a new DocumentReference written to the real
FHIR server sekmet-fhir, whose text says cord compression, reaches an emergency assessment and one
care-team alert without anything else about the patient being written.

    sekmet-fhir (classic rest-hook Subscription `DocumentReference?`, made by `spinewatch subscribe`
    with SPINEWATCH_SUBSCRIPTION_TYPES=Condition,Observation,DocumentReference)
      → `spinewatch serve` (POST/PUT /fhir/notifications) → a real redis-server
      → a real `spinewatch worker` process: reads the record from sekmet (DocumentReference in the
        lookback window, and the Binary the note names) → emergency → stored assessment
      → one alert Communication written back to sekmet

sekmet-fhir 0.1.1 can do all of it, so no stand-in is needed (checked against the running server,
docs/sekmet.md): it stores and validates DocumentReference and Binary, searches DocumentReference
by `patient`, `date` and `_lastUpdated`, serves `GET Binary/{id}` as `application/fhir+json` (a
Binary resource with base64 `data`), and notifies classic `DocumentReference?` Subscriptions on
create and update with the full resource. It has no ClinicalImpression search parameters (the
worker's ClinicalImpression searches come back with every patient's, none here, and are filtered).

The note's text is in the three places an EHR puts it: inline base64, a relative `Binary/<id>`, and
an absolute URL on the server's own base.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import redis

from fhir_mappings.cds.alerts import ALERT_ID_SYSTEM
from tests.support.fault_stack import wait_for as poll
from tests.support.processes import ROOT, SPINEWATCH, Proc, http_up
from tests.support.sekmet_server import SekmetServer, create, free_port

pytestmark = pytest.mark.integration
DB = 9  # a database of the session's redis-server of its own
NOTE = ("ED note. 2/52 thoracic back pain, new BLE weakness 3/5 since yesterday, PVR 900 ml. "
        "Impression: suspected metastatic spinal cord compression.")
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFIED = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


@pytest.fixture(scope="module")
def stack(sekmet_server: SekmetServer, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notes-sekmet")
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    port = free_port()
    api_base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
        "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_REDIS_URL": url,
        "SPINEWATCH_FHIR_BASE_URL": sekmet_server.base_url,
        "SPINEWATCH_SUBSCRIPTION_ENDPOINT": f"{api_base}/fhir/notifications",
        "SPINEWATCH_SUBSCRIPTION_TYPES": "Condition,Observation,DocumentReference",
        "SPINEWATCH_NOTIFICATION_TOKEN": "notes-" + uuid.uuid4().hex, "SPINEWATCH_COALESCE_SECONDS": "0.3",
        "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp}/audit.sqlite",
        "SPINEWATCH_RECONCILIATION_INTERVAL_SECONDS": "0", "SPINEWATCH_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    api = Proc([*SPINEWATCH, "serve", "--port", str(port)], env, tmp / "api.log", lambda: http_up(f"{api_base}/healthz"),
               "spinewatch serve")
    worker = Proc([*SPINEWATCH, "worker", "--concurrency", "2", "--no-beat"], env, tmp / "worker.log",
                  lambda: b"ready." in (tmp / "worker.log").read_bytes(), "spinewatch worker")
    try:
        sekmet_server.delete_subscriptions()
        done = subprocess.run([*SPINEWATCH, "subscribe", "--json"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        yield {"redis": redis.Redis.from_url(url, decode_responses=True), "fhir": sekmet_server, "tmp": tmp,
               "subscriptions": reports}
    finally:
        sekmet_server.delete_subscriptions()  # before our endpoint goes away (docs/sekmet.md)
        worker.stop()
        api.stop()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def chart(fhir: httpx.Client) -> str:
    """A patient with a known cancer and someone to alert, and nothing else: no back pain, no
    neurology, coded or written, anywhere but in the note to come."""
    pid = create(fhir, {"resourceType": "Patient", "name": [{"family": "Notes"}],
                        "identifier": [{"system": "urn:test", "value": uuid.uuid4().hex}]})["id"]
    create(fhir, {"resourceType": "Condition",
                  "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
                  "verificationStatus": {"coding": [{"system": VERIFIED, "code": "confirmed"}]},
                  "code": {"coding": [{"system": "http://snomed.info/sct", "code": "399068003",
                                       "display": "Malignant tumor of prostate"}]},
                  "subject": {"reference": f"Patient/{pid}"},
                  "onsetDateTime": (datetime.now(timezone.utc) - timedelta(days=700)).date().isoformat()})
    create(fhir, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{pid}"},
                  "participant": [{"member": {"reference": "Organization/acute-oncology"}}]})
    return pid


def note(pid: str, attachment: dict) -> dict:
    return {"resourceType": "DocumentReference", "status": "current", "docStatus": "final",
            "type": {"coding": [{"system": "http://loinc.org", "code": "34111-5",
                                 "display": "Emergency department note"}]},
            "category": [{"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/"
                                                "us-core-documentreference-category", "code": "clinical-note"}]}],
            "subject": {"reference": f"Patient/{pid}"},
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "content": [{"attachment": {"contentType": "text/plain; charset=utf-8"} | attachment}]}


def stored(stack, pid: str) -> dict | None:
    """The worker's stored assessment (service/infra/assessments.py) with its revision."""
    key = f"spinewatch:assessment:Patient/{pid}"
    raw, revision = stack["redis"].hmget(key, "json", "revision")
    return json.loads(raw) | {"revision": int(revision or 0)} if raw else None


def wait_for(what: str, check, stack, timeout: float = 30.0):
    """fault_stack.wait_for, with the worker's log in the failure."""
    try:
        return poll(check, timeout, what, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + (stack["tmp"] / "worker.log").read_text(errors="replace")[-3000:]) from None


def communications(fhir: httpx.Client, pid: str) -> list[dict]:
    bundle = fhir.get("/Communication", params={"subject": f"Patient/{pid}", "_count": "100"}).json()
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def test_spinewatch_subscribe_adds_the_document_reference_subscription(stack):
    # The session's sekmet is shared: once another module has published SubscriptionTopics, Condition
    # and Observation are subscribed by topic (backport, 'requested' until the handshake). No topic
    # covers DocumentReference, so it is always the classic rest-hook search.
    reports = {r["resource_type"]: r for r in stack["subscriptions"]}
    assert list(reports) == ["Condition", "Observation", "DocumentReference"]
    assert all(r["status"] in ("active", "requested") for r in reports.values())
    note = reports["DocumentReference"]
    assert (note["mode"], note["criteria"], note["status"]) == ("classic", "DocumentReference?", "active")


@pytest.mark.parametrize("where", ["inline", "relative Binary", "absolute Binary"])
def test_a_new_note_of_cord_compression_raises_an_emergency_and_one_alert(stack, where):
    with stack["fhir"].client() as fhir:
        pid = chart(fhir)
        # The chart alone (the cancer Condition was notified too): not in scope, nothing to alert.
        wait_for("the chart's assessment", lambda: (stored(stack, pid) or {}).get("urgency") == "none", stack)
        if where == "inline":
            attachment = {"data": b64(NOTE)}
        else:
            bid = create(fhir, {"resourceType": "Binary", "contentType": "text/plain; charset=utf-8",
                                "data": b64(NOTE)})["id"]
            attachment = {"url": f"Binary/{bid}" if where == "relative Binary"
                          else f"{stack['fhir'].base_url}/Binary/{bid}"}
        doc = create(fhir, note(pid, attachment))

        assessment = wait_for("the emergency", lambda: (a := stored(stack, pid)) and a["urgency"] == "emergency"
                              and a, stack)
        assert {"limb-weakness", "sphincter-dysfunction"} <= set(assessment["red_flags"])
        assert f"DocumentReference/{doc['id']}" in assessment["seen"]
        assert any(e["reference"] == f"DocumentReference/{doc['id']}" for e in assessment["evidence"]), \
            assessment["evidence"]
        assert not [p for p in assessment["problems"] if "DocumentReference" in p], assessment["problems"]

        sent = wait_for("the alert", lambda: communications(fhir, pid), stack)
        (alert,) = sent
        assert alert["priority"] == "stat" and alert["identifier"][0]["system"] == ALERT_ID_SYSTEM
        assert [r["reference"] for r in alert["recipient"]] == ["Organization/acute-oncology"]
        assert f"DocumentReference/{doc['id']}" in [r["reference"] for r in alert.get("reasonReference", [])]

        # Something else written for the patient (a second notification, a re-evaluation with the
        # same evidence): one alert still.
        revision = stored(stack, pid)["revision"]
        create(fhir, {"resourceType": "Observation", "status": "final",
                              "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4",
                                                   "display": "Heart rate"}]},
                              "subject": {"reference": f"Patient/{pid}"},
                              "effectiveDateTime": datetime.now(timezone.utc).isoformat(),
                              "valueQuantity": {"value": 88, "unit": "/min", "system": "http://unitsofmeasure.org",
                                                "code": "/min"}})
        wait_for("the re-evaluation", lambda: stored(stack, pid)["revision"] > revision, stack)
        assert stored(stack, pid)["urgency"] == "emergency"
        time.sleep(0.5)  # an alert would be written right after the store
        assert len(communications(fhir, pid)) == 1


def test_note_text_never_reaches_the_logs(stack):
    for name in ("api.log", "worker.log"):
        text = (stack["tmp"] / name).read_text(errors="replace")
        for fragment in (NOTE[:30], "BLE weakness", b64(NOTE)[:30]):
            assert fragment not in text, name
