"""CDS Hooks service: discovery, patient-view for every tier, robustness, CORS, feedback, stored
assessments, audit and metrics. Every response is checked with `validate_cds_response`."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import pytest

from fhir_mappings.clinical.evaluate import assess
from service.api.routes import hooks as hook_routes
from service.core.logging import configure_logging
from tests.support.cds_hooks import (ORDER_IMAGING, ORDER_SELECT, ORDER_SIGN, PATIENT_VIEW, PREFETCH_TYPES,
                                     FakeStoredAssessments, hook_request, make_env, prefetch_for, record, reset_audit,
                                     validate_cds_response, validate_discovery)


@pytest.fixture
def env(tmp_path):
    env = make_env(tmp_path)
    yield env
    reset_audit()


def patient_view(env, tier: str, pid: str = "p1", **extra):
    return env.call(PATIENT_VIEW, hook_request("patient-view", pid, prefetch_for(record(tier, pid)), **extra))


def assert_outcome(response, status: int, text: str | None = None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    if text:
        assert text in body["issue"][0]["diagnostics"]
    return body


# ---------------------------------------------------------------- discovery


def test_discovery_lists_one_service_id_per_hook(env):
    """CDS clients file services by id (the sandbox by `{discovery URL}/{id}`): ids are unique, and
    the old id of both order hooks is answered but no longer listed."""
    response = env.discover()
    assert response.status_code == 200
    body = response.json()
    validate_discovery(body)
    hooks = [(s["id"], s["hook"]) for s in body["services"]]
    assert hooks == [(PATIENT_VIEW, "patient-view"), (ORDER_SELECT, "order-select"), (ORDER_SIGN, "order-sign")]
    assert ORDER_IMAGING not in {s["id"] for s in body["services"]}
    for service in body["services"]:
        assert service["title"] and service["description"]
        templates = service["prefetch"]
        assert templates["patient"] == "Patient/{{context.patientId}}"
        searched = {t.split("?")[0] for k, t in templates.items() if k != "patient"}
        assert {"Condition", "Observation", "DiagnosticReport", "ImagingStudy", "ServiceRequest"} <= searched
        assert set(templates) == set(PREFETCH_TYPES)


# ---------------------------------------------------------------- patient-view, every tier


@pytest.mark.parametrize("tier, indicator, priority, hours", [
    ("emergency", "critical", "stat", 24), ("urgent", "warning", "urgent", 24 * 7), ("routine", "info", "routine", None)])
def test_patient_view_card_per_tier(env, tier, indicator, priority, hours):
    response = patient_view(env, tier)
    assert response.status_code == 200
    [card] = validate_cds_response(response.json())
    assert card["indicator"] == indicator
    [suggestion] = card["suggestions"]
    assert suggestion["isRecommended"] is True and card["selectionBehavior"] == "at-most-one"
    [action] = suggestion["actions"]
    order = action["resource"]
    assert action["type"] == "create" and order["resourceType"] == "ServiceRequest"
    assert order["priority"] == priority and order["intent"] == "proposal"
    assert order["subject"] == {"reference": "Patient/p1"}
    assert {"reference": "Condition/cancer"} in order["reasonReference"]
    if hours:
        start = datetime.fromisoformat(order["occurrencePeriod"]["start"])
        end = datetime.fromisoformat(order["occurrencePeriod"]["end"])
        assert end - start == timedelta(hours=hours)
        assert abs(start - datetime.now(timezone.utc)) < timedelta(minutes=1)  # evaluated at the request time
    else:
        assert "occurrencePeriod" not in order
    assert all(r["display"] for r in card["overrideReasons"])


def test_patient_view_no_card_for_tier_none(env):
    response = patient_view(env, "none")
    assert response.status_code == 200
    assert validate_cds_response(response.json()) == []


def test_patient_view_matches_the_pure_core(env):
    """The service adds no clinical logic: the tier is what assess() says for the same resources."""
    resources = record("urgent")
    expected = assess(resources, datetime.now(timezone.utc)).urgency
    [card] = validate_cds_response(patient_view(env, "urgent").json())
    assert expected == "urgent" and card["summary"].startswith("Suspected spinal metastasis")


def test_card_intent_setting(tmp_path):
    env = make_env(tmp_path, card_intent="order")
    try:
        [card] = validate_cds_response(patient_view(env, "urgent").json())
        assert card["suggestions"][0]["actions"][0]["resource"]["intent"] == "order"
    finally:
        reset_audit()


def test_pending_mri_order_removes_the_suggestion(env):
    resources = record("emergency") + [{
        "resourceType": "ServiceRequest", "id": "mri-ordered", "status": "active", "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "36400-0"}]},
        "subject": {"reference": "Patient/p1"}, "authoredOn": datetime.now(timezone.utc).isoformat()}]
    response = env.call(PATIENT_VIEW, hook_request("patient-view", prefetch=prefetch_for(resources)))
    [card] = validate_cds_response(response.json())
    assert "suggestions" not in card and "selectionBehavior" not in card
    assert "already ordered" in card["detail"] and "must be done by" in card["detail"]
    assert "ServiceRequest/mri-ordered" not in card["detail"]  # ids stay out of the prose


def test_resources_of_another_patient_are_ignored(env):
    """Prefetch must be about the patient in context; another patient's cancer does not count."""
    mine = [r for r in record("none", "p1")]
    theirs = [r for r in record("emergency", "p2") if r["resourceType"] != "Patient"]
    response = env.call(PATIENT_VIEW, hook_request("patient-view", "p1", prefetch_for(mine + theirs)))
    assert validate_cds_response(response.json()) == []


