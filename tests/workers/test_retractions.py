"""Retractions through the workers' pipeline: a real redis-server (queue, stored assessments,
alert records) and a stateful respx FHIR server that deletes as Medplum and sekmet do (a read of a
deleted resource answers 410; its history keeps the versions before the delete), or keeps no
history at all.

Shown: the delete of an alert's only Box 2 evidence drops the tier, the audit says why, and the
care team gets one follow-up inResponseTo the alert (and the signed webhook body), however often
the delete is delivered and whatever became of its trigger; the stored-assessment index finds the
patient when the server keeps no history; nothing finding it is audited; entered-in-error is a
retraction like a delete; the same tier on other evidence still tells them, without a second alert."""

from __future__ import annotations

import base64
import copy
import json
from datetime import datetime, timezone

import httpx
import pytest
import respx
from fhir.resources.R4B.auditevent import AuditEvent

from fhir_mappings.cds.alerts import RETRACTION_ID_SYSTEM, SIGNATURE_HEADER, verify_signature
from fhir_mappings.fhir.audit_events import BALP, audit_event
from fhir_mappings.fhir.bundle import patient_key
from service.core.errors import AlertRetry
from service.core.settings import Settings
from service.infra.assessments import AssessmentStore
from service.infra.audit.store import AuditStore
from service.infra.audit.writer import AuditLog
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import QUEUE, WorkQueue
from tests.support import cds_hooks as ch
from tests.workers.test_pipeline import r  # noqa: F401 fixture
from workers import pipeline

BASE = "http://ehr.test/fhir"
HOOK = "https://hooks.example.org/spinewatch"
SECRET = "retraction-test-secret"
PATIENT = "Patient/p1"
CARE_TEAM = {"resourceType": "CareTeam", "id": "team-1", "status": "active", "subject": {"reference": PATIENT},
             "participant": [{"member": {"reference": "Practitioner/oncologist"}},
                             {"member": {"reference": "Organization/acute-oncology"}}]}


class Ehr:
    """A FHIR server in memory, behind respx: versioned writes, deletes (410 after), instance
    history (or none), searches by patient and identifier, conditional create of Communications."""

    def __init__(self, resources: list[dict], *, keeps_history: bool = True):
        self.current: dict[str, dict | None] = {}
        self.versions: dict[str, list[dict]] = {}
        self.keeps_history = keeps_history
        self.clock = 0
        self.fail_next_create = 0
        for resource in resources:
            self.put(resource)
        respx.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+$").mock(side_effect=self._search)
        respx.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+/[^/]+$").mock(side_effect=self._read)
        respx.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+/[^/]+/_history$").mock(side_effect=self._history)
        respx.post(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+$").mock(side_effect=self._create)

    def put(self, resource: dict) -> dict:
        ref = f"{resource['resourceType']}/{resource['id']}"
        self.clock += 1
        stored = copy.deepcopy(resource)
        stored["meta"] = {"versionId": str(len(self.versions.get(ref, [])) + 1),
                          "lastUpdated": f"2026-03-01T12:00:{self.clock:02d}.000Z"}
        self.versions.setdefault(ref, []).append(stored)
        self.current[ref] = stored
        return stored

    def delete(self, ref: str) -> None:
        self.current[ref] = None

    def communications(self) -> list[dict]:
        return [r for ref, r in self.current.items() if r and ref.startswith("Communication/")]

    def _search(self, request: httpx.Request) -> httpx.Response:
        rtype = request.url.path.rsplit("/", 1)[1]
        params = request.url.params
        found = [r for ref, r in self.current.items() if r and ref.startswith(rtype + "/")]
        who = params.get("patient") or params.get("subject")
        if who:
            who = who if who.startswith("Patient/") else f"Patient/{who}"
            found = [r for r in found if patient_key(r) == who]
        if "identifier" in params:
            system, _, value = params["identifier"].partition("|")
            found = [r for r in found if {"system": system, "value": value} in r.get("identifier", [])]
        return httpx.Response(200, json=ch.searchset(found))

    def _read(self, request: httpx.Request) -> httpx.Response:
        ref = "/".join(request.url.path.rsplit("/", 2)[1:])
        if ref not in self.current:
            return httpx.Response(404)
        if self.current[ref] is None:
            return httpx.Response(410, json={"resourceType": "OperationOutcome",
                                             "issue": [{"severity": "error", "code": "deleted"}]})
        return httpx.Response(200, json=self.current[ref])

    def _history(self, request: httpx.Request) -> httpx.Response:
        ref = "/".join(request.url.path.rsplit("/", 3)[1:3])
        if not self.keeps_history or ref not in self.versions:
            return httpx.Response(404)
        entries = [{"request": {"method": "DELETE", "url": ref}}] if self.current[ref] is None else []
        entries += [{"resource": v, "request": {"method": "PUT", "url": ref}} for v in reversed(self.versions[ref])]
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "history", "entry": entries})

    def _create(self, request: httpx.Request) -> httpx.Response:
        if self.fail_next_create:
            self.fail_next_create -= 1
            return httpx.Response(503)
        resource = json.loads(request.content)
        condition = request.headers.get("if-none-exist")
        if condition:
            system, _, value = condition.split("=", 1)[1].partition("|")
            for existing in self.communications():
                if {"system": system, "value": value} in existing.get("identifier", []):
                    return httpx.Response(200, json=existing)
        resource["id"] = f"c{len(self.communications()) + 1}"
        return httpx.Response(201, json=self.put(resource))


