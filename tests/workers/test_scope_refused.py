"""On a FHIR server that enforces the SMART scopes it granted (tests/support/enforced_scopes.py, driving
the real FHIRClient and SMART Backend Services auth; a real redis-server; the real Celery task run
eagerly), the default scope lets every worker call through: the record (Binary and a deleted
resource's history included), the alert's Communication search and create, the watchdog, catch-up
and reconciliation. The old default (`system/*.read system/Subscription.write`) cannot create a
Communication: the alert fails at once, not after five retries, with the scope it needed in the
dead letter, the audit log, the metric, /readyz and `spinewatch check-config`; never the token.
The last test runs the same against the Medplum stand-in (tests/support/medplum.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime, timedelta, timezone

import jwt
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from fhir_mappings.fhir.bundle import read_path
from service.cli.main import app as cli
from service.core.settings import Settings
from service.infra import config_problems
from service.infra.assessments import AssessmentStore
from service.infra.audit.store import AuditStore
from service.infra.audit.writer import AuditLog
from service.infra.dead_letters import DeadLetters
from service.infra.fhir.sync import FHIRClient
from service.infra.queue import WorkQueue, redis_client
from service.infra.redis import redis_client as bytes_redis_client
from service.usecases.readiness import configuration_check
from tests.support.enforced_scopes import EnforcedScopeServer
from tests.support.medplum import MedplumStandIn
from tests.support.paths import ROOT
from workers import pipeline, tasks
from workers.alerts import AlertFailed, ClientAdapter, alert_if_needed
from workers.celery_app import create_celery_app

BASE = "https://ehr.example/fhir"
TOKEN_URL = "https://ehr.example/oauth2/token"
NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)  # the example's dates are recent then
PATIENT = "Patient/example-emergency"
OLD_DEFAULT = "system/*.read system/Subscription.write"
REFUSED = "Communication create refused (403): the token needs system/Communication.c"
NOTE = {"resourceType": "DocumentReference", "id": "note-1", "status": "current", "date": "2026-05-31T09:00:00Z",
        "subject": {"reference": PATIENT},
        "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/b1"}}]}
BINARY = {"resourceType": "Binary", "id": "b1", "contentType": "text/plain",
          "data": base64.b64encode(b"Thoracic back pain for two weeks.").decode()}
CARE_TEAM = {"resourceType": "CareTeam", "id": "ct1", "status": "active", "subject": {"reference": PATIENT},
             "participant": [{"member": {"reference": "Practitioner/oncologist"}}]}


@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture
def key_path(key, tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return str(path)


def record() -> list[dict]:
    return read_path(str(ROOT / "examples" / "emergency-breast-cancer-leg-weakness.json")) + [CARE_TEAM, NOTE, BINARY]


def record_as_of(now: datetime) -> list[dict]:
    """record() with its recent dates as recent at `now` as at NOW (a server that stamps
    meta.lastUpdated with the real time makes the record's time the real one)."""
    text = json.dumps(record())
    for old in ("2026-05-10", "2026-05-28T09:30:00Z", "2026-05-31T09:00:00Z"):
        when = now - (NOW - datetime.fromisoformat(old.replace("Z", "+00:00")).replace(tzinfo=timezone.utc))
        text = text.replace(old, when.strftime("%Y-%m-%dT%H:%M:%SZ" if "T" in old else "%Y-%m-%d"))
    return json.loads(text)


class World:
    """Settings, collaborators and the audit store of one worker process, on `base`."""

    def __init__(self, redis_url: str, tmp_path, key_path: str, base: str = BASE, token_url: str = TOKEN_URL, **kw):
        self.settings = Settings(environment="test", fhir_base_url=base, redis_url=redis_url, fhir_auth="smart-backend",
                                 smart_client_id="spinewatch", smart_token_url=token_url,
                                 smart_private_key_path=key_path, coalesce_seconds=0, task_max_retries=5,
                                 task_retry_backoff_seconds=0.01, audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite",
                                 **kw)
        self.store = AuditStore(self.settings.audit_db_url)
        self.redis = redis_client(redis_url, timeout=5)
        self.c = pipeline.Collaborators(self.settings, FHIRClient.from_settings(self.settings),
                                        WorkQueue(self.settings, self.redis), AssessmentStore(self.redis),
                                        AuditLog(self.settings, store=self.store), bytes_redis_client(redis_url, 5.0))

    def evaluate_task(self, monkeypatch, now: datetime = NOW):
        """The real Celery task, run eagerly (a retry runs again at once, whatever its countdown)."""
        monkeypatch.setattr(tasks, "_now", lambda: now)
        app = create_celery_app(self.settings)
        app.use_collaborators(self.c)
        return app.tasks[tasks.evaluate_patient.name].apply(kwargs={"patient": PATIENT})

    def audits(self, kind: str) -> list:
        return self.store.query(kinds=[kind], newest_first=False)[0]

    def close(self) -> None:
        self.c.fhir.close()
        self.c.alert_redis.close()
        self.redis.close()
        self.store.dispose()


@pytest.fixture
def world(redis_url, tmp_path, key_path):
    made: list[World] = []

    def make(**kw) -> World:
        made.append(World(redis_url, tmp_path, key_path, **kw))
        return made[-1]
    yield make
    for w in made:
        w.close()


def problems_counted() -> float:
    return REGISTRY.get_sample_value("spinewatch_configuration_problems_total", {"kind": "fhir-scope"}) or 0.0


# ---------------- the default scope: every call passes ----------------

@pytest.mark.parametrize("semantics", ["spec", "medplum"])
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_with_the_default_scope_the_record_and_the_alert_pass(world, monkeypatch, semantics, version):
    with respx.mock(assert_all_called=False) as router:
        server = EnforcedScopeServer(router, BASE, TOKEN_URL, semantics=semantics)
        server.load(*record())
        w = world(smart_scope_version=version)
        result = w.evaluate_task(monkeypatch)
        w.c.fhir.get("Condition/breast-cancer/_history", params={"_count": "10"}, what="history")  # a delete's
    assert result.successful() and result.result == "emergency", result.result
    assert server.refused == []
    assert {"GET Patient/example-emergency", "GET Binary/b1", "GET CareTeam", "GET Communication",
            "POST Communication", "GET Condition/breast-cancer/_history"} <= set(server.requests)
    assert [c["recipient"] for c in server.of_type("Communication")] == [[{"reference": "Practitioner/oncologist"}]]
    assert [a.outcome for a in w.audits("alert")] == ["success"]


@pytest.mark.parametrize("semantics", ["spec", "medplum"])
def test_with_the_default_scope_the_watchdog_catch_up_and_reconciliation_pass(world, semantics):
    subscription = {"resourceType": "Subscription", "id": "s1", "status": "error", "criteria": "Condition?",
                    "channel": {"type": "rest-hook", "endpoint": "https://spinewatch.test/fhir/notifications"}}
    with respx.mock(assert_all_called=False) as router:
        server = EnforcedScopeServer(router, BASE, TOKEN_URL, semantics=semantics)
        server.load(*record(), subscription)
        w = world()
        w.c.queue.track_subscription("Subscription/s1", kind="backport", reset=True)  # last heard from: now
        later = datetime.now(timezone.utc) + timedelta(hours=1)
        (report,) = pipeline.watchdog(w.c, later)
        caught_up = pipeline.catch_up(w.c, "Subscription/s1", [1, 2], None, False, later)
        swept = pipeline.reconcile(w.c, later, "test")
    assert server.refused == []
    assert report["action"] == "re-requested" and report["status_operation"] == "unavailable"
    assert caught_up["swept"] and swept == [PATIENT]
    assert {"GET Subscription/s1", "GET Subscription/s1/$status", "PUT Subscription/s1",
            "GET Subscription/s1/$events"} <= set(server.requests)


# ---------------- the old default: a configuration problem, said once, with the scope ----------------

@pytest.mark.parametrize("semantics", ["spec", "medplum"])
def test_with_the_old_default_the_alert_fails_at_once_naming_the_scope_it_needed(world, monkeypatch, semantics):
    counted = problems_counted()
    with respx.mock(assert_all_called=False) as router:
        server = EnforcedScopeServer(router, BASE, TOKEN_URL, semantics=semantics)
        server.load(*record())
        w = world(smart_scope=OLD_DEFAULT)
        result = w.evaluate_task(monkeypatch)
    assert result.failed() and isinstance(result.result, AlertFailed) and result.result.message == REFUSED
    assert server.refused == ["POST Communication"]  # asked once: no retry can help, none was made
    assert server.requests.count("GET Patient/example-emergency") == 1  # the evaluation was not run again

    (letter,) = DeadLetters(w.redis).entries()
    assert (letter["error"], letter["message"], letter["retries"]) == ("AlertFailed", REFUSED, 0)
    (failure,) = w.audits("alert")
    assert failure.outcome == "failure"
    assert (failure.detail["needed_scope"], failure.detail["retryable"]) == ("system/Communication.c", False)
    (dead,) = w.audits("dead-letter")
    assert (dead.detail["configuration_problem"], dead.detail["needed_scope"]) == \
        ("fhir-scope", "system/Communication.c")
    assert problems_counted() == counted + 1

    problem = config_problems.last(w.redis)
    assert {k: problem[k] for k in ("kind", "interaction", "needed_scope", "message", "task")} == {
        "kind": "fhir-scope", "interaction": "Communication create", "needed_scope": "system/Communication.c",
        "message": REFUSED, "task": tasks.evaluate_patient.name}
    assert 0 < w.redis.ttl(config_problems.KEY) <= config_problems.PROBLEM_TTL_SECONDS

    ready = asyncio.run(configuration_check(w.settings.redis_url, 2.0)())
    assert ready["warning"] == REFUSED and ready["last_problem"]["needed_scope"] == "system/Communication.c"
    monkeypatch.setenv("SPINEWATCH_REDIS_URL", w.settings.redis_url)
    shown = CliRunner().invoke(cli, ["check-config"]).output
    assert f"evaluate_patient): {REFUSED}" in shown

    issued = list(server.tokens)
    said = json.dumps([letter, failure.detail, dead.detail, problem, ready]) + shown
    assert issued and not any(token in said for token in issued)


def test_no_problem_recorded_means_nothing_to_show(world):
    w = world()
    assert asyncio.run(configuration_check(w.settings.redis_url, 2.0)()) == {}
    assert config_problems.last(w.redis) is None


@pytest.mark.parametrize("scope, said", [
    ("system/Patient.r system/CareTeam.s system/Communication.c",
     "Communication search refused (403): the token needs system/Communication.s"),
    ("system/Patient.r system/Communication.cs", "CareTeam search refused (403): the token needs system/CareTeam.s"),
])
def test_each_refused_alert_interaction_is_named(world, scope, said):
    from fhir_mappings.clinical.evaluate import assess

    with respx.mock(assert_all_called=False) as router:
        server = EnforcedScopeServer(router, BASE, TOKEN_URL)
        server.load(*record())
        w = world(smart_scope=scope)
        with pytest.raises(AlertFailed) as caught:
            alert_if_needed(assess(record(), NOW), w.settings, fhir=ClientAdapter(w.c.fhir),
                            redis_client=w.c.alert_redis, audit=w.c.audit, now=NOW)
    assert caught.value.message == said
    assert w.audits("alert")[0].detail["needed_scope"] == said.rsplit(" ", 1)[1]


# ---------------- the Medplum stand-in ----------------

@pytest.mark.integration
@pytest.mark.parametrize("scope", [None, OLD_DEFAULT], ids=["default", "old-default"])
def test_against_the_medplum_stand_in_the_default_scope_alerts_and_the_old_one_names_the_scope(
        world, monkeypatch, key, scope):
    """The real evaluation task against the stand-in with enforced scopes: the record is read with
    either scope; the alert's Communication is written with the default one, and with the old one
    the task fails at once naming the scope it needed (one refused POST, no retries)."""
    public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "k1", "alg": "RS384"}
    with MedplumStandIn(auth_required=True, time_scale=1e-3) as medplum:
        medplum.register_client("spinewatch", jwks={"keys": [public]})
        now = datetime.now(timezone.utc)  # the stand-in stamps meta.lastUpdated with the real time
        medplum.preload(*record_as_of(now))
        w = world(base=medplum.base_url, token_url=medplum.token_url, smart_key_id="k1", smart_scope=scope)
        result = w.evaluate_task(monkeypatch, now)
        written = medplum.search("Communication")
    if scope is None:
        assert result.successful() and result.result == "emergency", result.result
        assert [c["recipient"] for c in written] == [[{"reference": "Practitioner/oncologist"}]]
    else:
        assert result.failed() and isinstance(result.result, AlertFailed) and result.result.message == REFUSED
        assert written == []
        assert w.audits("alert")[0].detail["needed_scope"] == "system/Communication.c"
        assert DeadLetters(w.redis).entries()[0]["retries"] == 0


