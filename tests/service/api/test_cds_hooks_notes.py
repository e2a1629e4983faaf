"""Clinical notes in the CDS Hooks path (US Core Clinical Notes): discovery asks for the most recent
DocumentReferences (a template may hold no computed date: CDS Hooks 2.0 "Prefetch query
restrictions" allow `_sort` for "most recent" queries and `_count`), the fhirServer fallback reads
the same, and a note whose text is a Binary on fhirServer is read from there (same origin only,
capped); respx plays the EHR's FHIR server."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

import pytest
import respx

from service.infra.fhir.fetch import NOTES_PREFETCH_COUNT
from tests.support import cds_hooks as ch
from tests.support.cds_hooks import PATIENT_VIEW, hook_request, make_env, prefetch_for, record, reset_audit, \
    searchset, validate_cds_response

FHIR, ACCESS, AUTHZ = ch.FHIR_SERVER, ch.FHIR_ACCESS_TOKEN, ch.FHIR_AUTHORIZATION
NOTE = "2/52 thoracic back pain, new BLE weakness 3/5 since yesterday, PVR 900 ml"
TEMPLATE = f"DocumentReference?patient={{{{context.patientId}}}}&_sort=-date&_count={NOTES_PREFETCH_COUNT}"


@pytest.fixture
def env(tmp_path):
    env = make_env(tmp_path)
    yield env
    reset_audit()


@pytest.fixture
def fhir():
    with respx.mock(base_url=FHIR, assert_all_called=False) as mock:
        mock.get("/metadata").respond(200, json=ch.R4_METADATA)  # an R4 server, as SpineWatch checks
        yield mock


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def note_record(url: str | None = "Binary/b1", pid: str = "p1") -> list[dict]:
    """Known cancer and low back pain (routine); the cord compression is written only in a note."""
    attachment = {"contentType": "text/plain"} | ({"url": url} if url else {"data": b64(NOTE)})
    doc = {"resourceType": "DocumentReference", "id": "d1", "status": "current",
           "type": {"text": "Emergency department note"}, "subject": {"reference": f"Patient/{pid}"},
           "date": datetime.now(timezone.utc).isoformat(), "content": [{"attachment": attachment}]}
    return record("routine", pid) + [doc]


def binary(rid: str = "b1") -> dict:
    return {"resourceType": "Binary", "id": rid, "contentType": "text/plain", "data": b64(NOTE)}


def call(env, prefetch=None, server: str | None = FHIR):
    extra = {"fhirServer": server, "fhirAuthorization": AUTHZ} if server else {}
    return env.call(PATIENT_VIEW, hook_request("patient-view", "p1", prefetch, **extra))


def cards(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return validate_cds_response(response.json())


def test_discovery_asks_for_the_most_recent_notes(env):
    for service in env.discover().json()["services"]:
        assert service["prefetch"]["documentReferences"] == TEMPLATE


def test_prefetched_note_with_inline_text_needs_no_fhir_server(env, fhir):
    [card] = cards(call(env, prefetch_for(note_record(url=None)), server=None))
    assert card["indicator"] == "critical"
    assert not fhir.calls


def test_fallback_reads_the_recent_notes_and_the_binary_they_name_with_the_token(env, fhir):
    resources = note_record()
    prefetch = prefetch_for(resources)
    del prefetch["documentReferences"]
    notes = fhir.get("/DocumentReference").respond(200, json=searchset(resources[-1:]))
    content = fhir.get("/Binary/b1").respond(200, json=binary())
    [card] = cards(call(env, prefetch))
    assert card["indicator"] == "critical"
    params = notes.calls.last.request.url.params
    assert (params["patient"], params["_sort"], params["_count"]) == ("p1", "-date", str(NOTES_PREFETCH_COUNT))
    for route in (notes, content):
        assert route.calls.last.request.headers["authorization"] == f"Bearer {ACCESS}"
    [audited] = env.audit_records("card")
    assert audited.detail["source"] == "prefetch+fhir"


def test_a_prefetched_note_s_binary_is_read_from_fhir_server(env, fhir):
    content = fhir.get("/Binary/b1").respond(200, json=binary())
    [card] = cards(call(env, prefetch_for(note_record(url=f"{FHIR}/Binary/b1"))))
    assert card["indicator"] == "critical" and content.call_count == 1


def test_without_fhir_server_the_binary_is_not_read_and_the_card_says_so(env, fhir):
    [card] = cards(call(env, prefetch_for(note_record()), server=None))
    assert not fhir.calls
    assert card["indicator"] == "info"  # the rest of the record: routine
    assert "clinical note" in card["detail"] and "not read" in card["detail"]
    assert "DocumentReference/d1" not in card["detail"]  # named in words, not by id


def test_a_binary_on_another_host_is_never_fetched(env, fhir):
    with respx.mock(assert_all_called=False) as outside:
        away = outside.get("https://elsewhere.example.com/fhir/Binary/b1").respond(200, json=binary())
        response = call(env, prefetch_for(note_record(url="https://elsewhere.example.com/fhir/Binary/b1")))
        assert response.status_code == 200 and not away.called
    assert not fhir.calls


def test_a_binary_over_the_size_cap_or_gone_is_left_out(tmp_path):
    env = make_env(tmp_path, note_max_bytes=2048)
    try:
        with respx.mock(base_url=FHIR, assert_all_called=False) as fhir:
            fhir.get("/metadata").respond(200, json=ch.R4_METADATA)
            big = binary() | {"data": b64("x" * 4096)}
            route = fhir.get("/Binary/b1").respond(200, json=big)
            response = call(env, prefetch_for(note_record()))
            assert route.called
            assert [c["indicator"] for c in cards(response)] == ["info"]  # not read: routine, and named
            route.respond(404)
            assert [c["indicator"] for c in cards(call(env, prefetch_for(note_record())))] == ["info"]
    finally:
        reset_audit()


def test_another_patient_s_binary_is_not_read(env, fhir):
    content = fhir.get("/Binary/b1").respond(200, json=binary())
    prefetch = prefetch_for(note_record())
    prefetch["documentReferences"]["entry"][0]["resource"]["subject"] = {"reference": "Patient/someone-else"}
    cards(call(env, prefetch))
    assert not content.called


def test_paged_notes_are_read_only_up_to_the_template_count(env, fhir):
    resources = note_record(url=None)
    doc = resources[-1]
    first = [dict(doc, id=f"n{i}") for i in range(NOTES_PREFETCH_COUNT - 5)]
    prefetch = prefetch_for(resources)
    prefetch["documentReferences"] = searchset(first, next_url=f"{FHIR}/DocumentReference?patient=p1&page=2")
    page2 = fhir.get("/DocumentReference", params={"page": "2"}).respond(
        200, json=searchset([dict(doc, id=f"m{i}") for i in range(10)],
                            next_url=f"{FHIR}/DocumentReference?patient=p1&page=3"))
    page3 = fhir.get("/DocumentReference", params={"page": "3"}).respond(200, json=searchset([]))
    assert cards(call(env, prefetch))[0]["indicator"] == "critical"
    assert page2.call_count == 1 and not page3.called  # 15 + 10 >= 20: no third page
