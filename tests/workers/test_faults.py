"""Faults, with real processes: a real redis-server (append-only file, fsync always), real
`spinewatch worker` and `spinewatch serve` processes, and a FHIR server on a socket whose failures the
test sets (tests/support/fault_stack.py).

    worker pool process SIGKILLed mid-task     task requeued (reject_on_worker_lost), done, one alert
    worker main process SIGKILLed mid-task     task restored after the visibility timeout, done after
                                               the restart, one alert
    Redis killed with work queued              the append-only file keeps it; the worker finds it
    Redis restarted under a running worker     the worker reconnects and goes on
    Redis killed while a task runs             the worker survives (workers/broker.py), both tasks done
    Redis down while notifications arrive      503 at once; the server's retry is accepted and done
    a task message lost by the broker          the watchdog sends the evaluation again
    FHIR server failing / hung / slow          bounded retries, then the dead-letter list; slow is fine
    patient-view with a hung or failing        412 within SPINEWATCH_HOOK_TIMEOUT_SECONDS, never a hang
    fhirServer

Every bound a test waits for is stated next to it (BOUND_*), and the time it took is printed
(`pytest -s` shows them; docs/resilience.md lists them).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.support import cds_hooks as ch
from tests.support.fault_stack import FhirStub, Stack, wait_for

pytestmark = [pytest.mark.integration]

VISIBILITY = 10  # SPINEWATCH_BROKER_VISIBILITY_TIMEOUT_SECONDS in the stack (fault_stack.stack_env)
RESTORE_SWEEP = 10  # kombu's unacked_restore_interval: how often a worker restores expired unacked tasks
BOUND_REQUEUE = 20.0  # pool process killed: requeued at once, a new pool process runs it
BOUND_RESTORE = VISIBILITY + RESTORE_SWEEP + 15.0  # main process killed: visibility timeout + one sweep + start
BOUND_EVALUATE = 20.0  # notification accepted -> assessment stored, worker up
BOUND_503 = 5.0  # Redis down -> the notifier hears 503 within this
BOUND_DEAD_LETTER = 25.0  # 3 attempts x 2 s FHIR timeout + backoff + task start
HOOK_BUDGET = 2.0  # SPINEWATCH_HOOK_TIMEOUT_SECONDS in the stack (2 s: the slow case must fit on 2 busy CPUs)


def timed(what: str, started: float) -> float:
    took = time.monotonic() - started
    print(f"[faults] {what}: {took:.1f} s")
    return took


@pytest.fixture(scope="module")
def issuer():
    return ch.Issuer("https://ehr.faults.example.org")


@pytest.fixture(scope="module")
def hook_fhir():
    """The CDS client's fhirServer (not the workers' FHIR server), hung or failing on demand."""
    stub = FhirStub(max_hang=30)
    yield stub
    stub.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, issuer, hook_fhir):
    run_dir = tmp_path_factory.mktemp("faults")
    jwks = run_dir / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks))
    fhir = FhirStub()
    env = {"SPINEWATCH_CDS_TRUSTED_ISSUERS": json.dumps({issuer.iss: str(jwks)}),
           "SPINEWATCH_FHIR_ALLOWED_HOSTS": f"{fhir.host},{hook_fhir.host}",
           "SPINEWATCH_HOOK_TIMEOUT_SECONDS": str(HOOK_BUDGET)}
    with Stack(run_dir, env=env, fhir=fhir) as s:
        yield s


@pytest.fixture(autouse=True)
def healthy(stack):
    """Each test starts with Redis up, a worker running and no fault injected, and leaves it so."""
    if stack.redis.proc is None:
        stack.redis.start()
    if stack.worker is None or stack.worker.proc.poll() is not None:
        stack.start_worker()
    yield
    stack.fhir.clear_faults()


def accepted(stack: Stack, rtype: str, rid: str, timeout: float = 15.0) -> int:
    """Deliver like a FHIR server: retry until 2xx. Returns how many 503s it took."""
    refusals = 0

    def deliver() -> bool:
        nonlocal refusals
        response = stack.notify_resource(rtype, rid, timeout=5)
        if response.status_code == 503:
            refusals += 1
            time.sleep(0.2)
            return False
        assert response.status_code == 200, response.text
        return True

    wait_for(deliver, timeout, f"{rtype}/{rid} to be accepted")
    return refusals


def one_alert(stack: Stack, pid: str) -> None:
    comms = wait_for(lambda: stack.fhir.communications(pid), 15, f"the alert for {pid}")
    time.sleep(0.5)  # a second one would be written right after the first
    comms = stack.fhir.communications(pid)
    assert len(comms) == 1, f"{len(comms)} Communications for Patient/{pid}: the care team alerted more than once"
    alerts = [r for r in stack.audit_records("alert", f"Patient/{pid}") if r.outcome == "success"]
    assert len(alerts) == 1, f"{len(alerts)} successful alert audit records"


# ---------------------------------------------------------------- workers killed


@pytest.mark.slow
def test_a_worker_pool_process_killed_mid_task_requeues_it_and_alerts_once(stack):
    pid = stack.patient("emergency")
    stack.fhir.hang(f"Patient/{pid}")  # the task's first read hangs: it is running when killed
    assert accepted(stack, "Observation", f"neuro-{pid}") == 0
    wait_for(lambda: stack.fhir.count(f"GET Patient/{pid}") >= 1, BOUND_EVALUATE, "the task to start")
    main_pid = stack.worker.proc.pid
    killed = stack.kill_worker_children()
    assert killed, "the worker has no pool processes to kill"
    started = time.monotonic()
    stack.fhir.release()
    record = wait_for(lambda: stack.stored(pid), BOUND_REQUEUE, "the requeued task to store the assessment")
    timed("pool process killed -> assessment stored", started)
    assert record["urgency"] == "emergency"
    assert stack.fhir.count(f"GET Patient/{pid}") >= 2, "the task did not run again"
    assert stack.worker.proc.poll() is None and stack.worker.proc.pid == main_pid
    assert set(stack.worker_children()).isdisjoint(killed), "the pool was not replenished"
    one_alert(stack, pid)


@pytest.mark.slow
def test_a_worker_main_process_killed_mid_task_completes_after_restart_and_alerts_once(stack):
    pid = stack.patient("urgent")
    stack.fhir.hang(f"Patient/{pid}")
    assert accepted(stack, "Condition", f"back-pain-{pid}") == 0
    wait_for(lambda: stack.fhir.count(f"GET Patient/{pid}") >= 1, BOUND_EVALUATE, "the task to start")
    stack.kill_worker(whole_group=True)  # main process and pool at once: a crashed host or container
    started = time.monotonic()
    stack.fhir.release()
    time.sleep(1)
    assert stack.stored(pid) is None, "nothing should have finished the task: every worker process is dead"
    unacked = stack.redis_client().hlen("unacked")
    assert unacked >= 1, "the running task is not held as unacknowledged in Redis"
    stack.start_worker()
    record = wait_for(lambda: stack.stored(pid), BOUND_RESTORE,
                      f"the task to be restored (visibility timeout {VISIBILITY} s) and done by the new worker",
                      interval=0.2)
    timed("main process killed -> assessment stored after restart", started)
    assert record["urgency"] == "urgent"
    one_alert(stack, pid)


# ---------------------------------------------------------------- Redis restarted


@pytest.mark.slow
def test_queued_work_survives_a_redis_kill_thanks_to_the_append_only_file(stack):
    stack.stop_worker()  # nothing consumes: the work stays on the queue
    patients = {tier: stack.patient(tier) for tier in ("emergency", "urgent", "routine")}
    for pid in patients.values():
        assert accepted(stack, "Condition", f"back-pain-{pid}") == 0
    r = stack.redis_client()
    queued = r.llen("celery")
    assert queued == 3, f"expected 3 queued evaluations, found {queued}"
    os.kill(stack.redis.proc.pid, signal.SIGKILL)  # no shutdown save: only the append-only file remains
    stack.redis.proc.wait(5)
    stack.redis.proc = None
    stack.redis.start()
    assert stack.redis_client().llen("celery") == 3, "queued work was lost with the Redis restart"
    started = time.monotonic()
    stack.start_worker()
    for tier, pid in patients.items():
        record = wait_for(lambda: stack.stored(pid), BOUND_EVALUATE, f"the {tier} patient evaluated")
        assert record["urgency"] == tier
    timed("Redis SIGKILLed with 3 queued -> all 3 evaluated", started)
    one_alert(stack, patients["emergency"])
    one_alert(stack, patients["urgent"])
    assert stack.fhir.communications(patients["routine"]) == []  # routine does not alert


@pytest.mark.slow
def test_a_redis_restart_under_a_running_worker_and_api_does_not_hang_them(stack):
    stack.redis.restart()  # SIGTERM: every client connection is cut
    started = time.monotonic()
    pid = stack.patient("emergency")
    refusals = accepted(stack, "Observation", f"neuro-{pid}")
    record = wait_for(lambda: stack.stored(pid), BOUND_EVALUATE,
                      "the worker to reconnect to the restarted Redis and evaluate", interval=0.2)
    timed(f"Redis restarted -> next notification evaluated ({refusals} x 503 first)", started)
    assert record["urgency"] == "emergency"
    one_alert(stack, pid)


@pytest.mark.slow
def test_a_redis_restart_while_a_task_runs_does_not_kill_the_worker(stack):
    """kombu 5.7 crashed the worker here ("Unrecoverable error: AttributeError: 'NoneType' object has
    no attribute 'hostname'" while restoring its unacknowledged messages): workers/broker.py."""
    running = stack.patient("emergency")
    stack.fhir.hang(f"Patient/{running}")
    assert accepted(stack, "Observation", f"neuro-{running}") == 0
    wait_for(lambda: stack.fhir.count(f"GET Patient/{running}") >= 1, BOUND_EVALUATE, "the task to start")
    worker_pid = stack.worker.proc.pid
    os.kill(stack.redis.proc.pid, signal.SIGKILL)
    stack.redis.proc.wait(5)
    stack.redis.proc = None
    stack.redis.start()
    started = time.monotonic()
    stack.fhir.release()
    record = wait_for(lambda: stack.stored(running), BOUND_EVALUATE, "the running task to complete or be redone")
    assert record["urgency"] == "emergency"
    nxt = stack.patient("urgent")
    assert accepted(stack, "Condition", f"back-pain-{nxt}") == 0
    wait_for(lambda: stack.stored(nxt), BOUND_EVALUATE, "the worker to go on after the Redis restart")
    timed("Redis SIGKILLed mid-task -> both tasks done", started)
    assert stack.worker.proc.poll() is None and stack.worker.proc.pid == worker_pid, \
        "the worker process died with the Redis restart:\n" + stack.worker.log_tail(20)
    one_alert(stack, running)
    one_alert(stack, nxt)


def test_redis_down_while_a_notification_arrives_is_503_then_delivered_on_retry(stack):
    pid = stack.patient("emergency")
    stack.redis.stop()
    try:
        started = time.monotonic()
        response = stack.notify_resource("Observation", f"neuro-{pid}", timeout=BOUND_503 + 5)
        took = timed("Redis down -> 503", started)
        assert response.status_code == 503, response.text
        assert response.json()["issue"][0]["code"] == "transient"
        assert took < BOUND_503
        assert stack.http.get(stack.api_url + "/readyz").status_code == 503
    finally:
        stack.redis.start()
    refusals = accepted(stack, "Observation", f"neuro-{pid}")  # the FHIR server's retry
    record = wait_for(lambda: stack.stored(pid), BOUND_EVALUATE, "the retried notification evaluated")
    assert record["urgency"] == "emergency"
    print(f"[faults] retry accepted after {refusals} more 503s")
    one_alert(stack, pid)


def test_an_evaluation_the_broker_lost_is_sent_again_by_the_watchdog(stack):
    """kombu's Redis transport pops a message with BRPOP: a worker SIGKILLed, or Redis crashing, as
    the message is handed over loses it (bench/soak.py found it). The patient's "queued" marker then
    swallowed every later event for PENDING_SECONDS; now the heartbeat watchdog sends again an
    evaluation queued and never started (service/infra/queue.py recover_pending)."""
    from service.infra.queue import WorkQueue
    from service.core.settings import Settings

    stack.stop_worker()
    pid = stack.patient("emergency")
    assert accepted(stack, "Observation", f"neuro-{pid}") == 0
    r = stack.redis_client()
    assert r.llen("celery") == 1
    r.delete("celery")  # the lost message
    stack.fhir.put(stack.fhir.resources[("Observation", f"neuro-{pid}")])  # a later change of the patient
    assert accepted(stack, "Observation", f"neuro-{pid}") == 0
    assert r.llen("celery") == 0, "the later event should have been coalesced into the (lost) evaluation"
    stack.start_worker()
    time.sleep(1.0)
    assert stack.stored(pid) is None
    queue = WorkQueue(Settings(environment="test", redis_url=stack.redis.url,
                               audit_db_url=stack.env["SPINEWATCH_AUDIT_DB_URL"]))
    assert queue.recover_pending(late_seconds=60) == []  # not late yet: a long queue is not a loss
    assert queue.recover_pending(late_seconds=0) == [f"Patient/{pid}"]  # what the watchdog does, 60 s on
    record = wait_for(lambda: stack.stored(pid), BOUND_EVALUATE, "the evaluation sent again")
    assert record["urgency"] == "emergency"
    assert record["seen"][f"Observation/neuro-{pid}"] == "2", "the recovered evaluation must read the later change"
    assert queue.recover_pending(late_seconds=0) == [], "started: nothing left to recover"
    one_alert(stack, pid)


# ---------------------------------------------------------------- the FHIR server misbehaves


def _dead_letter_for(stack: Stack, pid: str) -> list[dict]:
    return [d for d in stack.dead_letters() if d["kwargs"].get("patient") == f"Patient/{pid}"]


def test_a_failing_fhir_server_means_bounded_retries_then_a_dead_letter(stack):
    pid = stack.patient("emergency")
    stack.fhir.always_fail[f"Patient/{pid}"] = 503
    started = time.monotonic()
    assert accepted(stack, "Observation", f"neuro-{pid}") == 0
    [entry] = wait_for(lambda: _dead_letter_for(stack, pid), BOUND_DEAD_LETTER, "the dead letter")
    timed("FHIR 503 -> dead letter", started)
    assert (entry["error"], entry["retries"]) == ("FHIRServerError", 2)
    assert stack.fhir.count(f"GET Patient/{pid}") == 3, "expected the first try and exactly 2 retries"
    assert stack.stored(pid) is None and stack.fhir.communications(pid) == []
    assert [r.detail["task"] for r in stack.audit_records("dead-letter", f"Patient/{pid}")] == \
        ["spinewatch.evaluate_patient"]


def test_a_hung_fhir_server_times_out_and_ends_in_the_dead_letter_list(stack):
    pid = stack.patient("emergency")
    stack.fhir.hang(f"Patient/{pid}")
    started = time.monotonic()
    assert accepted(stack, "Observation", f"neuro-{pid}") == 0
    [entry] = wait_for(lambda: _dead_letter_for(stack, pid), BOUND_DEAD_LETTER, "the dead letter")
    timed("FHIR hung -> dead letter", started)
    assert (entry["error"], entry["retries"]) == ("FHIRTransportError", 2)
    assert stack.fhir.count(f"GET Patient/{pid}") == 3
    assert stack.stored(pid) is None and stack.fhir.communications(pid) == []


def test_a_slow_fhir_server_is_waited_for(stack):
    pid = stack.patient("emergency")
    stack.fhir.delay[""] = 0.15  # every request, each well inside the 2 s timeout
    assert accepted(stack, "Observation", f"neuro-{pid}") == 0
    record = wait_for(lambda: stack.stored(pid), BOUND_EVALUATE + 10, "the slow evaluation")
    assert record["urgency"] == "emergency"
    assert not _dead_letter_for(stack, pid)
    one_alert(stack, pid)


# ---------------------------------------------------------------- patient-view with a bad fhirServer


def _patient_view(stack: Stack, issuer, fhir_base: str, pid: str):
    path = f"/cds-services/{ch.PATIENT_VIEW}"
    body = ch.hook_request("patient-view", pid, fhirServer=fhir_base,
                           fhirAuthorization={"access_token": "hook-access-token", "token_type": "Bearer",
                                              "expires_in": 300, "scope": "patient/*.read", "subject": "spinewatch"})
    started = time.monotonic()
    response = stack.http.post(stack.api_url + path, json=body, headers=issuer.auth(stack.api_url + path),
                               timeout=HOOK_BUDGET + 10)
    return response, time.monotonic() - started


@pytest.mark.parametrize("fault", ["hung", "failing", "slow but within budget"])
def test_patient_view_answers_within_its_budget_whatever_the_fhir_server_does(stack, issuer, hook_fhir, fault):
    pid = "p-hook-" + fault.split()[0]
    hook_fhir.load(ch.record("emergency", pid))
    try:
        if fault == "hung":
            hook_fhir.hang("")
        elif fault == "failing":
            hook_fhir.always_fail[""] = 500
        else:
            hook_fhir.delay[""] = 0.1  # each of the ~7 parallel reads
        response, took = _patient_view(stack, issuer, hook_fhir.base, pid)
    finally:
        hook_fhir.clear_faults()
    print(f"[faults] patient-view, fhirServer {fault}: HTTP {response.status_code} in {took * 1000:.0f} ms")
    assert took < HOOK_BUDGET + 1.0, f"patient-view took {took:.2f} s with a {fault} fhirServer"
    if fault == "slow but within budget":
        assert response.status_code == 200, response.text
        [card] = ch.validate_cds_response(response.json())
        assert card["indicator"] == "critical"
    else:
        assert response.status_code == 412, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        assert "hook-access-token" not in response.text