@pytest.fixture
def audit_store(tmp_path):
    store = AuditStore(f"sqlite:///{tmp_path}/audit.sqlite")
    yield store
    store.dispose()


@pytest.fixture
def make_deps(redis_url, r, audit_store):
    made = []

    def make(**settings_kw):
        settings = Settings(environment="test", redis_url=redis_url, fhir_base_url=BASE, coalesce_seconds=0,
                            **settings_kw)
        fhir = FHIRClient(BASE)
        made.append(fhir)
        return pipeline.Collaborators(settings, fhir, WorkQueue(settings, r), AssessmentStore(r),
                                      AuditLog(settings, store=audit_store), r)

    yield make
    for fhir in made:
        fhir.close()


def queued(r) -> list[dict]:
    """The kwargs of the evaluations on the queue, oldest first; the queue emptied."""
    out = [json.loads(base64.b64decode(json.loads(raw)["body"]))[1] for raw in reversed(r.lrange(QUEUE, 0, -1))]
    r.delete(QUEUE)
    return out


def evaluate_queued(d, r) -> list:
    """What a worker does with the queued evaluations (their trigger and focus as sent)."""
    return [pipeline.evaluate_patient(d, k["patient"], k["focus"], k["trigger"], datetime.now(timezone.utc))
            for k in queued(r)]


def audits(store: AuditStore, kind: str) -> list:
    return store.query(kinds=[kind], newest_first=False)[0]


def delete_notification(ref: str) -> dict:
    return {"kind": "rest-hook", "subscription": "Subscription/s1", "interaction": "delete", "deleted": [ref]}


def emergency_record() -> list[dict]:
    return ch.record("emergency", "p1") + [CARE_TEAM]