def test_a_note_binary_our_scopes_do_not_allow_is_a_configuration_problem_not_a_silent_miss(world, monkeypatch):
    """The note's Binary refused (403) for want of Binary read: the evaluation still runs on the rest
    and names the note unread, and the refusal is recorded as the configuration problem it is (a
    note-only emergency would otherwise be missed with nothing said to whoever runs SpineWatch)."""
    from service.infra.fhir.auth import requested_scope

    counted = problems_counted()
    w0 = world()
    without_binary = " ".join(s for s in requested_scope(w0.settings).split() if not s.startswith("system/Binary."))
    with respx.mock(assert_all_called=False) as router:
        server = EnforcedScopeServer(router, BASE, TOKEN_URL)
        server.load(*record())
        w = world(smart_scope=without_binary)
        result = w.evaluate_task(monkeypatch)
    assert result.successful() and server.refused == ["GET Binary"]  # the stand-in names the type
    (evaluation,) = w.audits("evaluation")
    assert evaluation.detail["problems"] >= 1 and evaluation.detail["tier"] == "emergency"
    problem = config_problems.last(w.redis)
    assert (problem["kind"], problem["needed_scope"], problem["task"]) == \
        ("fhir-scope", "system/Binary.r", tasks.evaluate_patient.name)
    assert problems_counted() == counted + 1
    assert DeadLetters(w.redis).entries() == []
