"""FHIRClient.search_capped (service/infra/fhir/sync.py): a search read up to a cap of matches or the
client's page cap, cut short there instead of failing, with the pages after it never asked for."""

from __future__ import annotations

import httpx
import pytest
import respx

from service.core.errors import FHIRPagingError
from service.infra.fhir.sync import FHIRClient

BASE = "http://ehr.test/fhir"


def observations(first: int, count: int) -> list[dict]:
    return [{"resourceType": "Observation", "id": f"o{i}"} for i in range(first, first + count)]


def serve_pages(total: int, per_page: int, *, include_per_page: int = 0, next_base: str = BASE) -> list[int]:
    """A paged Observation search over `total` matches; returns the offsets asked for."""
    asked: list[int] = []

    def answer(request):
        offset = int(request.url.params.get("_offset", "0"))
        asked.append(offset)
        entries = [{"resource": r, "search": {"mode": "match"}} for r in observations(offset, per_page)
                   if int(r["id"][1:]) < total]
        entries += [{"resource": {"resourceType": "Patient", "id": f"inc{offset}-{i}"}, "search": {"mode": "include"}}
                    for i in range(include_per_page)]
        links = [{"relation": "next", "url": f"{next_base}/Observation?_offset={offset + per_page}"}] \
            if offset + per_page < total else []
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "link": links,
                                         "entry": entries})

    respx.get(f"{BASE}/Observation").mock(side_effect=answer)
    return asked


@respx.mock
def test_a_search_within_the_cap_is_read_whole():
    asked = serve_pages(total=25, per_page=10)
    with FHIRClient(BASE) as fhir:
        found = fhir.search_capped("Observation", {"patient": "p1"}, limit=100)
    assert [r["id"] for r in found.resources] == [f"o{i}" for i in range(25)]
    assert found.stopped is None and asked == [0, 10, 20]


@respx.mock
def test_the_cap_stops_mid_page_and_the_next_page_is_never_asked_for():
    asked = serve_pages(total=100, per_page=10)
    with FHIRClient(BASE) as fhir:
        found = fhir.search_capped("Observation", {"patient": "p1"}, limit=15)
    assert [r["id"] for r in found.resources] == [f"o{i}" for i in range(15)]
    assert found.stopped == "limit" and asked == [0, 10]


@respx.mock
def test_a_cap_met_at_a_page_end_with_a_next_link_is_cut_short():
    asked = serve_pages(total=100, per_page=10)
    with FHIRClient(BASE) as fhir:
        found = fhir.search_capped("Observation", {}, limit=20)
    assert len(found.resources) == 20 and found.stopped == "limit" and asked == [0, 10]


@respx.mock
def test_a_search_of_exactly_the_cap_is_whole():
    serve_pages(total=20, per_page=10)
    with FHIRClient(BASE) as fhir:
        found = fhir.search_capped("Observation", {}, limit=20)
    assert len(found.resources) == 20 and found.stopped is None


@respx.mock
def test_the_page_cap_cuts_short_instead_of_failing():
    asked = serve_pages(total=1000, per_page=10)
    with FHIRClient(BASE, max_pages=3) as fhir:
        found = fhir.search_capped("Observation", {}, limit=500)
        assert len(found.resources) == 30 and found.stopped == "pages" and asked == [0, 10, 20]
        with pytest.raises(FHIRPagingError):  # the uncapped search still refuses a partial answer
            list(fhir.search("Observation", {}))


@respx.mock
def test_includes_are_kept_but_not_counted_as_matches():
    serve_pages(total=100, per_page=10, include_per_page=2)
    with FHIRClient(BASE) as fhir:
        found = fhir.search_capped("Observation", {}, limit=15)
    matches = [r for r in found.resources if r["resourceType"] == "Observation"]
    # the first page's two includes; the second page stopped at its sixth match, before its includes
    assert len(matches) == 15 and len(found.resources) == 15 + 2
    assert found.stopped == "limit"


@respx.mock
def test_a_next_link_to_another_origin_still_fails():
    serve_pages(total=100, per_page=10, next_base="http://evil.test/fhir")
    with FHIRClient(BASE) as fhir, pytest.raises(FHIRPagingError, match="another origin"):
        fhir.search_capped("Observation", {}, limit=50)
