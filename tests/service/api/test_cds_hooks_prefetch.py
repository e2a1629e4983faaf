"""patient-view data: the prefetch cases of CDS Hooks 2.0 and the fhirServer fallback (respx plays
the EHR's FHIR server). Missing data is a 412 with an OperationOutcome, never "no cards"."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx

from tests.support import cds_hooks as ch
from tests.support.cds_hooks import (PATIENT_VIEW, PREFETCH_TYPES, hook_request, make_env, prefetch_for, record,
                                     reset_audit, searchset, validate_cds_response)

FHIR, ACCESS, AUTHZ = ch.FHIR_SERVER, ch.FHIR_ACCESS_TOKEN, ch.FHIR_AUTHORIZATION


@pytest.fixture
def env(tmp_path):
    env = make_env(tmp_path)
    yield env
    reset_audit()


@pytest.fixture
def fhir():
    with respx.mock(base_url=FHIR, assert_all_called=False) as mock:
        mock.get("/metadata", name="metadata").respond(200, json=ch.R4_METADATA)  # an R4 server, as checked
        yield mock


def serve_record(fhir, resources: list[dict], pid: str = "p1") -> dict:
    """Routes for every prefetch template on the mock FHIR server; returns them by resource type."""
    routes = {}
    for rtype in PREFETCH_TYPES.values():
        found = [r for r in resources if r["resourceType"] == rtype]
        if rtype == "Patient":
            routes[rtype] = fhir.get(f"/Patient/{pid}").respond(200, json=found[0]) if found else \
                fhir.get(f"/Patient/{pid}").respond(404, json={"resourceType": "OperationOutcome", "issue": []})
        else:
            routes[rtype] = fhir.get(f"/{rtype}", params={"patient": pid}).respond(200, json=searchset(found))
    return routes


def call(env, prefetch=None, *, server: str | None = FHIR, authz: dict | None = AUTHZ, pid: str = "p1"):
    extra = {}
    if server:
        extra["fhirServer"] = server
    if authz:
        extra["fhirAuthorization"] = authz
    return env.call(PATIENT_VIEW, hook_request("patient-view", pid, prefetch, **extra))


def assert_412(response, text: str | None = None):
    assert response.status_code == 412, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "incomplete"
    if text:
        assert text in body["issue"][0]["diagnostics"]


def one_card(response) -> dict:
    assert response.status_code == 200, response.text
    [card] = validate_cds_response(response.json())
    return card


# ---------------------------------------------------------------- complete prefetch


def test_complete_prefetch_needs_no_fhir_server(env, fhir):
    card = one_card(call(env, prefetch_for(record("emergency")), server=None, authz=None))
    assert card["indicator"] == "critical"
    assert not fhir.calls


def test_null_means_no_data_and_is_not_fetched(env, fhir):
    prefetch = prefetch_for(record("urgent"))
    assert prefetch["observations"] is None and prefetch["procedures"] is None  # none of either
    card = one_card(call(env, prefetch))
    assert card["indicator"] == "warning"
    assert not fhir.calls


def test_null_for_conditions_means_no_cancer(env, fhir):
    prefetch = prefetch_for(record("emergency"))
    prefetch["conditions"] = None
    response = call(env, prefetch)
    assert response.status_code == 200 and validate_cds_response(response.json()) == []


# ---------------------------------------------------------------- missing keys: fetched


def test_missing_key_is_fetched_with_the_bearer_token(env, fhir):
    resources = record("emergency")
    routes = serve_record(fhir, resources)
    prefetch = prefetch_for(resources)
    del prefetch["observations"]  # the leg weakness note lives here
    card = one_card(call(env, prefetch))
    assert card["indicator"] == "critical"
    assert routes["Observation"].call_count == 1
    # only what was missing, and the server's release, asked once
    assert sorted(c.request.url.path for c in fhir.calls) == ["/r4/Observation", "/r4/metadata"]
    request = routes["Observation"].calls.last.request
    assert request.headers["authorization"] == f"Bearer {ACCESS}"
    assert request.headers["accept"] == "application/fhir+json"


def test_no_prefetch_at_all_fetches_everything(env, fhir):
    routes = serve_record(fhir, record("urgent"))
    card = one_card(call(env, None))
    assert card["indicator"] == "warning"
    assert all(route.call_count == 1 for route in routes.values())
    [audited] = env.audit_records("card")
    assert audited.detail["source"] == "fhir"


def test_fhir_server_without_authorization_is_called_without_a_token(env, fhir):
    routes = serve_record(fhir, record("routine"))
    one_card(call(env, None, authz=None))
    assert "authorization" not in routes["Condition"].calls.last.request.headers


def test_unknown_patient_read_404_is_no_patient_resource(env, fhir):
    resources = [r for r in record("urgent") if r["resourceType"] != "Patient"]
    serve_record(fhir, resources)
    card = one_card(call(env, None))  # the context names the patient; the card still orders for them
    assert card["suggestions"][0]["actions"][0]["resource"]["subject"] == {"reference": "Patient/p1"}


def test_token_is_never_logged(env, fhir, caplog):
    serve_record(fhir, record("urgent"))
    one_card(call(env, None))
    assert ACCESS not in caplog.text


# ---------------------------------------------------------------- OperationOutcome


def test_operation_outcome_value_is_412_without_a_follow_up_query(env, fhir):
    serve_record(fhir, record("urgent"))
    prefetch = prefetch_for(record("urgent"))
    prefetch["conditions"] = {"resourceType": "OperationOutcome",
                              "issue": [{"severity": "error", "code": "timeout", "diagnostics": "upstream timeout"}]}
    assert_412(call(env, prefetch), "conditions")
    assert not fhir.calls  # 2.0: the OperationOutcome is sent "to prevent ... an unneeded follow-up query"


def test_error_outcome_inside_a_searchset_is_412(env, fhir):
    prefetch = prefetch_for(record("urgent"))
    prefetch["observations"] = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "fatal", "code": "exception"}]},
         "search": {"mode": "outcome"}}]}
    assert_412(call(env, prefetch, server=None, authz=None), "observations")


def test_warning_outcome_inside_a_searchset_is_ignored(env, fhir):
    prefetch = prefetch_for(record("urgent"))
    prefetch["conditions"]["entry"].append(
        {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "informational"}]},
         "search": {"mode": "outcome"}})
    assert one_card(call(env, prefetch, server=None, authz=None))["indicator"] == "warning"


# ---------------------------------------------------------------- pagination


def test_paginated_prefetch_follows_next_on_the_fhir_server(env, fhir):
    resources = record("emergency")
    notes = [r for r in resources if r["resourceType"] == "Observation"]
    prefetch = prefetch_for(resources)
    # Page 1 holds nothing relevant; the leg weakness is on page 2.
    prefetch["observations"] = searchset([], next_url=f"{FHIR}/Observation?patient=p1&_page=2")
    page2 = fhir.get("/Observation", params={"_page": "2"}).respond(200, json=searchset(notes))
    card = one_card(call(env, prefetch))
    assert card["indicator"] == "critical"
    assert page2.call_count == 1
    assert page2.calls.last.request.headers["authorization"] == f"Bearer {ACCESS}"


def test_paginated_fallback_search_follows_next(env, fhir):
    resources = record("emergency")
    notes = [r for r in resources if r["resourceType"] == "Observation"]
    page2 = fhir.get("/Observation", params={"page": "2"}).respond(200, json=searchset(notes))  # first match wins
    fhir.get("/Observation", params={"patient": "p1"}).respond(
        200, json=searchset([], next_url="Observation?patient=p1&page=2"))  # a relative next link
    prefetch = prefetch_for(resources)
    del prefetch["observations"]
    assert one_card(call(env, prefetch))["indicator"] == "critical"
    assert page2.call_count == 1
    assert {c.request.url.path for c in fhir.calls} == {"/r4/Observation", "/r4/metadata"}  # the rest came prefetched


def test_next_link_to_another_origin_is_412_and_never_called(env, fhir):
    prefetch = prefetch_for(record("emergency"))
    prefetch["observations"] = searchset([], next_url="https://evil.example.com/steal?patient=p1")
    with respx.mock(assert_all_called=False) as outside:
        evil = outside.get("https://evil.example.com/steal").respond(200, json=searchset([]))
        assert_412(call(env, prefetch), "outside fhirServer")
        assert evil.call_count == 0


def test_paginated_prefetch_without_fhir_server_is_412(env, fhir):
    prefetch = prefetch_for(record("emergency"))
    prefetch["observations"] = searchset([], next_url=f"{FHIR}/Observation?patient=p1&_page=2")
    assert_412(call(env, prefetch, server=None, authz=None), "observations (next page)")
    assert not fhir.calls


def test_endless_pagination_is_bounded(env, fhir):
    fhir.get("/Observation").respond(200, json=searchset([], next_url=f"{FHIR}/Observation?patient=p1&_page=n"))
    prefetch = prefetch_for(record("urgent"))
    del prefetch["observations"]
    assert_412(call(env, prefetch), "pages")


# ---------------------------------------------------------------- 412: the data cannot be had


def test_missing_key_without_fhir_server_is_412(env, fhir):
    prefetch = prefetch_for(record("urgent"))
    del prefetch["imagingStudies"]
    assert_412(call(env, prefetch, server=None, authz=None), "imagingStudies")


@pytest.mark.parametrize("status", [401, 403, 500, 503])
def test_fhir_server_error_is_412(env, fhir, status):
    fhir.get("/Condition").respond(status, json={"resourceType": "OperationOutcome", "issue": []})
    serve_record(fhir, record("urgent"))
    assert_412(call(env, None), f"HTTP {status}")


def test_fhir_server_unreachable_is_412(env, fhir):
    fhir.route().mock(side_effect=httpx.ConnectError("refused"))
    assert_412(call(env, None), "unreachable")


def test_fhir_server_answering_garbage_is_412(env, fhir):
    fhir.route().respond(200, text="<html>login</html>")
    assert_412(call(env, None), "JSON")


def test_slow_fhir_server_is_412_within_the_time_budget(tmp_path):
    env = make_env(tmp_path, hook_timeout_seconds=0.3)

    async def slow(request):
        await asyncio.sleep(3)
        return httpx.Response(200, json=searchset([]))

    try:
        with respx.mock(base_url=FHIR, assert_all_called=False) as fhir:
            fhir.route().mock(side_effect=slow)
            import time

            started = time.monotonic()
            assert_412(call(env, None), "did not answer within 0.3 s")
            assert time.monotonic() - started < 2
    finally:
        reset_audit()


def test_fhir_server_host_not_allowlisted_is_412_and_never_called(env):
    with respx.mock(assert_all_called=False) as mock:
        internal = mock.route(host="169.254.169.254").respond(200, json=searchset([]))
        assert_412(call(env, None, server="http://169.254.169.254/latest"), "SPINEWATCH_FHIR_ALLOWED_HOSTS")
        prefetch = prefetch_for(record("urgent"))
        del prefetch["conditions"]
        assert_412(call(env, prefetch, server="https://fhir.example.org.evil.com/r4"), "ALLOWED_HOSTS")
        assert internal.call_count == 0 and not mock.calls


def test_unusable_fhir_server_does_not_matter_when_prefetch_is_complete(env):
    card = one_card(call(env, prefetch_for(record("urgent")), server="https://not-allowed.example.com"))
    assert card["indicator"] == "warning"


def test_https_is_required_in_production():
    from service.core.errors import FHIRAccessError
    from service.infra.fhir.async_client import AsyncFHIRClient

    hosts = frozenset({"fhir.example.org"})
    with pytest.raises(FHIRAccessError, match="https"):
        AsyncFHIRClient("http://fhir.example.org/r4", None, hosts, require_https=True)
    with pytest.raises(FHIRAccessError, match="credentials"):
        AsyncFHIRClient("https://user:pw@fhir.example.org/r4", None, hosts, require_https=True)
    AsyncFHIRClient("https://fhir.example.org/r4", None, hosts, require_https=True)
    AsyncFHIRClient("https://fhir.example.org:8443/r4", None, frozenset({"fhir.example.org:8443"}), require_https=True)
    with pytest.raises(FHIRAccessError):
        AsyncFHIRClient("https://fhir.example.org:9999/r4", None, frozenset({"fhir.example.org:8443"}), require_https=True)


# ---------------------------------------------------------------- FHIR R4 only


@pytest.mark.parametrize("key, value, named", [
    ("conditions", searchset(ch.as_dstu2(record("emergency"))[1:2]),
     "a Condition with `patient` instead of R4's `subject`"),
    ("serviceRequests", searchset([{"resourceType": "ProcedureRequest", "id": "pr1",
                                    "subject": {"reference": "Patient/p1"}}]), "a ProcedureRequest"),
    ("imagingStudies", searchset([{"resourceType": "ImagingStudy", "id": "i1",
                                   "patient": {"reference": "Patient/p1"}}]), "ImagingStudy with `patient`"),
])
def test_a_prefetch_of_an_earlier_fhir_release_is_412_naming_the_key(env, fhir, key, value, named):
    prefetch = prefetch_for(record("emergency")) | {key: value}
    assert_412(call(env, prefetch), f"prefetch.{key} is not FHIR R4: it holds")
    assert_412(call(env, prefetch), named)
    assert not fhir.calls  # refused on what was sent: nothing fetched


def test_a_dstu2_fhir_server_is_412_and_not_read_again(env, fhir):
    fhir.get("/metadata").respond(200, json=ch.DSTU2_METADATA)  # respx: replaces the fixture's R4 route
    routes = serve_record(fhir, record("emergency"))  # R4-shaped data: only /metadata tells
    assert_412(call(env, None), "fhirServer is FHIR DSTU2 (its /metadata says fhirVersion 1.0.2)")
    asked = len(fhir.calls)
    assert_412(call(env, None), "FHIR DSTU2")
    assert len(fhir.calls) == asked  # remembered: neither /metadata nor the data is read again
    assert routes["Condition"].call_count <= 1


@pytest.mark.parametrize("version, release", [("3.0.2", "STU3"), ("5.0.0", "R5")])
def test_other_releases_are_412_naming_them(env, fhir, version, release):
    fhir.get("/metadata").respond(200, json=ch.R4_METADATA | {"fhirVersion": version})
    serve_record(fhir, record("emergency"))
    assert_412(call(env, None), f"fhirServer is FHIR {release} (its /metadata says fhirVersion {version})")


def test_r4b_is_read(env, fhir):
    fhir.get("/metadata").respond(200, json=ch.R4_METADATA | {"fhirVersion": "4.3.0"})
    serve_record(fhir, record("emergency"))
    assert one_card(call(env, None))["indicator"] == "critical"


def test_metadata_is_asked_once_per_server_base(env, fhir):
    serve_record(fhir, record("urgent"))
    for _ in range(3):
        one_card(call(env, None))
    assert fhir.routes["metadata"].call_count == 1
    other = "https://fhir.example.org/r2"  # same host, another base (the SMART launcher's versions)
    with respx.mock(base_url=other, assert_all_called=False) as r2:
        metadata = r2.get("/metadata").respond(200, json=ch.DSTU2_METADATA)
        r2.route().respond(200, json=searchset([]))
        assert_412(call(env, None, server=other), "DSTU2")
        assert metadata.call_count == 1


@pytest.mark.parametrize("failure", [
    httpx.Response(500), httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []}),
    httpx.Response(200, text="<html>maintenance</html>"), httpx.ConnectError("refused"),
    httpx.Response(200, json={"resourceType": "CapabilityStatement"}),  # no fhirVersion
])
def test_a_failing_metadata_does_not_stop_a_call_whose_reads_work(env, fhir, failure):
    """/metadata is a second opinion: the data reads decide, and the scan of their data still applies."""
    failing = isinstance(failure, Exception)
    route = fhir.get("/metadata").mock(side_effect=failure if failing else None,
                                       return_value=None if failing else failure)
    serve_record(fhir, record("urgent"))
    assert one_card(call(env, None))["indicator"] == "warning"
    assert route.call_count == 1


def test_a_failing_metadata_is_asked_again_after_a_minute_and_the_data_scan_still_applies(env, fhir):
    from service.infra.fhir.fetch import ServerReleases

    now = [1000.0]
    env.app.state.services.hooks.releases = ServerReleases(clock=lambda: now[0])
    metadata = fhir.get("/metadata").respond(503)
    routes = serve_record(fhir, ch.as_dstu2(record("emergency")))
    assert_412(call(env, None), "the data fhirServer answered is not FHIR R4: it holds a Condition with `patient`")
    assert_412(call(env, None), "the data fhirServer answered is not FHIR R4")
    assert metadata.call_count == 1 and routes["Condition"].call_count == 2
    now[0] += ServerReleases.UNKNOWN_SECONDS
    metadata.respond(200, json=ch.DSTU2_METADATA)
    assert_412(call(env, None), "fhirServer is FHIR DSTU2")
    assert metadata.call_count == 2
    now[0] += ServerReleases.KNOWN_SECONDS - 1
    assert_412(call(env, None), "fhirServer is FHIR DSTU2")
    assert metadata.call_count == 2 and routes["Condition"].call_count == 3  # the last one read nothing


def test_a_slow_metadata_costs_at_most_the_fetch_budget(tmp_path):
    env = make_env(tmp_path, hook_timeout_seconds=0.5)

    async def slow(request):
        await asyncio.sleep(3)
        return httpx.Response(200, json=ch.R4_METADATA)

    try:
        with respx.mock(base_url=FHIR, assert_all_called=False) as fhir:
            fhir.get("/metadata").mock(side_effect=slow)
            serve_record(fhir, record("urgent"))
            import time

            started = time.monotonic()
            assert one_card(call(env, None))["indicator"] == "warning"
            assert 0.4 < time.monotonic() - started < 2  # waited for /metadata up to the budget, no longer
            started = time.monotonic()
            assert one_card(call(env, None))["indicator"] == "warning"
            assert time.monotonic() - started < 0.4  # remembered as unknown: no wait
    finally:
        reset_audit()


def test_a_dstu2_server_refusing_r4_searches_is_named_as_dstu2(env, fhir):
    fhir.get("/metadata").respond(200, json=ch.DSTU2_METADATA)
    fhir.route().respond(400, json={"resourceType": "OperationOutcome", "issue": []})
    assert_412(call(env, None), "fhirServer is FHIR DSTU2")


def test_a_complete_prefetch_asks_no_metadata(env, fhir):
    """The prefetch path pays for the scan only: fhirServer is not contacted at all."""
    assert one_card(call(env, prefetch_for(record("urgent"))))["indicator"] == "warning"
    assert not fhir.calls
