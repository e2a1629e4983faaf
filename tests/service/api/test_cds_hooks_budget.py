"""A hook call's evaluation has a time budget (SPINEWATCH_HOOK_EVALUATION_TIMEOUT_SECONDS): a slow
`assess` answers 412 with an OperationOutcome naming the budget, never a hang (CDS Hooks 2.0)."""

from __future__ import annotations

import threading
import time

import pytest

from fhir_mappings.clinical.terminology import load_terminology
from service.usecases import hook
from tests.support.cds_hooks import PATIENT_VIEW, hook_request, make_env, prefetch_for, record, reset_audit


@pytest.fixture
def env(tmp_path):
    env = make_env(tmp_path, hook_evaluation_timeout_seconds=0.3)
    yield env
    reset_audit()


def test_a_slow_evaluation_is_answered_412_within_the_budget(env, monkeypatch):
    real = hook.assess
    released = threading.Event()

    def slow_assess(*args, **kwargs):
        released.wait(5)  # CPU-bound in real life; here it just takes far longer than the budget
        return real(*args, **kwargs)

    monkeypatch.setattr(hook, "assess", slow_assess)
    # A record above the inline size runs in a worker thread under the budget (a small one is
    # milliseconds and runs inline): every record counts as large here.
    monkeypatch.setattr(hook, "INLINE_EVALUATION_MAX_RESOURCES", 0)
    load_terminology()  # the one-off vocabulary compilation (the app's lifespan) is not timed
    started = time.monotonic()
    try:
        response = env.call(PATIENT_VIEW, hook_request("patient-view", "p1", prefetch_for(record("emergency"))))
    finally:
        released.set()
    took = time.monotonic() - started
    assert response.status_code == 412, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "time budget of 0.3 s" in body["issue"][0]["diagnostics"]
    assert "SPINEWATCH_HOOK_EVALUATION_TIMEOUT_SECONDS" in body["issue"][0]["diagnostics"]
    assert took < 2.5, took


def test_an_evaluation_within_the_budget_answers_its_card(env):
    response = env.call(PATIENT_VIEW, hook_request("patient-view", "p1", prefetch_for(record("emergency"))))
    assert response.status_code == 200, response.text
    assert response.json()["cards"][0]["indicator"] == "critical"


def test_the_budget_defaults_to_one_second():
    from service.core.settings import Settings

    assert Settings(environment="test").hook_evaluation_timeout_seconds == 1.0


def test_no_cdn_docs_pages_and_the_openapi_document_is_served(env):
    # /docs and /redoc load Swagger UI / ReDoc from a CDN: blank without internet, so they are off.
    assert env.client.get("/docs").status_code == 404
    assert env.client.get("/redoc").status_code == 404
    response = env.client.get("/openapi.json")
    assert response.status_code == 200 and response.json()["info"]["title"] == "SpineWatch"
