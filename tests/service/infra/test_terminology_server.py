"""The optional terminology server (service/infra/fhir/terminology.py) with respx playing it: SNOMED CT
codes the local value sets do not know, resolved by CodeSystem/$subsumes, in the worker's and the
CDS Hooks evaluation; failures fall back to the local sets within the time bound; answers are
cached; exclusions win; no URL, no HTTP."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import redis
import respx
from prometheus_client import REGISTRY

from fhir_mappings.clinical.evaluate import assess
from fhir_mappings.clinical.schema import TerminologyRootsFile, load
from fhir_mappings.clinical.terminology import SNOMED, load_terminology
from service.infra.fhir.sync import FHIRClient
from service.core.settings import Settings
from service.infra import config_problems
from service.infra.fhir.terminology import LOCAL, AnswerCache, TerminologyServer, consult_sync
from service.infra.fhir.terminology_roots import ROOTS_PATH, load_roots, questions, record_codes
from tests.support.cds_hooks import PATIENT_VIEW, hook_request, make_env, prefetch_for, reset_audit, validate_cds_response
from workers import pipeline

TX = "https://tx.example.org/fhir"
EHR = "http://ehr.test/fhir"
SUBSUMES = r"^/fhir/CodeSystem/\$subsumes$"
NOW = datetime.now(timezone.utc)
# A SNOMED CT concept id no local list names: only the (mocked) server can say what it is. No display
# or text, so the text fallback cannot find it either.
UNKNOWN_CANCER = "1000000000101"
UNKNOWN_OTHER = "1000000000202"
EXCLUDED = "126906006"  # known-cancer.yaml exclude: Neoplasm of prostate (unspecified behaviour)
MALIGNANT_ROOT = "363346000"


def _ago(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat()


def condition(rid: str, system: str, code: str, days_ago: float = 10, **extra) -> dict:
    return {"resourceType": "Condition", "id": rid, "meta": {"versionId": "1"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "code": {"coding": [{"system": system, "code": code}]},
            "subject": {"reference": "Patient/p1"}, "onsetDateTime": _ago(days_ago)} | extra


def record(cancer_code: str = UNKNOWN_CANCER, *more: dict) -> list[dict]:
    """A patient with recent low back pain (ICD-10-CM, local) and a cancer coded only as `cancer_code`."""
    return [{"resourceType": "Patient", "id": "p1", "meta": {"versionId": "1"}},
            condition("cancer", SNOMED, cancer_code, 400),
            condition("back-pain", "http://hl7.org/fhir/sid/icd-10-cm", "M54.50"), *more]


def outcome(value: str) -> dict:
    return {"resourceType": "Parameters", "parameter": [{"name": "outcome", "valueCode": value}]}


def server(mock, belongs: set[tuple[str, str]] | None = None, *, status: int = 200, body=None, side_effect=None):
    """The $subsumes route: `subsumes` for the (root, code) pairs in `belongs`, else `not-subsumed`."""
    belongs = belongs if belongs is not None else {(MALIGNANT_ROOT, UNKNOWN_CANCER)}

    def answer(request):
        pair = (request.url.params["codeA"], request.url.params["codeB"])
        if body is not None:
            return httpx.Response(status, content=body) if isinstance(body, bytes) else httpx.Response(status, json=body)
        return httpx.Response(status, json=outcome("subsumes" if pair in belongs else "not-subsumed"))

    return mock.get(host="tx.example.org", path__regex=SUBSUMES).mock(side_effect=side_effect or answer)


def asked(route) -> list[tuple[str, str]]:
    return [(c.request.url.params["codeA"], c.request.url.params["codeB"]) for c in route.calls]


def tx(**kw) -> TerminologyServer:
    return TerminologyServer(TX, **({"timeout": 1.0, "budget": 1.5} | kw))


# ---------------------------------------------------------------- the worker's evaluation


class _Queue:
    def __init__(self, redis_client=None):
        self.redis = redis_client  # where a configuration problem is kept (none expected: None)

    def take_pending(self, patient):
        return []


class _Store:
    def get(self, patient):
        return None  # nothing stored before: nothing retracted

    def save(self, data, seen=None, index_ttl_seconds=0):
        return 0  # revision 0: nothing new to alert about


class _NoAlertsSent:
    def hgetall(self, key):
        return {}


class _Audit:
    def event(self, *a, **kw):
        pass


@pytest.fixture
def mock():
    """respx as every HTTP server; a request to anything not mocked fails the test."""
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


@pytest.fixture
def worker(monkeypatch, tmp_path, mock):
    """evaluate_patient with respx as the EHR; returns a function evaluating Patient/p1 with a
    given terminology server."""
    load_terminology(), load_roots()  # compiled once, outside the timings below
    settings = Settings(environment="test", fhir_base_url=EHR, audit_db_url=f"sqlite:///{tmp_path}/a.sqlite")
    fhir = FHIRClient(EHR)

    def evaluate(resources: list[dict], terminology: TerminologyServer | None, queue: _Queue | None = None):
        by_type: dict[str, list[dict]] = {}
        for r in resources:
            by_type.setdefault(r["resourceType"], []).append(r)
        mock.get(f"{EHR}/Patient/p1").respond(200, json=resources[0])
        mock.get(host="ehr.test", path__regex=r"^/fhir/[A-Za-z]+$").mock(side_effect=lambda request: httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset",
                       "entry": [{"resource": r} for r in by_type.get(request.url.path.rsplit("/", 1)[1], [])]}))
        d = pipeline.Collaborators(settings, fhir, queue or _Queue(), _Store(), _Audit(), _NoAlertsSent(), terminology)
        return pipeline.evaluate_patient(d, "Patient/p1", [], {"kind": "test"}, NOW)

    yield evaluate
    fhir.close()


def test_without_the_server_the_unknown_code_is_no_cancer(worker):
    assessment = worker(record(), None)
    assert assessment.urgency == "none" and not assessment.in_scope and assessment.problems == []


def test_subsumed_unknown_code_makes_the_patient_in_scope(worker, mock):
    route = server(mock)
    assessment = worker(record(), tx())
    assert assessment.in_scope and assessment.urgency == "routine"
    [cancer] = assessment.cancers
    assert cancer.code == f"{SNOMED}|{UNKNOWN_CANCER}" and cancer.reference == "Condition/cancer"
    assert assessment.problems == []
    assert assessment.rule_versions["terminology-roots"] == load_roots().version
    # Asked once per root of every concept, only about the code no local list classifies.
    roots = {r for rs in load_roots().by_concept.values() for r in rs}
    assert sorted(asked(route)) == sorted((root, UNKNOWN_CANCER) for root in roots)
    request = route.calls[0].request
    assert request.url.params["system"] == SNOMED and "authorization" not in request.headers


def test_not_subsumed_changes_nothing(worker, mock):
    server(mock, belongs=set())
    with_server = worker(record(), tx())
    assert with_server.urgency == "none" and not with_server.cancers and with_server.problems == []
    assert "terminology-roots" not in with_server.rule_versions


def test_equivalent_counts_and_subsumed_by_does_not(worker, mock):
    mock.get(host="tx.example.org", path__regex=SUBSUMES).mock(side_effect=lambda request: httpx.Response(
        200, json=outcome("equivalent" if request.url.params["codeA"] == MALIGNANT_ROOT else "subsumed-by")))
    assert worker(record(), tx()).urgency == "routine"


async def _slow(request):
    await asyncio.sleep(5)
    return httpx.Response(200, json=outcome("subsumes"))


FAILURES = {
    "HTTP 500": dict(status=500, body={"resourceType": "OperationOutcome", "issue": []}),
    "a request timed out": dict(side_effect=httpx.ReadTimeout("slow")),
    "over the budget": dict(side_effect=_slow),
    "unreachable": dict(side_effect=httpx.ConnectError("refused")),
    "not JSON": dict(body=b"<html>Bad gateway</html>"),
    "JSON, not Parameters": dict(body={"outcome": "subsumes"}),
    "an unknown outcome": dict(body=outcome("maybe")),
    "a redirect": dict(status=302, body={}),
}


@pytest.mark.parametrize("failure", FAILURES, ids=list(FAILURES))
def test_failure_leaves_the_local_decision_with_one_problem_within_the_bound(worker, mock, failure):
    server(mock, **FAILURES[failure])
    # A record the local sets already put in scope, plus an unknown code the server is asked about.
    resources = record("254837009", condition("other", SNOMED, UNKNOWN_OTHER))
    expected = assess(resources, NOW)
    started = time.monotonic()
    assessment = worker(resources, tx(budget=0.4, timeout=0.3))
    assert time.monotonic() - started < 0.4 + 0.5
    assert assessment.urgency == expected.urgency == "routine"
    assert assessment.red_flags == expected.red_flags
    [problem] = assessment.problems
    assert problem.startswith("terminology server not consulted") and "local value sets decided alone" in problem
    assert UNKNOWN_OTHER not in problem and "terminology-roots" not in assessment.rule_versions


@pytest.mark.parametrize("status", [401, 403])
def test_a_server_refusing_our_credentials_is_a_configuration_problem(worker, mock, redis_url, status):
    """Set up wrong, not down: the local decision stands as for any failure, and the refusal is also
    recorded where /readyz and `spinewatch check-config` show it (the codes it would resolve, a
    cancer among them, go unresolved until it is fixed)."""
    server(mock, status=status, body={"resourceType": "OperationOutcome", "issue": []})
    client = redis.Redis.from_url(redis_url)
    counted = REGISTRY.get_sample_value("spinewatch_configuration_problems_total", {"kind": "terminology-auth"}) or 0
    resources = record("254837009", condition("other", SNOMED, UNKNOWN_OTHER))
    assessment = worker(resources, tx(), queue=_Queue(client))
    assert assessment.urgency == assess(resources, NOW).urgency == "routine"
    [problem] = assessment.problems
    assert f"HTTP {status} (not authorised)" in problem
    recorded = config_problems.last(client)
    assert (recorded["kind"], recorded["task"]) == ("terminology-auth", "spinewatch.evaluate_patient")
    assert f"HTTP {status} (not authorised)" in recorded["message"] and UNKNOWN_OTHER not in recorded["message"]
    assert REGISTRY.get_sample_value("spinewatch_configuration_problems_total", {"kind": "terminology-auth"}) == counted + 1
    client.close()


def test_a_failure_half_way_uses_no_answer_now_and_keeps_them_for_next_time(worker, mock):
    """All or nothing per evaluation; the answers that did arrive are cached, not asked again."""
    failing = {"94222008"}  # asked last (one at a time, in order)

    def half(request):
        root = request.url.params["codeA"]
        if root in failing:
            return httpx.Response(503)
        return httpx.Response(200, json=outcome("subsumes" if root == MALIGNANT_ROOT else "not-subsumed"))

    route = server(mock, side_effect=half)
    terminology = tx(concurrency=1)
    first = worker(record(), terminology)
    assert first.urgency == "none" and len(first.problems) == 1
    assert (MALIGNANT_ROOT, UNKNOWN_CANCER) in asked(route)
    failing.clear()
    n = route.call_count
    second = worker(record(), terminology)
    assert second.urgency == "routine" and second.problems == []
    assert asked(route)[n:] == [("94222008", UNKNOWN_CANCER)]


def test_answers_are_cached_positive_and_negative(worker, mock):
    route = server(mock)
    terminology = tx()
    resources = record(UNKNOWN_CANCER, condition("other", SNOMED, UNKNOWN_OTHER))
    first = worker(resources, terminology)
    n = route.call_count
    assert n == 2 * 4 and first.urgency == "routine"  # two unknown codes, four roots
    second = worker(resources, terminology)
    assert route.call_count == n and second.urgency == "routine" and second.problems == []
    assert len(terminology.cache) == n


def test_cache_entries_expire_and_the_oldest_go_first():
    now = [0.0]
    cache = AnswerCache(ttl=10, max_entries=2, clock=lambda: now[0])
    cache.put("1", "r", True)
    cache.put("2", "r", False)
    assert cache.get("2", "r") is False and cache.get("1", "r") is True  # "2" is now the least recently used
    cache.put("3", "r", True)
    assert cache.get("2", "r") is None and cache.get("1", "r") is True and len(cache) == 2
    now[0] = 11
    assert cache.get("1", "r") is None and cache.get("3", "r") is None


def test_excluded_codes_are_never_asked_nor_added(worker, mock):
    """A code a local exclude list names stays excluded, whatever the server would say."""
    route = mock.get(host="tx.example.org", path__regex=SUBSUMES).respond(200, json=outcome("subsumes"))
    assessment = worker(record(EXCLUDED), tx())
    assert assessment.urgency == "none" and not assessment.cancers and not assessment.red_flags
    # Asked only about back pain (no back-pain list names it); never under a cancer or bone-metastasis
    # root: known-bone-metastasis has no exclude list, and known-cancer's applies to it
    # (terminology-roots.yaml excluded_by).
    assert asked(route) == [("161891005", EXCLUDED)]
    assert [cid for cid, _, _ in questions([EXCLUDED], load_terminology(), load_roots())] == ["back-pain"]


def test_codes_the_local_sets_know_are_not_asked(worker, mock):
    route = server(mock)
    assert worker(record("254837009"), tx()).urgency == "routine"  # breast cancer: known-cancer.yaml
    # Never under a cancer root; the other concepts' lists do not name it, so their roots are asked.
    assert sorted(asked(route)) == [("161891005", "254837009"), ("94222008", "254837009")]


def test_requests_are_concurrent_under_the_cap(worker, mock):
    flight = {"now": 0, "max": 0}

    async def counted(request):
        flight["now"] += 1
        flight["max"] = max(flight["max"], flight["now"])
        await asyncio.sleep(0.02)
        flight["now"] -= 1
        return httpx.Response(200, json=outcome("not-subsumed"))

    server(mock, side_effect=counted)
    more = [condition(f"c{i}", SNOMED, f"10000000003{i:02d}") for i in range(6)]
    started = time.monotonic()
    assessment = worker(record(UNKNOWN_CANCER, *more), tx(concurrency=3))
    assert assessment.problems == [] and flight["max"] == 3
    assert time.monotonic() - started < 28 * 0.02  # 28 requests, not one after another


def test_record_codes_reads_code_value_and_body_site_of_conditions_and_observations():
    obs = {"resourceType": "Observation", "id": "o", "status": "final",
           "code": {"coding": [{"system": SNOMED, "code": "1000000000401"}]},
           "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "1000000000402"}]},
           "bodySite": {"coding": [{"system": SNOMED, "code": "1000000000403"}]}}
    cond = condition("c", SNOMED, "1000000000404", bodySite=[{"coding": [{"system": SNOMED, "code": "1000000000405"}]}])
    ignored = [{"resourceType": "Procedure", "code": {"coding": [{"system": SNOMED, "code": "1000000000406"}]}},
               condition("loinc", "http://loinc.org", "1000000000407"),
               condition("expression", SNOMED, "363346000:116676008=1000000000408"),
               {"resourceType": "Condition", "code": "not a CodeableConcept"}]
    assert record_codes([obs, cond, *ignored]) == [f"100000000040{i}" for i in range(1, 6)]


def test_roots_file_is_valid_and_each_root_is_in_its_local_set():
    data = load(ROOTS_PATH, TerminologyRootsFile)
    term = load_terminology()
    concepts = {c.id: c for c in (term.cancer, term.back_pain, term.spinal_site, term.mri_spine, term.xray_spine)}
    for cid, spec in data.concepts.items():
        assert spec.sources, cid
        for root in spec.snomed:
            local = concepts[cid].include if cid in concepts else term.rule(cid).codes
            assert local.contains(SNOMED, root), f"{cid}: root {root} is not in its local set"
    assert set(data.concepts) == {"known-cancer", "back-pain", "known-bone-metastasis"}


# ---------------------------------------------------------------- no URL, no HTTP


def test_unset_url_means_no_server():
    assert Settings(environment="test").terminology_url is None
    assert TerminologyServer.from_settings(Settings(environment="test")) is None
    assert consult_sync(None, record()) is LOCAL and LOCAL.terminology is None and LOCAL.problem is None


def test_unset_url_the_worker_asks_nothing(worker, mock):
    tx_route = server(mock)
    assert worker(record(), TerminologyServer.from_settings(Settings(environment="test"))).urgency == "none"
    assert tx_route.call_count == 0


# ---------------------------------------------------------------- authentication


def test_auth_only_on_the_fhir_base_origin():
    same = Settings(environment="test", fhir_base_url="https://ehr.example.org/fhir", fhir_auth="bearer",
                    fhir_bearer_token="t0ken", terminology_url="https://ehr.example.org/tx")
    other = same.model_copy(update={"terminology_url": "https://tx.example.org/fhir"})
    other_port = same.model_copy(update={"terminology_url": "https://ehr.example.org:8443/tx"})
    with respx.mock(assert_all_mocked=True) as mock:
        route = mock.get(url__regex=r".*/CodeSystem/\$subsumes.*").respond(200, json=outcome("not-subsumed"))
        for settings in (same, other, other_port):
            assert TerminologyServer.from_settings(settings).consult_sync(record()).problem is None
    sent = [c.request.headers.get("authorization") for c in route.calls]
    assert sent[:4] == ["Bearer t0ken"] * 4 and sent[4:] == [None] * 8


def test_no_credentials_for_the_server_is_a_problem_not_a_crash(mock):
    def broken():
        raise ValueError("no key")

    route = server(mock)
    result = TerminologyServer(TX, auth=broken).consult_sync(record())
    assert result.terminology is None and "no credentials" in result.problem and route.call_count == 0


def test_terminology_url_is_checked_and_shown_by_check_config(monkeypatch):
    from typer.testing import CliRunner

    from service.cli.main import app

    for bad in ("ftp://tx.example.org", "https://user:pw@tx.example.org/fhir"):
        with pytest.raises(ValueError):
            Settings(terminology_url=bad)
    monkeypatch.setenv("SPINEWATCH_TERMINOLOGY_URL", TX)
    out = CliRunner().invoke(app, ["check-config"]).output
    assert f"SPINEWATCH_TERMINOLOGY_URL={TX}" in out
    assert "SPINEWATCH_TERMINOLOGY_BUDGET_SECONDS=1.5" in out


# ---------------------------------------------------------------- the CDS Hooks evaluation


@pytest.fixture
def hook_env(tmp_path):
    """make_env with these settings; the vocabulary compiled first, as the app's start-up does
    (a TestClient used without `with` skips it)."""
    load_terminology()
    yield lambda **settings: make_env(tmp_path, **settings)
    reset_audit()


def call(env, resources):
    return env.call(PATIENT_VIEW, hook_request("patient-view", "p1", prefetch_for(resources)))


def test_hook_subsumed_code_gets_a_card_and_the_cache_holds(hook_env, caplog):
    env = hook_env(terminology_url=TX)
    with respx.mock(assert_all_mocked=True) as mock:
        route = server(mock)
        [card] = validate_cds_response(call(env, record()).json())
        n = route.call_count
        assert card["indicator"] == "info" and n == 4
        [again] = validate_cds_response(call(env, record()).json())
        assert again["indicator"] == "info" and route.call_count == n
    assert "terminology.consulted" in caplog.text and UNKNOWN_CANCER not in caplog.text


def test_hook_without_the_url_asks_nothing(hook_env):
    env = hook_env()
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as mock:
        route = server(mock)
        response = call(env, record())
    assert response.status_code == 200 and validate_cds_response(response.json()) == []
    assert route.call_count == 0


@pytest.mark.parametrize("failure", ["HTTP 500", "over the budget", "not JSON"])
def test_hook_failure_answers_the_local_card_within_the_bound(hook_env, caplog, failure):
    env = hook_env(terminology_url=TX, terminology_budget_seconds=0.4, terminology_timeout_seconds=0.3)
    resources = record("254837009", condition("other", SNOMED, UNKNOWN_OTHER))
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as mock:  # a cancelled call is not counted
        server(mock, **FAILURES[failure])
        started = time.monotonic()
        response = call(env, resources)
        elapsed = time.monotonic() - started
    assert response.status_code == 200 and elapsed < 0.4 + 0.6
    [card] = validate_cds_response(response.json())
    assert card["indicator"] == "info"  # routine: what the local sets say
    assert "terminology.not_consulted" in caplog.text and UNKNOWN_OTHER not in caplog.text


def test_the_same_answers_give_the_same_terminology_object(mock):
    """The core caches by the terminology's identity (facts.py text sieve): one extension, one object."""
    server(mock)
    terminology = tx()
    first, second = terminology.consult_sync(record()), terminology.consult_sync(record())
    assert first.terminology is second.terminology is not load_terminology()
    assert first.terminology.cancer.include.contains(SNOMED, UNKNOWN_CANCER)
    assert terminology.consult_sync(record("254837009")).terminology is load_terminology()
