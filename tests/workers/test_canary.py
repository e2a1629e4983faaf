"""Canaries: recognisable patient strings and secrets go in, and must not come out where they do not
belong. Real processes (tests/support/fault_stack.py): `spinewatch serve`, `spinewatch
worker`, a real redis-server and a FHIR server on a socket.

Seeded: a patient's name, address, phone, birth date and free text (Observation.valueString, notes,
Condition.note), the notification secret, the reviewer token, a CDS client's JWT and the
fhirAuthorization access token, and an OperationOutcome from the FHIR server that echoes patient text.
Driven through: notifications (full-resource rest-hook payloads, malformed ones, wrong secrets),
the worker's evaluation and alert, a dead letter, patient-view with prefetch and with fhirServer,
refused hook calls, feedback with a free-text comment, the audit API.

Looked for, afterwards, in: every process's log, every error body, every Celery message on the Redis
queue (decoded: the body is base64 JSON) and every other key in Redis, the dead letters, the audit
database file, and the Communication the worker wrote to the EHR (which carries references and a
summary, never quoted text: docs/alerts.md).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import pytest

from tests.support import cds_hooks as ch
from tests.support.fault_stack import FhirStub, Stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "Zephyrine Quuxbottom"
FAMILY = "Quuxbottom"
STREET = "17 Canaryfeather Lane"
PHONE = "+44 7700 981234"
BIRTH = "1944-02-29"
NOTE = "canarynote weakness in both legs since Tuesday, told her neighbour Wilbrecht"
NOTIFY_SECRET = "canary-notify-secret-7f3a9c"
REVIEWER = "canary-reviewer-token-51be0d"
ACCESS_TOKEN = "canary-fhir-access-token-c0ffee"
COMMENT = "canarycomment the patient refused, lives with Wilbrecht"
ECHO = "canaryecho: invalid birthDate for Zephyrine"

PATIENT_STRINGS = [NAME, FAMILY, STREET, PHONE, BIRTH, "Wilbrecht", "canarynote", "canarycomment", "canaryecho"]
SECRETS = [NOTIFY_SECRET, REVIEWER, ACCESS_TOKEN]


def canary_record(pid: str) -> list[dict]:
    """An emergency record (ch.record) dressed with patient data everywhere it can be."""
    resources = []
    for r in ch.record("emergency", pid):
        r = dict(r) if r["resourceType"] == "Patient" else dict(r, id=f"{r['id']}-{pid}")
        if r["resourceType"] == "Patient":
            r.update(name=[{"text": NAME, "family": FAMILY, "given": ["Zephyrine"]}],
                     address=[{"line": [STREET], "city": "Canarytown"}],
                     telecom=[{"system": "phone", "value": PHONE}], birthDate=BIRTH)
        elif r["resourceType"] == "Observation":
            r["valueString"] = r["valueString"] + " " + NOTE
            r["note"] = [{"text": NOTE}]
        else:
            r["note"] = [{"text": NOTE}]
        resources.append(r)
    return resources


@pytest.fixture(scope="module")
def issuer():
    return ch.Issuer("https://ehr.canary.example.org")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, issuer):
    run_dir = tmp_path_factory.mktemp("canary")
    jwks = run_dir / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks))
    fhir = FhirStub()
    env = {"SPINEWATCH_NOTIFICATION_TOKEN": NOTIFY_SECRET, "SPINEWATCH_REVIEWER_TOKEN": REVIEWER,
           "SPINEWATCH_CDS_TRUSTED_ISSUERS": json.dumps({issuer.iss: str(jwks)}),
           "SPINEWATCH_HOOK_TIMEOUT_SECONDS": "5",  # the worker shares the FHIR stub; no flaky 412
           "SPINEWATCH_LOG_LEVEL": "DEBUG"}  # the most there is to leak
    with Stack(run_dir, env=env, fhir=fhir, worker=False) as s:
        yield s


def _celery_messages(stack: Stack) -> list[str]:
    """Every message on the queue and in the unacknowledged hash, raw and with its body decoded."""
    r = stack.redis_client()
    raw = r.lrange("celery", 0, -1) + list(r.hgetall("unacked").values())
    out = []
    for message in raw:
        out.append(message)
        try:
            envelope = json.loads(message)
            if isinstance(envelope, list):  # unacked: [message, exchange, routing key]
                envelope = envelope[0]
            out.append(base64.b64decode(envelope["body"]).decode("utf-8", "replace"))
            out.append(json.dumps(envelope.get("headers")))
        except (ValueError, KeyError, TypeError):
            pass
    return out


def _redis_everything(stack: Stack) -> str:
    r = stack.redis_client()
    dump = []
    for key in r.scan_iter("*"):
        if key.startswith("spinewatch:assessment:"):
            continue  # the stored assessment quotes the evidence for the card, by design (docs/resilience.md)
        kind = r.type(key)
        value = {"string": r.get, "list": lambda k: r.lrange(k, 0, -1), "hash": r.hgetall, "set": r.smembers,
                 "zset": lambda k: r.zrange(k, 0, -1)}.get(kind, lambda k: None)(key)
        dump.append(f"{key} {value}")
    return "\n".join(dump)


def _leaks(where: str, text: str, secrets: list[str], patient_strings: list[str] = PATIENT_STRINGS) -> list[str]:
    return [f"{s!r} in {where}" for s in patient_strings + secrets if s in text]


def test_no_patient_data_or_secret_leaks_into_logs_errors_queue_or_audit(stack, issuer):
    fhir = stack.fhir
    pid = "p-canary-" + uuid.uuid4().hex[:6]
    fhir.load(canary_record(pid))
    doomed = "p-canary-dl-" + uuid.uuid4().hex[:6]  # its FHIR reads fail with an echoing outcome
    fhir.load(canary_record(doomed))
    fhir.always_fail[f"Patient/{doomed}"] = 400
    fhir.fail_body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                                     "diagnostics": ECHO, "details": {"text": NOTE}}]}
    bodies: list[str] = []  # every error body the service answered
    notify = {"Authorization": f"Bearer {NOTIFY_SECRET}", "Content-Type": "application/fhir+json"}
    api = stack.api_url

    # 1. notifications: full-resource payloads (accepted), malformed ones, wrong secrets
    for rtype, rid in [("Observation", f"neuro-{pid}"), ("Condition", f"back-pain-{pid}"),
                       ("Observation", f"neuro-{doomed}")]:
        resource = fhir.resources[(rtype, rid)]
        response = stack.http.put(f"{api}/fhir/notifications/{rtype}/{rid}", content=json.dumps(resource),
                                  headers=notify)
        assert response.status_code == 200, response.text
    patient = fhir.resources[("Patient", pid)]
    for content, headers in [
        ('{"resourceType": "Patient", "name": "' + NAME + '", broken', notify),  # not JSON
        (json.dumps(patient), notify | {"Authorization": f"Bearer {NOTIFY_SECRET}x"}),  # wrong secret
        (json.dumps(dict(patient, resourceType="Zephyrine" + FAMILY)), notify),  # type contradicts the path
        (json.dumps({"resourceType": "Bundle", "type": "history", "entry": [{"resource": patient}]}), notify),
    ]:
        response = stack.http.put(f"{api}/fhir/notifications/Patient/{pid}", content=content, headers=headers)
        assert response.status_code in (400, 401), response.text
        bodies.append(response.text)

    # 2. the Celery messages while they wait on the queue (no worker yet)
    messages = _celery_messages(stack)
    assert messages, "nothing was queued"

    # 3. the worker evaluates (reading the canary-laden record), alerts, and dead-letters the doomed one
    stack.start_worker()
    wait_for(lambda: stack.stored(pid), 30, "the canary patient's assessment")
    wait_for(lambda: fhir.communications(pid), 15, "the canary patient's alert")
    wait_for(lambda: [d for d in stack.dead_letters() if d["kwargs"].get("patient") == f"Patient/{doomed}"], 30,
             "the doomed patient's dead letter")

    # 4. CDS Hooks: prefetch full of patient data, fhirServer with an access token, refusals, feedback
    path = f"/cds-services/{ch.PATIENT_VIEW}"
    prefetch = ch.prefetch_for(canary_record(pid))
    ok = stack.http.post(api + path, json=ch.hook_request("patient-view", pid, prefetch=prefetch),
                         headers=issuer.auth(api + path))
    assert ok.status_code == 200, ok.text
    token_call = ch.hook_request("patient-view", pid, fhirServer=fhir.base,
                                 fhirAuthorization={"access_token": ACCESS_TOKEN, "token_type": "Bearer",
                                                    "expires_in": 300, "scope": "patient/*.read", "subject": "sw"})
    with_token = stack.http.post(api + path, json=token_call, headers=issuer.auth(api + path))
    assert with_token.status_code == 200, with_token.text
    assert any(h.get("Authorization") == f"Bearer {ACCESS_TOKEN}" for h in fhir.headers), "token not used"
    jwt_token = issuer.token(api + path)
    refused = [
        (ch.hook_request("patient-view", pid, prefetch={"patient": NAME}), issuer.auth(api + path)),
        (ch.hook_request("patient-view", pid, context={"patientId": NAME}), issuer.auth(api + path)),
        (ch.hook_request("patient-view", pid, fhirAuthorization={"access_token": ACCESS_TOKEN,
                                                                 "token_type": "Bearer"}), issuer.auth(api + path)),
        (ch.hook_request("patient-view", pid, fhirServer=f"https://{FAMILY.lower()}.evil.example.com/fhir",
                         fhirAuthorization={"access_token": ACCESS_TOKEN, "token_type": "Bearer"}),
         issuer.auth(api + path)),
        (ch.hook_request(NAME, pid), issuer.auth(api + path)),
        (ch.hook_request("patient-view", pid, prefetch=prefetch), {"Authorization": f"Bearer {jwt_token}x"}),
        (ch.hook_request("patient-view", pid, prefetch=prefetch), {"Authorization": f"Bearer {ACCESS_TOKEN}"}),
    ]
    free_text_instance = ch.hook_request("patient-view", pid, prefetch={"patient": None})
    free_text_instance["hookInstance"] = NAME
    refused.append((free_text_instance | {"hook": "order-sign"}, issuer.auth(api + path)))
    for body, headers in refused:
        response = stack.http.post(api + path, json=body, headers=headers)
        assert 400 <= response.status_code < 500, response.text
        bodies.append(response.text)
    response = stack.http.post(api + path, content=b'{"hook": "patient-view", "note": "' + NOTE.encode() + b'"',
                               headers=issuer.auth(api + path) | {"Content-Type": "application/json"})
    bodies.append(response.text)
    for unknown in (f"/cds-services/{NAME}", f"/cds-services/{NAME}/feedback"):
        response = stack.http.post(api + unknown, json={}, headers=issuer.auth(api + unknown))
        assert response.status_code == 404, response.text
        bodies.append(response.text)
    card = ok.json()["cards"][0]["uuid"]
    feedback = {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z",
                              "overrideReason": {"reason": {"code": "other", "system": "urn:x"},
                                                 "userComment": COMMENT}}]}
    fb = stack.http.post(api + path + "/feedback", json=feedback, headers=issuer.auth(api + path + "/feedback"))
    assert fb.status_code == 200

    # 5. the audit API (reviewers see records, which must hold no patient text) and a bad reviewer token
    events = stack.http.get(f"{api}/audit/events?limit=500", headers={"Authorization": f"Bearer {REVIEWER}"})
    assert events.status_code == 200 and events.json()["total"] > 0
    bodies.append(stack.http.get(f"{api}/audit/events", headers={"Authorization": f"Bearer {REVIEWER}x"}).text)

    time.sleep(1.0)  # the API's audit writer thread and the worker's last log lines
    stack.stop_worker()

    leaks = []
    leaks += _leaks("the logs", stack.logs(), SECRETS + [jwt_token, jwt_token.split(".")[2]])
    for i, body in enumerate(bodies):
        leaks += _leaks(f"error body #{i}", body, SECRETS + [jwt_token])
    leaks += _leaks("the Celery messages", "\n".join(messages), SECRETS)
    leaks += _leaks("Redis (outside the stored assessments)", _redis_everything(stack), SECRETS)
    assessment_keys = [k for k in stack.redis_client().scan_iter("spinewatch:assessment:*")]
    leaks += _leaks("the stored assessments", "\n".join(str(stack.redis_client().hgetall(k)) for k in assessment_keys),
                    SECRETS, [NAME, FAMILY, STREET, PHONE, BIRTH])  # quoted evidence yes; identity and secrets no
    leaks += _leaks("the dead letters", json.dumps(stack.dead_letters()), SECRETS)
    leaks += _leaks("the audit API's answer", events.text, SECRETS)
    db = Path(stack.env["SPINEWATCH_AUDIT_DB_URL"].removeprefix("sqlite:///"))
    leaks += _leaks("the audit database", b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
                    .decode("utf-8", "replace"), SECRETS)
    leaks += _leaks("the alert Communication", json.dumps(fhir.communications(pid)), SECRETS)
    if leaks:
        lines = [line for line in stack.logs().splitlines() if any(c in line for c in PATIENT_STRINGS + SECRETS)]
        print("\n".join(lines[:20]))
    assert not leaks, "leaked:\n" + "\n".join(leaks)
    # and the run did what it should: the canaries went through every path above
    assert stack.stored(pid)["urgency"] == "emergency"
    assert {r.kind for r in stack.audit_records()} >= {"notification", "evaluation", "alert", "dead-letter", "card",
                                                        "feedback", "auth-failure", "audit-access"}
