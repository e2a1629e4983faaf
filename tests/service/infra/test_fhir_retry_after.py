"""Retry-After on a FHIR server's 429/503 (RFC 9110 §10.2.3) kept on the FHIRServerError the
workers' client raises (service/infra/fhir/base.py, sync.py), through pickling (Celery)."""

from __future__ import annotations

import pickle
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import respx

from service.core.errors import FHIRNotFound, FHIRServerError
from service.infra.fhir.base import parse_retry_after
from service.infra.fhir.sync import FHIRClient

BASE = "https://fhir.example.org/r4"
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("value, seconds", [
    ("120", 120.0), (" 0 ", 0.0),
    ("Sat, 01 Mar 2025 12:02:00 GMT", 120.0),       # IMF-fixdate
    ("Saturday, 01-Mar-25 12:02:00 GMT", 120.0),    # obsolete RFC 850
    ("Sat Mar  1 12:02:00 2025", 120.0),            # obsolete asctime
    ("Sat, 01 Mar 2025 11:00:00 GMT", 0.0),         # in the past: now
    ("-5", None), ("1.5", None), ("soon", None), ("", None), (None, None),
])
def test_retry_after_is_delta_seconds_or_an_http_date(value, seconds):
    assert parse_retry_after(value, now=NOW.timestamp()) == seconds


@respx.mock
@pytest.mark.parametrize("status", [429, 503])
def test_a_server_asking_to_wait_says_how_long_on_the_error(status):
    respx.get(f"{BASE}/Patient/p1").respond(status, headers={"Retry-After": "120"})
    with FHIRClient(BASE) as fhir, pytest.raises(FHIRServerError) as raised:
        fhir.read("Patient", "p1")
    assert raised.value.retry_after == 120.0 and raised.value.transient
    copy = pickle.loads(pickle.dumps(raised.value))  # what Celery does with a task's exception
    assert type(copy) is FHIRServerError and copy.retry_after == 120.0 and copy.status == status


@respx.mock
def test_an_http_date_retry_after_on_a_search_page():
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=300), usegmt=True)
    respx.get(f"{BASE}/Condition").respond(503, headers={"Retry-After": when})
    with FHIRClient(BASE) as fhir, pytest.raises(FHIRServerError) as raised:
        fhir.search_all("Condition", {"patient": "p1"})
    assert 290 <= raised.value.retry_after <= 300


@respx.mock
def test_no_retry_after_means_none_and_a_permanent_error_keeps_none():
    respx.get(f"{BASE}/Patient/p1").respond(503)
    respx.get(f"{BASE}/Patient/p2").respond(404, headers={"Retry-After": "60"})
    with FHIRClient(BASE) as fhir:
        with pytest.raises(FHIRServerError) as raised:
            fhir.read("Patient", "p1")
        assert raised.value.retry_after is None
        with pytest.raises(FHIRNotFound) as gone:
            fhir.read("Patient", "p2")
        assert gone.value.retry_after is None
