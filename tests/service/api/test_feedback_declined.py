"""CDS Hooks feedback that the patient declined the MRI: queued for the workers (a real Redis, the
real Celery producer), who close the patient's MRI clock episode (tests/workers/test_mri_clock.py).
Queued before anything is audited, so a refusing queue loses nothing: a 503 the EHR can resend."""

from __future__ import annotations

import base64
import json

import redis

from service.infra.queue.keys import QUEUE, TASK_MRI_DECLINED
from tests.support.cds_hooks import PATIENT_VIEW, make_env, reset_audit, validate_cds_response
from tests.support.redis_server import free_port

CARD = "0b6f5e3c-2f0a-4c1e-9a57-3c2d7f1e8a90"
OVERRIDE_SYSTEM = "https://spinewatch.example.org/fhir/CodeSystem/override-reason"


def overridden(code: str, system: str | None = OVERRIDE_SYSTEM, card: str = CARD) -> dict:
    return {"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:06:00Z",
            "overrideReason": {"reason": {"code": code} | ({"system": system} if system else {}),
                               "userComment": "lives abroad"}}


def queued_tasks(url: str) -> list[tuple[str, list]]:
    """(task name, args) of each message on Celery's queue, oldest first (kombu's Redis transport)."""
    r = redis.Redis.from_url(url)
    try:
        out = []
        for raw in reversed(r.lrange(QUEUE, 0, -1)):
            message = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            out.append((message["headers"]["task"], args))
        return out
    finally:
        r.close()


def test_a_declined_mri_is_queued_for_the_clock_and_other_reasons_are_not(tmp_path, redis_url):
    env = make_env(tmp_path, redis_url=redis_url)
    try:
        response = env.feedback(PATIENT_VIEW, {"feedback": [
            overridden("patient-declined"), overridden("patient-declined", system=None, card="c2"),
            overridden("already-imaged"), overridden("patient-declined", system="http://other.example/cs")]})
        assert response.status_code == 200
        assert queued_tasks(redis_url) == [(TASK_MRI_DECLINED, [CARD, "2026-01-05T10:06:00+00:00"]),
                                           (TASK_MRI_DECLINED, ["c2", "2026-01-05T10:06:00+00:00"])]
        assert len(env.audit_records("feedback")) == 4
    finally:
        reset_audit()


def test_a_real_card_declined_is_queued_with_its_uuid(tmp_path, redis_url):
    from tests.service.api.test_cds_hooks import patient_view

    env = make_env(tmp_path, redis_url=redis_url)
    try:
        [card] = validate_cds_response(patient_view(env, "emergency").json())
        declined = next(r for r in card["overrideReasons"] if r["code"] == "patient-declined")
        body = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:06:00Z",
                              "overrideReason": {"reason": declined}}]}
        assert env.feedback(PATIENT_VIEW, body).status_code == 200
        assert queued_tasks(redis_url) == [(TASK_MRI_DECLINED, [card["uuid"], "2026-01-05T10:06:00+00:00"])]
    finally:
        reset_audit()


def test_a_queue_that_refuses_is_503_and_nothing_is_half_recorded(tmp_path):
    env = make_env(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        response = env.feedback(PATIENT_VIEW, {"feedback": [overridden("already-imaged"), overridden("patient-declined")]})
        assert response.status_code == 503
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "transient"
        assert "lives abroad" not in response.text
        assert env.audit_records("feedback") == []  # the resend records both, once
    finally:
        reset_audit()
