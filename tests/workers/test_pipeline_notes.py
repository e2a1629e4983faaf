"""Clinical notes reach the record (US Core Clinical Notes), with respx as the FHIR server: the worker
searches DocumentReference and ClinicalImpression in the lookback window and reads the Binaries the
notes name on the same server (same auth, size-capped, count-capped, text only); anything else is
left for the core to name in `problems`. The pure parts (which URLs qualify) are tested first."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import httpx
import pytest
import respx

from fhir_mappings.clinical.evaluate import assess
from service.core.errors import FHIRServerError, FHIRTooLarge
from service.infra.fhir.auth import BearerAuth
from service.infra.fhir.sync import FHIRClient
from service.infra.fhir.binaries import binary_resource, binary_target, plan_binaries, referenced_binaries
from service.core.settings import Settings, evaluation_settings
from workers import pipeline

BASE = "http://ehr.test/fhir"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
NOTE = "2/52 thoracic back pain, new BLE weakness 3/5 since yesterday, PVR 900 ml"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def note(rid: str, *, url: str | None = None, data: str | None = None, content_type: str | None = "text/plain",
         date: str = "2026-02-28T10:00:00Z", pid: str = "p1") -> dict:
    attachment = {k: v for k, v in {"contentType": content_type, "url": url, "data": data}.items() if v is not None}
    return {"resourceType": "DocumentReference", "id": rid, "status": "current", "date": date,
            "subject": {"reference": f"Patient/{pid}"}, "content": [{"attachment": attachment}]}


def binary(rid: str, text: str = NOTE, content_type: str = "text/plain") -> dict:
    return {"resourceType": "Binary", "id": rid, "contentType": content_type, "data": b64(text)}


def searchset(*resources):
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": x, "search": {"mode": "match"}} for x in resources]}


# ---------------- which URLs are fetched (pure) ----------------

@pytest.mark.parametrize("url, expected", [
    ("Binary/b1", ("Binary/b1", "Binary/b1")),
    ("Binary/b1/_history/2", ("Binary/b1/_history/2", "Binary/b1")),
    (f"{BASE}/Binary/b1", (f"{BASE}/Binary/b1", "Binary/b1")),
    ("HTTP://EHR.TEST:80/fhir/Binary/b1", ("HTTP://EHR.TEST:80/fhir/Binary/b1", "Binary/b1")),
    ("https://ehr.test/fhir/Binary/b1", None),  # another scheme is another origin
    ("http://ehr.test:8080/fhir/Binary/b1", None),  # another port
    ("http://evil.test/fhir/Binary/b1", None),  # another host: never gets our token
    ("http://user:pw@ehr.test/fhir/Binary/b1", None),
    (f"{BASE}/Binary/b1?x=1", None),
    ("Binary/../Patient/p1", None),  # not a FHIR id: stays inside the base
    ("Binary/", None),
    ("#contained", None),
    ("urn:uuid:7d1f2a4e-0000-4000-8000-000000000001", None),
    (f"{BASE}/DocumentReference/d1", None),
    (None, None),
])
def test_only_a_binary_on_the_same_server_is_a_target(url, expected):
    assert binary_target(url, BASE) == expected


def test_plan_reads_newest_notes_first_text_only_and_counts_what_it_leaves():
    resources = [
        note("old", url="Binary/b-old", date="2026-01-01T00:00:00Z"),
        note("new", url="Binary/b-new", date="2026-02-28T00:00:00Z"),
        note("pdf", url="Binary/b-pdf", content_type="application/pdf"),  # unreadable: never downloaded
        note("html", url="Binary/b-html", content_type="text/html; charset=utf-8", date="2026-02-27T00:00:00Z"),
        note("untyped", url="Binary/b-untyped", content_type=None, date="2026-01-02T00:00:00Z"),
        note("inline", data=b64(NOTE)),
        note("away", url="http://elsewhere.test/fhir/Binary/b9"),
        note("twice", url="Binary/b-new", date="2026-02-01T00:00:00Z"),  # one read for both
        note("have", url="Binary/b-have"), binary("b-have"),  # already in the record
        {"resourceType": "DiagnosticReport", "id": "r1", "issued": "2026-02-28T12:00:00Z",
         "subject": {"reference": "Patient/p1"}, "presentedForm": [{"contentType": "text/plain", "url": "Binary/b-r"}]},
    ]
    plan = plan_binaries(resources, BASE, limit=3)
    assert [key for _, key in plan.fetch] == ["Binary/b-new", "Binary/b-html", "Binary/b-untyped"]
    assert plan.over_cap == 2 and plan.elsewhere == 1  # b-old and the report's b-r; the other host
    assert referenced_binaries(resources) >= {"Binary/b-old", "Binary/b9", "Binary/b-r", "Binary/b-pdf"}


def test_a_binary_answer_in_fhir_json_or_raw_becomes_a_binary_resource():
    as_json = json.dumps(binary("b1")).encode()
    assert binary_resource("application/fhir+json; charset=utf-8", as_json, "Binary/b1")["data"] == b64(NOTE)
    raw = binary_resource("text/plain; charset=utf-8", NOTE.encode(), "Binary/b1")
    assert raw == {"resourceType": "Binary", "id": "b1", "contentType": "text/plain; charset=utf-8", "data": b64(NOTE)}
    with pytest.raises(ValueError):
        binary_resource("application/fhir+json", b'{"resourceType": "Patient"}', "Binary/b1")


def test_evaluation_settings_carry_the_note_cap():
    settings = Settings(note_max_chars=5000, lookback_days=30)
    assert evaluation_settings(settings).note_max_chars == 5000
    assert evaluation_settings(settings, lookback_days=7).lookback_days == 7


# ---------------- the worker's fetch ----------------

def serve(resources: list[dict], binaries: dict[str, httpx.Response] | None = None):
    """Reads and patient searches from `resources`; Binary reads from `binaries` (else 404)."""
    searches = []

    def search(request):
        rtype = request.url.path.rsplit("/", 1)[1]
        searches.append((rtype, dict(request.url.params)))
        return httpx.Response(200, json=searchset(*[r for r in resources if r["resourceType"] == rtype]))

    def read(request):
        rtype, rid = request.url.path.rsplit("/", 2)[1:]
        found = next((x for x in resources if x["resourceType"] == rtype and x["id"] == rid), None)
        return httpx.Response(200, json=found) if found else httpx.Response(404)

    routes = {}
    for path, response in (binaries or {}).items():
        routes[path] = respx.get(f"{BASE}/{path}").mock(return_value=response)
    respx.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+$").mock(side_effect=search)
    respx.get(host="ehr.test", path__regex=r"^/fhir/(?!Binary/)[A-Za-z]+/[^/$]+$").mock(side_effect=read)
    return searches, routes


PATIENT = {"resourceType": "Patient", "id": "p1"}


@respx.mock
def test_the_worker_reads_the_notes_of_the_window_and_the_binaries_they_name():
    resources = [PATIENT, note("d1", url="Binary/b1"), note("d2", url=f"{BASE}/Binary/b2"),
                 note("d3", data=b64(NOTE))]
    searches, routes = serve(resources, {
        "Binary/b1": httpx.Response(200, json=binary("b1")),
        "Binary/b2": httpx.Response(200, content=NOTE.encode(), headers={"Content-Type": "text/plain"})})
    with FHIRClient(BASE, auth=BearerAuth("worker-token")) as fhir:
        record = pipeline.fetch_record(fhir, "Patient/p1", NOW, 90)
    refs = sorted(f"{r['resourceType']}/{r['id']}" for r in record)
    assert refs == ["Binary/b1", "Binary/b2", "DocumentReference/d1", "DocumentReference/d2",
                    "DocumentReference/d3", "Patient/p1"]
    notes = [p for t, p in searches if t == "DocumentReference"]
    assert [n.get("date") or n.get("_lastUpdated") for n in notes] == ["ge2025-12-01T12:00:00.000Z"] * 2
    for route in routes.values():  # the same auth as every other read, asking for FHIR JSON
        request = route.calls.last.request
        assert request.headers["authorization"] == "Bearer worker-token"
        assert request.headers["accept"] == "application/fhir+json"
    raw = next(r for r in record if r.get("id") == "b2")
    assert base64.b64decode(raw["data"]).decode() == NOTE


@respx.mock
def test_a_binary_elsewhere_is_never_fetched_and_its_note_is_named_by_the_core():
    resources = [PATIENT, note("d1", url="http://elsewhere.test/fhir/Binary/b1")]
    serve(resources)
    away = respx.get(host="elsewhere.test").respond(200, json=binary("b1"))
    with FHIRClient(BASE) as fhir:
        record = pipeline.fetch_record(fhir, "Patient/p1", NOW, 90)
    assert not away.called
    assert [r["resourceType"] for r in record] == ["Patient", "DocumentReference"]
    assessment = assess(record, NOW, evaluation_settings(Settings()))
    assert any("DocumentReference/d1" in p for p in assessment.problems), assessment.problems


@respx.mock
def test_a_binary_over_the_size_cap_is_not_read_by_content_length_or_while_reading():
    big = json.dumps(binary("b1", "x" * 5000)).encode()
    resources = [PATIENT, note("d1", url="Binary/b1"), note("d2", url="Binary/b2"), note("d3", url="Binary/b3")]
    sent = []

    def chunked(request):  # no Content-Length: the body is cut off as soon as it passes the cap
        def body():
            for i in range(0, len(big), 512):
                sent.append(512)
                yield big[i:i + 512]
        return httpx.Response(200, content=body(), headers={"Content-Type": "application/fhir+json"})

    _, routes = serve(resources, {
        "Binary/b1": httpx.Response(200, content=big, headers={"Content-Type": "application/fhir+json"}),
        "Binary/b3": httpx.Response(200, json=binary("b3"))})
    routes["Binary/b2"] = respx.get(f"{BASE}/Binary/b2").mock(side_effect=chunked)
    with FHIRClient(BASE) as fhir:
        with pytest.raises(FHIRTooLarge):
            fhir.read_binary("Binary/b2", 2048)
        record = pipeline.fetch_record(fhir, "Patient/p1", NOW, 90, note_max_bytes=2048)
    assert sorted(r["id"] for r in record if r["resourceType"] == "Binary") == ["b3"]
    assert len(sent) < len(big) / 512  # read no further than the cap


@respx.mock
def test_at_most_the_cap_of_binaries_is_read_newest_first():
    resources = [PATIENT] + [note(f"d{i}", url=f"Binary/b{i}", date=f"2026-02-{10 + i:02d}T00:00:00Z")
                             for i in range(5)]
    _, routes = serve(resources, {f"Binary/b{i}": httpx.Response(200, json=binary(f"b{i}")) for i in range(5)})
    with FHIRClient(BASE) as fhir:
        record = pipeline.fetch_record(fhir, "Patient/p1", NOW, 90, max_binary_reads=2)
    assert sorted(r["id"] for r in record if r["resourceType"] == "Binary") == ["b3", "b4"]
    assert sum(route.call_count for route in routes.values()) == 2


@respx.mock
def test_a_gone_or_refused_binary_is_left_out_and_a_transient_failure_is_retried():
    resources = [PATIENT, note("d1", url="Binary/b1"), note("d2", url="Binary/b2")]
    _, routes = serve(resources, {"Binary/b1": httpx.Response(410), "Binary/b2": httpx.Response(403)})
    with FHIRClient(BASE) as fhir:
        record = pipeline.fetch_record(fhir, "Patient/p1", NOW, 90)
    assert not [r for r in record if r["resourceType"] == "Binary"]

    routes["Binary/b1"].mock(return_value=httpx.Response(503))
    with FHIRClient(BASE) as fhir, pytest.raises(FHIRServerError):
        pipeline.fetch_record(fhir, "Patient/p1", NOW, 90)  # the task retries, as for any read


@respx.mock
def test_a_server_ignoring_the_patient_parameter_does_not_bring_other_patients_notes():
    # sekmet-fhir 0.1.1 has no ClinicalImpression search parameters: it ignores `patient` and
    # answers every patient's (R4 lenient handling).
    resources = [PATIENT, note("mine", data=b64(NOTE)), note("theirs", data=b64(NOTE), pid="p2"),
                 {"resourceType": "ClinicalImpression", "id": "ci1", "status": "completed",
                  "subject": {"reference": "Patient/p2"}, "summary": "Cord compression."}]
    serve(resources)
    with FHIRClient(BASE) as fhir:
        record = pipeline.fetch_record(fhir, "Patient/p1", NOW, 90)
    assert sorted(r["id"] for r in record) == ["mine", "p1"]


@respx.mock
def test_a_server_refusing_clinical_impression_search_still_gets_the_rest_evaluated():
    resources = [PATIENT, note("d1", data=b64(NOTE))]
    refused = respx.get(f"{BASE}/ClinicalImpression").respond(400, json={"resourceType": "OperationOutcome",
                                                                        "issue": []})
    serve(resources)
    with FHIRClient(BASE) as fhir:
        record = pipeline.fetch_record(fhir, "Patient/p1", NOW, 90)
    # asked once more without the sort (it might have been the sort that was refused), then no more:
    # not again for its second window search
    assert [dict(c.request.url.params).get("_sort") for c in refused.calls] == ["-date", None]
    assert {r["id"] for r in record} == {"p1", "d1"}


@respx.mock
def test_a_focus_note_read_again_brings_its_binary():
    # The search index lags behind the write: the note is known only as the notification's focus.
    respx.get(f"{BASE}/DocumentReference").respond(200, json=searchset())
    serve([PATIENT, note("d1", url="Binary/b1")], {"Binary/b1": httpx.Response(200, json=binary("b1"))})
    with FHIRClient(BASE) as fhir:
        record = pipeline.fetch_record(fhir, "Patient/p1", NOW, 90, ["DocumentReference/d1"])
    assert sorted(f"{r['resourceType']}/{r['id']}" for r in record) == ["Binary/b1", "DocumentReference/d1",
                                                                           "Patient/p1"]