@respx.mock
def test_deleting_the_only_box2_evidence_drops_the_tier_audits_why_and_tells_the_care_team_once(
        make_deps, r, audit_store):
    hook = respx.post(HOOK).respond(204)
    d = make_deps(alert_webhook_url=HOOK, alert_webhook_secret=SECRET)
    ehr = Ehr(emergency_record())
    now = datetime.now(timezone.utc)
    assert pipeline.evaluate_patient(d, PATIENT, [], {"kind": "test"}, now).urgency == "emergency"
    (alert,) = ehr.communications()

    ehr.delete("Observation/neuro")
    assert pipeline.resolve_focus(d, ["Observation/neuro"], delete_notification("Observation/neuro")) == [PATIENT]
    (after,) = evaluate_queued(d, r)

    assert after.urgency == "routine"  # cancer and low back pain remain; no red flag
    assert d.store.get(PATIENT)["urgency"] == "routine"
    evaluation = audits(audit_store, "evaluation")[-1]
    assert evaluation.detail["retracted"] == [{"reference": "Observation/neuro", "reason": "deleted on the server"}]
    assert evaluation.detail["previous_tier"] == "emergency" and evaluation.detail["tier"] == "routine"
    assert evaluation.detail["trigger"]["deleted"] == ["Observation/neuro"]

    follow_up = next(c for c in ehr.communications() if c["id"] != alert["id"])
    assert follow_up["inResponseTo"] == [{"reference": f"Communication/{alert['id']}"}]
    assert follow_up["identifier"][0]["system"] == RETRACTION_ID_SYSTEM
    assert follow_up["priority"] == "routine"
    assert follow_up["recipient"] == alert["recipient"]
    assert "since deleted on the server (Observation/neuro)" in follow_up["payload"][0]["contentString"]
    (retraction,) = audits(audit_store, "alert-retraction")
    assert retraction.outcome == "success" and retraction.patient == PATIENT
    assert retraction.detail["in_response_to"] == [f"Communication/{alert['id']}"]
    exported = AuditEvent.model_validate(audit_event(retraction.to_json())).model_dump(mode="json")
    assert exported["meta"]["profile"] == [BALP + "PatientCreate"]  # a Communication written, like the alert
    assert {"reference": f"Communication/{follow_up['id']}"} in [e["what"] for e in exported["entity"]]

    # The webhook: the alert, then the follow-up, each signed.
    alert_post, follow_post = [c.request for c in hook.calls]
    assert json.loads(alert_post.content)["type"] == "spinewatch.alert"
    body = json.loads(follow_post.content)
    assert body["type"] == "spinewatch.alert.retraction" and body["communication"] == f"Communication/{follow_up['id']}"
    assert verify_signature(follow_post.content, SECRET, follow_post.headers[SIGNATURE_HEADER])

    # The same delete delivered again: nothing more to tell.
    assert pipeline.resolve_focus(d, ["Observation/neuro"], delete_notification("Observation/neuro")) == [PATIENT]
    evaluate_queued(d, r)
    assert len(ehr.communications()) == 2 and len(hook.calls) == 2
    assert len(audits(audit_store, "alert-retraction")) == 1
    assert "retracted" not in audits(audit_store, "evaluation")[-1].detail


@respx.mock
def test_a_delete_whose_trigger_was_coalesced_away_is_still_found(make_deps, r, audit_store):
    d = make_deps()
    ehr = Ehr(emergency_record())
    pipeline.evaluate_patient(d, PATIENT, [], {"kind": "test"}, datetime.now(timezone.utc))
    ehr.delete("Observation/neuro")
    # Another event's evaluation, without the delete's trigger or focus (coalescing keeps neither).
    pipeline.evaluate_patient(d, PATIENT, [], {"kind": "rest-hook"}, datetime.now(timezone.utc))
    assert audits(audit_store, "evaluation")[-1].detail["retracted"] == [
        {"reference": "Observation/neuro", "reason": "deleted on the server"}]
    assert len(ehr.communications()) == 2


@respx.mock
def test_a_follow_up_that_failed_is_sent_on_the_retry_after_the_assessment_was_stored(make_deps, r, audit_store):
    d = make_deps()
    ehr = Ehr(emergency_record())
    pipeline.evaluate_patient(d, PATIENT, [], {"kind": "test"}, datetime.now(timezone.utc))
    ehr.delete("Observation/neuro")
    ehr.fail_next_create = 1
    with pytest.raises(AlertRetry):
        pipeline.evaluate_patient(d, PATIENT, ["Observation/neuro"], {"kind": "test"}, datetime.now(timezone.utc))
    assert d.store.get(PATIENT)["urgency"] == "routine"  # stored before the follow-up was tried
    pipeline.evaluate_patient(d, PATIENT, ["Observation/neuro"], {"kind": "test"}, datetime.now(timezone.utc))
    assert len(ehr.communications()) == 2
    assert [a.outcome for a in audits(audit_store, "alert-retraction")] == ["failure", "success"]


@respx.mock
def test_without_history_the_stored_assessment_index_finds_the_patient(make_deps, r, audit_store):
    d = make_deps()
    ehr = Ehr(ch.record("urgent", "p1") + [CARE_TEAM], keeps_history=False)
    pipeline.evaluate_patient(d, PATIENT, [], {"kind": "test"}, datetime.now(timezone.utc))
    assert d.store.patient_citing("Condition/back-pain") == PATIENT
    assert r.ttl("spinewatch:assessment-cites:Condition/back-pain") > 89 * 86400

    ehr.delete("Condition/back-pain")
    assert pipeline.resolve_focus(d, ["Condition/back-pain"], delete_notification("Condition/back-pain")) == [PATIENT]
    (after,) = evaluate_queued(d, r)
    assert after.urgency == "none"  # no back pain, no Box 2 finding: not in scope
    assert audits(audit_store, "evaluation")[-1].detail["previous_tier"] == "urgent"
    follow_up = next(c for c in ehr.communications() if "inResponseTo" in c)
    assert "Current assessment: none" in follow_up["payload"][0]["contentString"]