def test_cards_are_audited_counted_and_logged_without_patient_data(env, caplog):
    from prometheus_client import REGISTRY

    labels = {"hook": "patient-view", "indicator": "critical"}
    before = REGISTRY.get_sample_value("spinewatch_cards_served_total", labels) or 0
    body = hook_request("patient-view", prefetch=prefetch_for(record("emergency")),
                        fhirServer="https://fhir.example.org",
                        fhirAuthorization={"access_token": "secret-access-token-123", "token_type": "Bearer",
                                           "expires_in": 300, "scope": "user/*.read", "subject": "spinewatch"})
    response = env.call(PATIENT_VIEW, body)
    [card] = validate_cds_response(response.json())
    assert REGISTRY.get_sample_value("spinewatch_cards_served_total", labels) == before + 1
    [audited] = env.audit_records("card")
    assert audited.actor == env.issuer.iss and audited.patient == "Patient/p1"
    assert audited.detail["hook"] == "patient-view" and audited.detail["hookInstance"] == body["hookInstance"]
    assert audited.detail["cards"] == [card["uuid"]]
    assert audited.detail["suggestions"] == [card["suggestions"][0]["uuid"]]
    assert "secret-access-token-123" not in json.dumps(audited.detail)
    logged = caplog.text
    assert "cds.hook" in logged and body["hookInstance"] in logged
    for secret in ("secret-access-token-123", "leg weakness", "Malignant neoplasm", "Bearer "):
        assert secret not in logged


# ---------------------------------------------------------------- one log line per request

HOOK_ROUTE = "/cds-services/{service_id}"


@pytest.fixture
def request_lines(env):
    """The app's JSON log lines go to a buffer; returns the lines of one response's request."""
    buf = io.StringIO()
    configure_logging(None, stream=buf)

    def lines(response) -> list[dict]:
        request_id = response.headers["X-Request-ID"]
        return [line for line in map(json.loads, buf.getvalue().splitlines()) if line.get("request_id") == request_id]
    yield lines
    configure_logging(None)  # back to stderr at INFO for the tests that follow


def test_a_patient_view_call_writes_one_line_with_the_hook_and_the_request(env, request_lines):
    body = hook_request("patient-view", prefetch=prefetch_for(record("emergency")))
    response = env.call(PATIENT_VIEW, body)
    assert response.status_code == 200
    [line] = request_lines(response)
    assert {k: line.get(k) for k in ("event", "level", "logger", "service", "hook", "hookInstance", "status",
                                     "cards", "tier", "source", "method", "route")} == {
        "event": "cds.hook", "level": "info", "logger": "spinewatch.cds_hooks", "service": PATIENT_VIEW,
        "hook": "patient-view", "hookInstance": body["hookInstance"], "status": 200, "cards": 1,
        "tier": "emergency", "source": "prefetch", "method": "POST", "route": HOOK_ROUTE}
    assert len(line["request_id"]) == 32
    assert 0 <= line["ms"] <= line["duration_ms"]  # the answer's time within the whole request's


