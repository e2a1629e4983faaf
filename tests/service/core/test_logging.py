"""JSON logs with request and task ids, and the guard that keeps patient data and tokens out of them."""

import io
import json
import logging
import re
import sys

import pytest
import structlog

from service.core.logging import (REDACTED, PatientDataGuard, SensitiveLogData, configure_logging, holds_token,
                                  is_sensitive_key)
from workers.celery_app import connect_celery_signals

JWT = "eyJhbGciOiJSUzM4NCJ9.eyJpc3MiOiJodHRwczovL2VociJ9.c2lnbmF0dXJlLWJ5dGVz"
PATIENT = {"resourceType": "Patient", "id": "123", "name": [{"family": "Smith", "given": ["Ann"]}],
           "birthDate": "1950-01-02"}


@pytest.fixture
def logs():
    """configure_logging into a buffer; returns a function giving the JSON lines written so far."""
    buf = io.StringIO()
    configure_logging(None, stream=buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_spinewatch_handler", False)]:
        root.removeHandler(h)
    structlog.reset_defaults()


def guard(**event):
    return PatientDataGuard()(None, "info", {"event": "e", **event})


# ---------------- the guard ----------------

@pytest.mark.parametrize("key", ["name", "family", "birthDate", "birth_date", "address", "telecom",
                                 "identifier", "valueString", "note", "text", "body", "prefetch",
                                 "access_token", "fhirAuthorization", "X-Api-Key", "client_secret", "jwt"])
def test_keys_naming_patient_data_or_secrets_are_redacted(key):
    out = guard(**{key: "something"})
    assert out[key] == REDACTED
    assert out["redacted"] == [key]


@pytest.mark.parametrize("key", ["patient", "patient_id", "resource_type", "tier", "hook", "status",
                                 "task", "duration_ms", "subscription", "kind", "outcome"])
def test_ids_and_operational_keys_pass(key):
    assert not is_sensitive_key(key)
    assert guard(**{key: "Patient/123"})[key] == "Patient/123"


def test_nested_values_and_fhir_resources_are_redacted_wherever_they_are():
    out = guard(patient="Patient/123", detail={"ok": 1, "birthDate": "1950"}, items=[PATIENT], res=PATIENT)
    assert out["patient"] == "Patient/123"
    assert out["detail"] == {"ok": 1, "birthDate": REDACTED}
    assert out["items"] == [f"{REDACTED} Patient"]
    assert out["res"] == f"{REDACTED} Patient"
    assert out["redacted"] == ["detail.birthDate", "items[0]", "res"]
    assert "Smith" not in json.dumps(out)


def test_tokens_are_scrubbed_from_any_string_even_the_message():
    out = PatientDataGuard()(None, "info", {"event": f"rejected Bearer {JWT}", "why": f"bad jwt {JWT}"})
    assert JWT not in json.dumps(out)
    assert out["event"] == f"rejected {REDACTED}"
    assert set(out["redacted"]) == {"event", "why"}


def test_a_jwt_and_a_bearer_token_in_one_value_are_both_redacted():
    out = guard(why=f"got {JWT} and then BeArEr abc.def-123~ too")
    assert out["why"] == f"got {REDACTED} and then {REDACTED} too"
    assert out["redacted"] == ["why"]


def test_a_jwt_running_into_a_bearer_token_leaves_nothing_of_either():
    # The bearer token is replaced first, then what is left of the JWT: "xyz" must not survive.
    assert guard(why="eyJab.cd.bearer xyz")["why"] == REDACTED + REDACTED


def test_tokens_and_secret_keys_are_found_in_any_value_type():
    out = guard(count=3, flags=["ok", f"Bearer {JWT}"], detail={"why": JWT, "n": 1}, password=42, api_key=None)
    assert out["count"] == 3 and out["flags"] == ["ok", REDACTED] and out["detail"] == {"why": REDACTED, "n": 1}
    assert out["password"] == REDACTED and out["api_key"] == REDACTED
    assert out["redacted"] == ["api_key", "detail.why", "flags[1]", "password"]


@pytest.mark.parametrize("text, holds", [
    (JWT, True), (f"x{JWT}y", True), ("Bearer abc", True), ("BEARER\tabc", True), ("bEaReR\u00a0abc", True),
    ("token: bearer abc", True), ("xbearer abc", False), ("Bearer", False), ("eyJab.c", False),
    ("Patient/123", False), ("d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", False), ("", False)])
def test_holds_token(text, holds):
    assert holds_token(text) is holds


def test_the_substring_test_before_the_bearer_search_misses_nothing():
    """holds_token looks for "bearer" in the lower-cased text before the case-insensitive search:
    sound only while no character but the ASCII ones matches b, e, a or r under re.IGNORECASE."""
    letters = re.compile("(?i)[aber]")
    assert sorted(c for c in map(chr, range(sys.maxunicode + 1)) if letters.fullmatch(c)) == list("ABERaber")


def test_clean_events_are_left_alone():
    event = {"event": "evaluation.done", "patient": "Patient/1", "tier": "urgent", "flags": ["nocturnal-pain"]}
    assert PatientDataGuard()(None, "info", dict(event)) == event
    assert PatientDataGuard()(None, "info", event) is event  # nothing found: not copied


def test_strict_guard_refuses():
    with pytest.raises(SensitiveLogData, match="birthDate"):
        PatientDataGuard(strict=True)(None, "info", {"event": "e", "birthDate": "1950"})


# ---------------- the rendered log line ----------------

def test_log_line_is_json_and_carries_no_patient_identifiers_beyond_ids(logs):
    log = structlog.get_logger("spinewatch.test")
    log.info("evaluation.done", patient="Patient/123", resource=PATIENT, name="Ann Smith",
             authorization=f"Bearer {JWT}", tier="urgent")
    (line,) = logs()
    assert line["event"] == "evaluation.done" and line["level"] == "info"
    assert line["logger"] == "spinewatch.test" and line["timestamp"].endswith("Z")
    assert line["patient"] == "Patient/123" and line["tier"] == "urgent"
    text = json.dumps(line)
    for secret in ("Ann", "Smith", "1950-01-02", JWT):
        assert secret not in text


def test_standard_library_records_pass_the_same_guard(logs):
    logging.getLogger("uvicorn.error").warning("token %s", JWT)
    (line,) = logs()
    assert line["logger"] == "uvicorn.error" and JWT not in line["event"]


def test_exception_tracebacks_are_scrubbed(logs):
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        structlog.get_logger().exception("failed")
    (line,) = logs()
    assert "ValueError" in line["exception"] and JWT not in line["exception"]


def test_request_and_task_ids_from_context(logs):
    structlog.contextvars.bind_contextvars(request_id="req-1")
    structlog.get_logger().info("one")
    structlog.contextvars.clear_contextvars()

    from celery import signals

    connect_celery_signals()

    class Task:
        name = "workers.tasks.evaluate_patient"
    signals.task_prerun.send(sender=Task, task_id="task-9", task=Task(), args=(), kwargs={})
    structlog.get_logger().info("two")
    signals.task_postrun.send(sender=Task, task_id="task-9", task=Task(), args=(), kwargs={}, retval=None, state="SUCCESS")
    structlog.get_logger().info("three")
    one, two, three = logs()
    assert one["request_id"] == "req-1"
    assert (two["task_id"], two["task"]) == ("task-9", "workers.tasks.evaluate_patient")
    assert "task_id" not in three


def test_configure_twice_keeps_one_handler(logs):
    configure_logging(None, stream=io.StringIO())
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_spinewatch_handler", False)]
    assert len(ours) == 1