@respx.mock
def test_a_delete_nothing_can_attribute_is_audited_not_dead_lettered(make_deps, r, audit_store):
    d = make_deps()
    ehr = Ehr([{"resourceType": "Condition", "id": "stray", "subject": {"reference": "Patient/p9"},
                "code": {"text": "x"}}], keeps_history=False)
    ehr.delete("Condition/stray")
    assert pipeline.resolve_focus(d, ["Condition/stray"], delete_notification("Condition/stray")) == []
    (record,) = audits(audit_store, "retraction-unresolved")
    assert record.outcome == "failure" and record.patient is None
    assert record.detail == {"focus": "Condition/stray", "trigger": delete_notification("Condition/stray")}
    assert queued(r) == [] and audits(audit_store, "dead-letter") == []


@respx.mock
def test_entered_in_error_is_a_retraction_like_a_delete(make_deps, r, audit_store):
    d = make_deps()
    ehr = Ehr(emergency_record())
    pipeline.evaluate_patient(d, PATIENT, [], {"kind": "test"}, datetime.now(timezone.utc))
    ehr.put(ehr.current["Observation/neuro"] | {"status": "entered-in-error"})
    after = pipeline.evaluate_patient(d, PATIENT, ["Observation/neuro"], {"kind": "rest-hook", "interaction": "update"},
                                      datetime.now(timezone.utc))
    assert after.urgency == "routine"
    assert audits(audit_store, "evaluation")[-1].detail["retracted"] == [
        {"reference": "Observation/neuro", "reason": "entered-in-error"}]
    follow_up = next(c for c in ehr.communications() if "inResponseTo" in c)
    assert "since marked entered-in-error (Observation/neuro)" in follow_up["payload"][0]["contentString"]
    assert len(ehr.communications()) == 2


@respx.mock
def test_the_same_tier_on_other_evidence_still_tells_them_and_raises_no_second_alert(make_deps, r, audit_store):
    d = make_deps()
    retention = ch._condition("p1", "retention", ch.ICD10CM, "R33.9", "Retention of urine, unspecified", 2)
    ehr = Ehr(emergency_record() + [retention])
    pipeline.evaluate_patient(d, PATIENT, [], {"kind": "test"}, datetime.now(timezone.utc))
    (alert,) = ehr.communications()
    ehr.delete("Observation/neuro")
    after = pipeline.evaluate_patient(d, PATIENT, ["Observation/neuro"], {"kind": "test"}, datetime.now(timezone.utc))
    assert after.urgency == "emergency" and after.red_flags == ["sphincter-dysfunction"]
    follow_up = next(c for c in ehr.communications() if c["id"] != alert["id"])
    assert follow_up["priority"] == "stat" and "Red flags now: sphincter-dysfunction." in \
        follow_up["payload"][0]["contentString"]
    assert len(ehr.communications()) == 2  # the follow-up said it all: no second emergency alert
    (retraction,) = audits(audit_store, "alert-retraction")
    assert retraction.detail["stands_in_for"]
    pipeline.evaluate_patient(d, PATIENT, [], {"kind": "test"}, datetime.now(timezone.utc))  # a later event
    assert len(ehr.communications()) == 2
    assert [a.detail["tier"] for a in audits(audit_store, "alert")] == ["emergency"]

    # The remaining evidence deleted too: the follow-up answers the alert and the first follow-up.
    ehr.delete("Condition/retention")
    pipeline.evaluate_patient(d, PATIENT, ["Condition/retention"], {"kind": "test"}, datetime.now(timezone.utc))
    last = ehr.communications()[-1]
    assert [x["reference"] for x in last["inResponseTo"]] == [f"Communication/{alert['id']}",
                                                              f"Communication/{follow_up['id']}"]
    assert last["priority"] == "routine" and len(ehr.communications()) == 3