@pytest.mark.parametrize("call, status, expected", [
    (lambda env: env.call("no-such-service", hook_request("patient-view")), 404,
     {"event": "cds.hook_refused", "service": "(unknown)", "hook": None, "hookInstance": None}),
    (lambda env: env.call(PATIENT_VIEW, {"hook": "patient-view"}), 400,
     {"event": "cds.hook_refused", "service": PATIENT_VIEW, "hook": None, "hookInstance": None}),
    (lambda env: env.call(PATIENT_VIEW, hook_request("no-such-hook") | {"hookInstance": "free text"}), 400,
     {"event": "cds.hook_refused", "service": PATIENT_VIEW, "hook": "(unknown)", "hookInstance": "(not an id)"}),
    (lambda env: env.client.post(f"/cds-services/{PATIENT_VIEW}", json=hook_request("patient-view")), 401,
     {"event": "cds.auth_failed", "level": "warning", "reason": "no-bearer", "path": HOOK_ROUTE}),
])
def test_a_refused_call_writes_one_line_with_the_real_status(env, request_lines, call, status, expected):
    response = call(env)
    assert response.status_code == status
    [line] = request_lines(response)
    assert {k: line.get(k) for k in expected} == expected
    assert (line["status"], line["method"], line["route"]) == (status, "POST", HOOK_ROUTE)
    assert line["duration_ms"] >= 0
    if line["event"] == "cds.hook_refused":
        assert line["level"] == "info" and line["reason"]


