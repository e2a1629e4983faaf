"""Delete notifications through the real app and a real redis-server, in each server's shape, with
the exact work they queue (read back from the Celery list):

- Medplum: POST /fhir/notifications, body `{}` (or empty), X-Medplum-Interaction: delete,
  X-Medplum-Deleted-Resource: Type/id; the same headers on PUT|POST /fhir/notifications/{type}/{id};
- HAPI FHIR: DELETE /fhir/notifications/{type}/{id};
- backport IG: a history Bundle whose focus entry is a DELETE request.

Every one is answered 2xx: a non-2xx answer is retried (Medplum: for about 73 hours)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from tests.service.api.test_notifications import (AUTH, app, audits, client, post, queued, r,  # noqa: F401 fixtures
                                                  settings)

SUB_ID = "8cb7d041-5805-4ed0-9e3a-d81f7d906ada"
SUBSCRIPTION = f"Subscription/{SUB_ID}"
TRACE = "14b9cebc-7a0f-48a6-869f-cfe2fee9858d"


def medplum(interaction: str, deleted: str | None = None, trace: str = TRACE) -> dict[str, str]:
    """The headers Medplum 4.5.2 sends (channel.header Authorization included)."""
    headers = AUTH | {"Content-Type": "application/fhir+json", "X-Medplum-Subscription": SUB_ID,
                      "X-Medplum-Interaction": interaction, "x-trace-id": trace}
    return headers | ({"X-Medplum-Deleted-Resource": deleted} if deleted is not None else {})


def only_task(r) -> tuple[str, dict]:
    """The one queued task: its name and kwargs, received_at checked (a recent instant) and left out."""
    (task,) = queued(r)
    received = datetime.fromisoformat(task["kwargs"]["trigger"].pop("received_at"))
    assert abs(datetime.now(timezone.utc) - received) < timedelta(seconds=30)
    return task["task"], task["kwargs"]


def deleted_trigger(subscription: str | None = SUBSCRIPTION, event=None, focus="Condition/c1") -> dict:
    return {"kind": "rest-hook", "subscription": subscription, "event": event, "interaction": "delete",
            "deleted": [focus]}


RESOLVE_DELETED = ("spinewatch.resolve_focus", {"focus": ["Condition/c1"], "trigger": deleted_trigger()})


# ---------------- Medplum ----------------

@pytest.mark.parametrize("body", [b"{}", b""])
def test_medplum_delete_on_the_bare_endpoint_is_queued_for_resolution(client, r, body):
    response = client.post("/fhir/notifications", content=body, headers=medplum("delete", "Condition/c1"))
    assert response.status_code == 200, response.text
    assert response.json()["issue"][0]["diagnostics"] == "1 event(s) queued"
    assert only_task(r) == RESOLVE_DELETED


def test_medplum_retrying_a_delete_is_a_duplicate_and_another_delete_is_not(client, r):
    headers = medplum("delete", "Condition/c1")
    assert client.post("/fhir/notifications", content=b"{}", headers=headers).status_code == 200
    retry = client.post("/fhir/notifications", content=b"{}", headers=headers)  # same x-trace-id: a retry
    assert retry.status_code == 200 and retry.json()["issue"][0]["diagnostics"].startswith("duplicate")
    assert len(queued(r)) == 1
    # re-created and deleted again: another write, another trace id
    again = client.post("/fhir/notifications", content=b"{}", headers=medplum("delete", "Condition/c1", trace="t-2"))
    assert again.json()["issue"][0]["diagnostics"] == "1 event(s) queued"
    assert [t["kwargs"]["focus"] for t in queued(r)] == [["Condition/c1"], ["Condition/c1"]]


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_medplum_delete_headers_on_the_resource_path(client, r, method):
    response = client.request(method, "/fhir/notifications/Condition/c1", content=b"{}",
                              headers=medplum("delete", "Condition/c1"))
    assert response.status_code == 200, response.text
    assert only_task(r) == RESOLVE_DELETED


def test_a_delete_carrying_the_last_version_evaluates_its_patient(client, r):
    last = {"resourceType": "Condition", "id": "c1", "meta": {"versionId": "7"}, "subject": {"reference": "Patient/p1"}}
    response = client.post("/fhir/notifications", content=json.dumps(last), headers=medplum("delete", "Condition/c1"))
    assert response.status_code == 200, response.text
    assert only_task(r) == ("spinewatch.evaluate_patient",
                            {"patient": "Patient/p1", "focus": ["Condition/c1"], "trigger": deleted_trigger()})


def test_the_delete_of_a_version_already_queued_as_an_update_is_not_a_duplicate(client, r):
    last = {"resourceType": "Condition", "id": "c1", "meta": {"versionId": "7"}, "subject": {"reference": "Patient/p1"}}
    assert client.post("/fhir/notifications", json=last, headers=medplum("update")).status_code == 200
    r.delete("spinewatch:pending:Patient/p1")  # the evaluation started, so the delete queues its own
    response = client.post("/fhir/notifications", json=last, headers=medplum("delete", "Condition/c1"))
    assert response.json()["issue"][0]["diagnostics"] == "1 event(s) queued"
    assert [t["kwargs"]["trigger"].get("interaction") for t in queued(r)] == [None, "delete"]


def test_an_empty_object_without_delete_headers_is_a_ping_answered_200(client, r, audits):
    response = client.post("/fhir/notifications", content=b"{}", headers=AUTH)
    assert response.status_code == 200, response.text
    assert [t["task"] for t in queued(r)] == ["spinewatch.reconcile"]
    assert queued(r)[0]["kwargs"] == {"reason": "rest-hook ping"}
    assert audits[-1]["detail"]["warnings"] == ["an empty JSON object without a delete header: read as a ping"]


@pytest.mark.parametrize("value", ["Condition", "Condition/c 1", "http://ehr/fhir/Condition/c1", ""])
def test_a_malformed_deleted_resource_header_is_400_naming_the_header_not_its_value(client, r, value):
    response = client.post("/fhir/notifications", content=b"{}", headers=medplum("delete", value))
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"] == (
        "not a notification we can read: the X-Medplum-Deleted-Resource header must be a reference Type/id")
    assert queued(r) == [] and r.keys("spinewatch:dedup:*") == []


def test_a_deleted_resource_header_that_contradicts_the_path_is_400(client, r):
    response = client.put("/fhir/notifications/Condition/c1", content=b"{}", headers=medplum("delete", "Condition/c2"))
    assert response.status_code == 400 and "X-Medplum-Deleted-Resource header differs from the path" in response.text
    assert queued(r) == []


def test_the_delete_audit_record_names_ids_only(client, audits):
    client.post("/fhir/notifications", content=b"{}", headers=medplum("delete", "Condition/c1"))
    (record,) = [a for a in audits if a["kind"] == "notification"]
    assert record["actor"] == SUBSCRIPTION and record["patient"] is None
    assert record["detail"] == {"kind": "rest-hook", "events": [], "focus": ["Condition/c1"], "outcome": "queued",
                                "interaction": "delete", "deleted": ["Condition/c1"], "trace": TRACE}


# ---------------- HAPI FHIR: DELETE {endpoint}/{type}/{id} ----------------

def test_hapi_http_delete_is_queued_for_resolution(client, r):
    response = client.delete("/fhir/notifications/Condition/c1", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert only_task(r) == ("spinewatch.resolve_focus",
                            {"focus": ["Condition/c1"], "trigger": deleted_trigger(subscription=None)})


def test_http_delete_needs_the_secret_and_a_fhir_path(client, r):
    assert client.delete("/fhir/notifications/Condition/c1").status_code == 401
    response = client.delete("/fhir/notifications/condition/c1", headers=AUTH)
    assert response.status_code == 400 and "the path must be" in response.text
    assert queued(r) == []


# ---------------- backport IG: a DELETE entry for the focus ----------------

def backport_delete(number: int, patient: str | None) -> dict:
    parts = [{"name": "event-number", "valueString": str(number)},
             {"name": "focus", "valueReference": {"reference": "http://ehr/fhir/Condition/c1"}}]
    if patient:
        parts.append({"name": "additional-context", "valueReference": {"reference": f"http://ehr/fhir/{patient}"}})
    status = {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": "http://ehr/fhir/Subscription/s1"}},
        {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": "event-notification"},
        {"name": "events-since-subscription-start", "valueString": str(number)},
        {"name": "notification-event", "part": parts}]}
    return {"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": status, "request": {"method": "GET", "url": "Subscription/s1/$status"},
         "response": {"status": "200"}},
        {"request": {"method": "DELETE", "url": "Condition/c1"}, "response": {"status": "204"}}]}


def test_backport_delete_naming_the_patient_schedules_its_evaluation(client, r):
    assert post(client, backport_delete(1, "Patient/p1")).status_code == 200
    trigger = deleted_trigger(subscription="Subscription/s1", event=1) | {"kind": "event-notification"}
    assert only_task(r) == ("spinewatch.evaluate_patient",
                            {"patient": "Patient/p1", "focus": ["Condition/c1"], "trigger": trigger})
    assert post(client, backport_delete(1, "Patient/p1")).json()["issue"][0]["diagnostics"].startswith("duplicate")


def test_backport_delete_without_the_patient_is_resolved(client, r):
    assert post(client, backport_delete(2, None)).status_code == 200
    trigger = deleted_trigger(subscription="Subscription/s1", event=2) | {"kind": "event-notification"}
    assert only_task(r) == ("spinewatch.resolve_focus", {"focus": ["Condition/c1"], "trigger": trigger})
