"""The task layer honours an error's `retry_after` (workers/tasks.py SpineWatchTask.run_step): a FHIR
server's Retry-After (429/503) and an alert's, one mechanism."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
import respx

from service.core.errors import AlertRetry
from service.core.settings import Settings
from service.infra.fhir.sync import FHIRClient
from workers.alerts import fhir_call
from workers.tasks import SpineWatchTask

BASE = "https://fhir.example.org/r4"


class Retried(Exception):
    pass


def run(step, retries: int = 0, **overrides):
    """SpineWatchTask.run_step on a stand-in task: the countdown it asks Celery for."""
    settings = Settings(environment="test", fhir_base_url=BASE, **overrides)
    asked = {}

    def retry(exc, countdown, max_retries):
        asked.update(exc=exc, countdown=countdown, max_retries=max_retries)
        return Retried()

    task = SimpleNamespace(app=SimpleNamespace(collaborators=lambda: SimpleNamespace(settings=settings)),
                           request=SimpleNamespace(retries=retries), retry=retry)
    with pytest.raises(Retried):
        SpineWatchTask.run_step(task, step)
    return asked


def read_patient(_c):
    with FHIRClient(BASE) as fhir:
        fhir.read("Patient", "p1")


@respx.mock
@pytest.mark.parametrize("status", [429, 503])
def test_a_fhir_retry_after_is_waited_for_on_every_retry(status):
    respx.get(f"{BASE}/Patient/p1").respond(status, headers={"Retry-After": "120"})
    for retries in range(5):  # the backoff alone: 1-2, 2-4, 4-8, 8-16, 16-32 s; dead-lettered in a minute
        assert run(read_patient, retries)["countdown"] >= 120


@respx.mock
def test_a_retry_after_longer_than_the_cap_retries_at_the_cap_and_never_past_the_visibility_timeout():
    respx.get(f"{BASE}/Patient/p1").respond(503, headers={"Retry-After": "86400"})
    assert run(read_patient, fhir_retry_after_max_seconds=450)["countdown"] == 450
    # longer than the visibility timeout less the task time limit: a held retry would be redelivered
    assert run(read_patient, fhir_retry_after_max_seconds=3600, broker_visibility_timeout_seconds=900,
               task_time_limit_seconds=300)["countdown"] == 600


@respx.mock
def test_without_retry_after_the_backoff_decides():
    respx.get(f"{BASE}/Patient/p1").respond(503)
    assert 1.0 <= run(read_patient, 0)["countdown"] <= 2.0


@respx.mock
def test_an_alerts_fhir_failure_keeps_the_servers_retry_after():
    respx.get(f"{BASE}/Patient/p1").respond(429, headers={"Retry-After": "90"})

    def alert_step(_c):
        with FHIRClient(BASE) as fhir:
            fhir_call(fhir.read, "Patient", "p1")

    asked = run(alert_step)
    assert isinstance(asked["exc"], AlertRetry) and asked["countdown"] >= 90


@respx.mock
def test_a_webhooks_retry_after_is_kept_on_the_alert_retry():
    from workers.alerts import _post_webhook

    respx.post("https://hooks.example.org/a").mock(return_value=httpx.Response(503, headers={"Retry-After": "75"}))
    s = Settings(environment="test", alert_webhook_url="https://hooks.example.org/a", alert_webhook_secret="s3cret")
    alert = SimpleNamespace(patient="Patient/p1", tier="emergency", evidence=("x",))
    from unittest.mock import patch
    with patch("workers.alerts.webhook_body", return_value=b"{}"), patch("workers.alerts.alert_id", return_value="a1"), \
            pytest.raises(AlertRetry) as raised:
        _post_webhook(s, alert, "Communication/c1", [], None, httpx.Client())
    assert raised.value.retry_after == 75.0