def test_feedback_writes_one_line(env, request_lines):
    [card] = validate_cds_response(patient_view(env, "emergency").json())
    response = env.feedback(PATIENT_VIEW, {"feedback": [
        {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:06:00Z"}]})
    assert response.status_code == 200
    [line] = request_lines(response)
    assert {k: line.get(k) for k in ("event", "service", "items", "status", "method", "route")} == {
        "event": "cds.feedback", "service": PATIENT_VIEW, "items": 1, "status": 200, "method": "POST",
        "route": "/cds-services/{service_id}/feedback"}

# ---------------------------------------------------------------- robustness


def test_unknown_fields_and_extension_are_accepted(env):
    body = hook_request("patient-view", prefetch=prefetch_for(record("urgent")),
                        extension={"com.example.timestamp": "2017-11-27T22:13:25Z"}, somethingNew={"x": 1})
    body["context"]["com.example.extra"] = "ignored"
    response = env.call(PATIENT_VIEW, body)
    assert response.status_code == 200
    assert len(validate_cds_response(response.json())) == 1


def test_malformed_json_is_400(env):
    path = f"/cds-services/{PATIENT_VIEW}"
    response = env.client.post(path, content=b'{"hook": "patient-view",', headers=env.headers(path) | {
        "Content-Type": "application/json"})
    assert_outcome(response, 400, "not valid JSON")


@pytest.mark.parametrize("mutate, text", [
    (lambda b: b.pop("context"), "context"),
    (lambda b: b.update(context="p1"), "context"),
    (lambda b: b["context"].pop("patientId"), "context.patientId"),
    (lambda b: b["context"].update(patientId="../../admin"), "context.patientId"),
    (lambda b: b["context"].pop("userId"), "context.userId"),
    (lambda b: b.pop("hookInstance"), "hookInstance"),
    (lambda b: b.update(hook="patient-explode"), "unknown hook"),
    (lambda b: b.update(hook="order-sign"), "does not answer"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer"}), "requires fhirServer"),
    (lambda b: b["prefetch"].update(conditions="Condition?patient=p1"), "prefetch.conditions"),
])
def test_bad_requests_are_400_with_an_operation_outcome(env, mutate, text):
    body = hook_request("patient-view", prefetch=prefetch_for(record("urgent")))
    mutate(body)
    body_out = assert_outcome(env.call(PATIENT_VIEW, body), 400, text)
    assert "Malignant" not in json.dumps(body_out)  # never echoes input


def test_body_must_be_an_object(env):
    assert_outcome(env.call(PATIENT_VIEW, ["not", "an", "object"]), 400)


def test_order_context_needs_draft_orders(env):
    body = hook_request("order-sign", prefetch=prefetch_for(record("urgent")))
    assert_outcome(env.call(ORDER_SIGN, body), 400, "context.draftOrders")
    body = hook_request("order-select", prefetch=prefetch_for(record("urgent")),
                        context={"draftOrders": {"resourceType": "Bundle", "entry": []}})
    assert_outcome(env.call(ORDER_SELECT, body), 400, "context.selections")


def test_unknown_service_is_404(env):
    body = hook_request("patient-view", prefetch=prefetch_for(record("urgent")))
    assert_outcome(env.call("no-such-service", body), 404)
    assert_outcome(env.feedback("no-such-service", {"feedback": []}), 404)


def test_the_hook_route_resolves_no_fastapi_dependencies(env):
    # The hook call is the hot path: it verifies the caller and reads its collaborators by plain
    # calls (docs/capacity.md M5), and still refuses an unauthenticated caller first, as a bare 401.
    route = next(r for r in hook_routes.router.routes if r.path == "/cds-services/{service_id}")
    assert route.dependant.dependencies == []
    body = json.dumps(hook_request("patient-view", prefetch=prefetch_for(record("urgent"))))
    refused = env.client.post("/cds-services/no-such-service", content=body,
                              headers={"Content-Type": "application/json"})
    assert refused.status_code == 401


def test_body_over_the_limit_is_413(tmp_path):
    env = make_env(tmp_path, max_body_bytes=4096)
    try:
        body = hook_request("patient-view", prefetch=prefetch_for(record("urgent", vitals=40)))
        assert len(json.dumps(body)) > 4096
        assert_outcome(env.call(PATIENT_VIEW, body), 413)
        # Without a Content-Length (chunked upload) the limit holds too.
        path = f"/cds-services/{PATIENT_VIEW}"

        def chunks():
            data = json.dumps(body).encode()
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]

        response = env.client.post(path, content=chunks(), headers=env.headers(path) | {
            "Content-Type": "application/json"})
        assert_outcome(response, 413)
        small = hook_request("patient-view", prefetch=prefetch_for(record("urgent")))
        assert env.call(PATIENT_VIEW, small).status_code == 200
    finally:
        reset_audit()


# ---------------------------------------------------------------- CORS


def test_cors_preflight_for_browser_clients(tmp_path):
    env = make_env(tmp_path, cors_origins="https://sandbox.cds-hooks.org")
    try:
        response = env.client.options(f"/cds-services/{PATIENT_VIEW}", headers={
            "Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://sandbox.cds-hooks.org"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in response.headers
        refused = env.client.options("/cds-services", headers={
            "Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in refused.headers
        response = env.client.get("/cds-services", headers=env.headers("/cds-services") | {
            "Origin": "https://sandbox.cds-hooks.org"})
        assert response.headers["access-control-allow-origin"] == "https://sandbox.cds-hooks.org"
        # Only /cds-services is open to browsers.
        other = env.client.get("/healthz", headers={"Origin": "https://sandbox.cds-hooks.org"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        reset_audit()


# ---------------------------------------------------------------- feedback


def test_feedback_accepted_and_overridden_are_recorded(tmp_path, redis_url):
    env = make_env(tmp_path, redis_url=redis_url)  # a declined MRI is queued for the workers
    [card] = validate_cds_response(patient_view(env, "emergency").json())
    suggestion = card["suggestions"][0]["uuid"]
    body = {"feedback": [
        {"card": card["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": suggestion}],
         "outcomeTimestamp": "2026-01-05T10:05:31Z"},
        {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:06:00Z",
         "overrideReason": {"reason": {"code": "patient-declined", "system": card["overrideReasons"][0]["system"]},
                            "userComment": "Patient travelling, will book next week"}},
        {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:07:00+00:00",
         "extension": {"com.example": True}},
    ]}
    response = env.feedback(PATIENT_VIEW, body)
    assert response.status_code == 200 and response.content == b""
    records = env.audit_records("feedback")
    assert [r.outcome for r in records] == ["accepted", "overridden", "overridden"]
    assert records[0].detail["acceptedSuggestions"] == [suggestion] and records[0].actor == env.issuer.iss
    assert records[1].detail["overrideReason"]["code"] == "patient-declined"
    assert "travelling" not in json.dumps([r.detail for r in records])  # free text is never stored


@pytest.mark.parametrize("item, text", [
    ({"outcome": "accepted", "acceptedSuggestions": [{"id": "s"}], "outcomeTimestamp": "2026-01-05T10:05:31Z"}, "card"),
    ({"card": "c", "outcome": "accepted", "outcomeTimestamp": "2026-01-05T10:05:31Z"}, "acceptedSuggestions"),
    ({"card": "c", "outcome": "ignored", "outcomeTimestamp": "2026-01-05T10:05:31Z"}, "outcome"),
    ({"card": "c", "outcome": "overridden"}, "outcomeTimestamp"),
    ({"card": "c", "outcome": "overridden", "outcomeTimestamp": "yesterday"}, "outcomeTimestamp"),
    ({"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:05:31"}, "UTC"),
    ({"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:05:31Z",
      "overrideReason": {"reason": {"system": "x"}}}, "overrideReason.reason.code"),
])
def test_invalid_feedback_is_400(env, item, text):
    assert_outcome(env.feedback(PATIENT_VIEW, {"feedback": [item]}), 400, text)
    assert env.audit_records("feedback") == []


def test_feedback_needs_a_non_empty_array(env):
    assert_outcome(env.feedback(PATIENT_VIEW, {"feedback": []}), 400, "feedback")
    assert_outcome(env.feedback(ORDER_IMAGING, {}), 400, "feedback")


# ---------------------------------------------------------------- stored assessments


def _stored(tier: str, age: timedelta) -> dict:
    now = datetime.now(timezone.utc)
    assessment = assess(record(tier), now - age)
    return assessment.to_json() | {"stored_at": (now - age).isoformat()}


def test_no_prefetch_no_fhir_server_answers_from_a_young_stored_assessment(tmp_path):
    store = FakeStoredAssessments({"Patient/p1": _stored("urgent", timedelta(minutes=5))})
    env = make_env(tmp_path, stored=store, stored_assessment_max_age_seconds=600)
    try:
        response = env.call(PATIENT_VIEW, hook_request("patient-view"))
        assert response.status_code == 200
        [card] = validate_cds_response(response.json())
        assert card["indicator"] == "warning" and card["suggestions"]
        assert store.calls == ["Patient/p1"]
        [audited] = env.audit_records("card")
        assert audited.detail["source"] == "stored"
    finally:
        reset_audit()


def test_stored_assessment_too_old_or_missing_is_412(tmp_path):
    store = FakeStoredAssessments({"Patient/p1": _stored("urgent", timedelta(hours=2))})
    env = make_env(tmp_path, stored=store, stored_assessment_max_age_seconds=600)
    try:
        assert_outcome(env.call(PATIENT_VIEW, hook_request("patient-view")), 412, "stored assessment")
        assert_outcome(env.call(PATIENT_VIEW, hook_request("patient-view", "p9")), 412)
    finally:
        reset_audit()


def test_stored_tier_none_gives_no_card(tmp_path):
    store = FakeStoredAssessments({"Patient/p1": _stored("none", timedelta(minutes=1))})
    env = make_env(tmp_path, stored=store)
    try:
        response = env.call(PATIENT_VIEW, hook_request("patient-view"))
        assert response.status_code == 200 and validate_cds_response(response.json()) == []
    finally:
        reset_audit()


def test_a_failing_store_is_412_not_500(tmp_path):
    class Down:
        def get(self, ref):
            raise ConnectionError("redis down")

    env = make_env(tmp_path)
    env.app.state.services.hooks.stored = Down()
    try:
        assert_outcome(env.call(PATIENT_VIEW, hook_request("patient-view")), 412)
    finally:
        reset_audit()


def test_stored_assessment_is_not_used_when_prefetch_is_partial(tmp_path):
    store = FakeStoredAssessments({"Patient/p1": _stored("urgent", timedelta(minutes=1))})
    env = make_env(tmp_path, stored=store)
    try:
        prefetch = prefetch_for(record("urgent"))
        del prefetch["observations"]
        assert_outcome(env.call(PATIENT_VIEW, hook_request("patient-view", prefetch=prefetch)), 412, "observations")
        assert store.calls == []
    finally:
        reset_audit()
