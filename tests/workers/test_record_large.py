"""A record larger than one evaluation reads (workers/pipeline/record.py, SPINEWATCH_RECORD_MAX_
RESOURCES_PER_SEARCH): the searches are date-bounded and newest first, a search past the cap (or past
SPINEWATCH_FHIR_MAX_PAGES) is cut short, the evaluation goes on with the newest part and names the rest
in `problems`, and nothing is dead-lettered. respx is the FHIR server: it pages, sorts and filters by
date the way an R4 server does (or, for one test, ignores the date)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import httpx
import pytest
import redis
import respx

from service.core.settings import Settings
from service.infra.assessments import AssessmentStore
from service.infra.audit.writer import AuditLog
from service.infra.dead_letters import DeadLetters
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import WorkQueue
from tests.support import cds_hooks as ch
from workers import pipeline, tasks
from workers.celery_app import create_celery_app
from workers.pipeline import evaluate as evaluate_step

BASE = "http://ehr.test/fhir"
SORT_FIELDS = {"date": lambda r: r.get("effectiveDateTime") or r.get("date") or "",
               "_lastUpdated": lambda r: r["meta"]["lastUpdated"]}


@pytest.fixture
def settings(redis_url, tmp_path):
    return Settings(environment="test", redis_url=redis_url, fhir_base_url=BASE, coalesce_seconds=0,
                    audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite", record_max_resources_per_search=400)


@pytest.fixture
def deps(settings, redis_url, monkeypatch):
    monkeypatch.setattr(evaluate_step, "alert", lambda c, assessment: None)  # alerting is tested elsewhere
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    fhir = FHIRClient(BASE)
    yield pipeline.Collaborators(settings, fhir, WorkQueue(settings, r), AssessmentStore(r), AuditLog(settings), r)
    fhir.close()
    r.close()


def iso(days_ago: float, now: datetime) -> str:
    return (now - timedelta(days=days_ago)).isoformat()


def large_record(vitals: int, now: datetime, *, oldest_days: float = 80) -> list[dict]:
    """An emergency record (cancer, back pain, new leg weakness a day ago) with `vitals` heart rates
    spread from 2 to `oldest_days` days before `now` (the core's dates are from the real clock); every
    resource last updated at its clinical date."""
    resources = []
    for i in range(vitals):
        resources.append({"resourceType": "Observation", "id": f"hr-{i}", "status": "final",
                          "code": {"coding": [{"system": ch.LOINC, "code": "8867-4", "display": "Heart rate"}]},
                          "subject": {"reference": "Patient/p1"},
                          "effectiveDateTime": iso(2 + i * (oldest_days - 2) / max(vitals, 1), now),
                          "valueQuantity": {"value": 72, "unit": "/min"}})
    resources += ch.record("emergency", "p1")  # stored last: only newest first reads the leg weakness
    for resource in resources:
        when = resource.get("effectiveDateTime") or resource.get("onsetDateTime") or iso(0, now)
        resource["meta"] = {"versionId": "1", "lastUpdated": when}
    return resources


def serve(resources: list[dict], *, honour_dates: bool = True, refuse_sort: bool = False) -> list[tuple[str, dict]]:
    """A paging R4 server over `resources`: `_count`/`_offset`, `_sort` on date or `_lastUpdated`, and
    `ge` date bounds (ignored, as a lenient server may, when not `honour_dates`). Returns every search
    asked: (type, params)."""
    by_type: dict[str, list[dict]] = {}
    for resource in resources:
        by_type.setdefault(resource["resourceType"], []).append(resource)
    asked: list[tuple[str, dict]] = []

    def search(request):
        rtype = request.url.path.rsplit("/", 1)[1]
        params = dict(request.url.params)
        asked.append((rtype, params))
        if refuse_sort and "_sort" in params:  # a strict server that supports no sort
            return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-supported", "diagnostics": "_sort is not supported"}]})
        found = list(by_type.get(rtype, []))
        for name in ("date", "_lastUpdated"):
            if name in params and honour_dates:
                bound = datetime.fromisoformat(params[name].removeprefix("ge").replace("Z", "+00:00"))
                found = [r for r in found if SORT_FIELDS[name](r)
                         and datetime.fromisoformat(SORT_FIELDS[name](r)) >= bound]
        if params.get("_sort"):
            found.sort(key=SORT_FIELDS[params["_sort"].lstrip("-")], reverse=params["_sort"].startswith("-"))
        count, offset = int(params.get("_count", 20)), int(params.get("_offset", 0))
        following = {k: v for k, v in params.items() if k != "_offset"} | {"_offset": str(offset + count)}
        links = [{"relation": "next", "url": str(httpx.URL(f"{BASE}/{rtype}", params=following))}] \
            if offset + count < len(found) else []
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "link": links, "entry": [
            {"resource": r, "search": {"mode": "match"}} for r in found[offset:offset + count]]})

    by_reference = {f"{r['resourceType']}/{r['id']}": r for r in resources}

    def read(request):
        found = by_reference.get(request.url.path.removeprefix("/fhir/"))
        return httpx.Response(200, json=found) if found else httpx.Response(404)

    respx.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+$").mock(side_effect=search)
    respx.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+/[^/$]+$").mock(side_effect=read)
    return asked


def unread_problems(assessment) -> list[str]:
    return [p for p in assessment.problems if p.startswith("not every ")]


@respx.mock
def test_a_record_past_the_cap_is_evaluated_on_its_newest_part_through_the_task(deps, settings):
    now = datetime.now(timezone.utc)  # the task evaluates at the real clock
    asked = serve(large_record(1500, now))
    app = create_celery_app(settings)
    app.use_collaborators(deps)
    result = app.tasks[tasks.evaluate_patient.name].apply(kwargs={"patient": "Patient/p1"})
    assert result.successful() and result.result == "emergency"  # the day-old leg weakness was read
    assert len(DeadLetters(deps.queue.redis)) == 0
    stored = deps.store.get("Patient/p1")
    assert stored["urgency"] == "emergency"
    assert [p for p in stored["problems"] if p.startswith("not every ")] == [
        "not every Observation was read: the newest 400 were, older ones were not (the record is larger "
        "than one evaluation reads)"]
    assert "p1" not in " ".join(stored["problems"])
    # each Observation search stopped at its cap: two pages of 200, never a third
    offsets = [(p.get("_sort"), p.get("_offset", "0")) for t, p in asked if t == "Observation"]
    assert offsets == [("-date", "0"), ("-date", "200"), ("-_lastUpdated", "0"), ("-_lastUpdated", "200")]


@respx.mock
def test_the_searches_are_bounded_by_date_newest_first_and_conditions_are_not(deps):
    now = datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=timezone.utc)
    asked = serve(large_record(3, now))
    pipeline.evaluate_patient(deps, "Patient/p1", [], {}, now)
    since = "ge2026-09-02T09:30:15.123Z"  # the 90-day lookback before `now`
    windowed = {(t, p.get("date"), p.get("_lastUpdated"), p["_sort"]) for t, p in asked
                if t not in ("Condition", "ServiceRequest", "ImagingStudy")}
    assert windowed == {(t, since, None, "-date") for t in ("Observation", "DiagnosticReport", "Procedure",
                                                            "DocumentReference", "ClinicalImpression")} | \
        {(t, None, since, "-_lastUpdated") for t in ("Observation", "DiagnosticReport", "Procedure",
                                                     "DocumentReference", "ClinicalImpression")}
    (conditions,) = [p for t, p in asked if t == "Condition"]
    assert conditions == {"patient": "p1", "_count": "200"}  # every Condition: cancer history has no window
    for rtype in ("ServiceRequest", "ImagingStudy"):  # an old order may still be open, an old MRI still answer
        (params,) = [p for t, p in asked if t == rtype]
        assert params == {"patient": "p1", "_count": "200", "_sort": "-_lastUpdated"}


@respx.mock
def test_a_server_that_ignores_the_date_is_still_capped(deps):
    now = datetime.now(timezone.utc)  # the record's core (tests/support/cds_hooks.py) is dated from the clock
    asked = serve(large_record(3000, now, oldest_days=3000), honour_dates=False)
    assessment = pipeline.evaluate_patient(deps, "Patient/p1", [], {}, now)
    assert assessment.urgency == "emergency"
    assert unread_problems(assessment) == [
        "not every Observation was read: the newest 400 were, older ones were not (the record is larger "
        "than one evaluation reads)"]
    assert len([t for t, _ in asked if t == "Observation"]) == 4  # 2 pages for each of its 2 searches


@respx.mock
def test_the_page_cap_no_longer_fails_the_evaluation(deps):
    now = datetime.now(timezone.utc)  # the record's core (tests/support/cds_hooks.py) is dated from the clock
    deps.fhir.max_pages = 2
    deps.settings.record_max_resources_per_search = 10_000
    serve(large_record(1500, now))
    assessment = pipeline.evaluate_patient(deps, "Patient/p1", [], {}, now)
    assert assessment.urgency == "emergency"
    assert unread_problems(assessment) == [
        "not every Observation was read: the newest 400 were, older ones were not (the record is larger "
        "than one evaluation reads)"]
    assert deps.store.get("Patient/p1")["urgency"] == "emergency"


@respx.mock
def test_a_record_within_the_cap_is_read_whole_and_names_nothing_unread(deps):
    now = datetime.now(timezone.utc)  # the record's core (tests/support/cds_hooks.py) is dated from the clock
    serve(large_record(390, now))
    unread: list[str] = []
    resources = pipeline.fetch_record(deps.fhir, "Patient/p1", now, 90, max_per_search=400, unread=unread)
    assert unread == []
    assert sum(1 for r in resources if r["resourceType"] == "Observation") == 391  # the vitals and the note


@respx.mock
def test_a_server_that_refuses_the_sort_is_asked_again_without_it(deps):
    now = datetime.now(timezone.utc)  # the record's core (tests/support/cds_hooks.py) is dated from the clock
    asked = serve(large_record(3, now), refuse_sort=True)
    assessment = pipeline.evaluate_patient(deps, "Patient/p1", [], {}, now)
    assert assessment.urgency == "emergency"
    observations = [p.get("_sort") for t, p in asked if t == "Observation"]
    assert observations == ["-date", None, "-_lastUpdated", None]
