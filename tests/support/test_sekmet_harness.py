"""The sekmet harness against the real server: CRUD + search, classic rest-hook and R5-Backport
topic notifications delivered to a receiver on 127.0.0.1. The asserted shapes are the ones
docs/sekmet.md documents; if sekmet changes them, this file says where."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import httpx
import pytest

from tests.support.sekmet_server import SekmetServer  # fixture `sekmet_server`: tests/conftest.py plugin

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
BUILTIN_TOPICS = {f"http://sekmet.dev/fhir/SubscriptionTopic/{n}" for n in (
    "encounter-start", "encounter-complete", "diagnosticreport-final", "servicerequest-new",
    "appointment-booked", "patient-change")}


# ---------------- a tiny notification receiver ----------------

class Receiver:
    """Records every request sent to http://127.0.0.1:{port}/...; answers `status`."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with receiver._cond:
                    receiver.requests.append({"method": self.command, "path": self.path,
                                              "headers": {k.lower(): v for k, v in self.headers.items()},
                                              "body": body})
                    receiver._cond.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _handle

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = 5.0, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [r for r in self.requests if pred(r)]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(r["method"], r["path"]) for r in self.requests]
                    raise AssertionError(f"no matching notification within {timeout} s; received {seen}")
                self._cond.wait(left)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def bundle_params(req: dict) -> dict:
    """First entry of a backport notification Bundle (a Parameters) as {name: value-or-parts}."""
    bundle = json.loads(req["body"])
    out: dict = {}
    for p in bundle["entry"][0]["resource"]["parameter"]:
        value = p.get("part") or next(v for k, v in p.items() if k.startswith("value"))
        out.setdefault(p["name"], []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def is_backport(kind: str) -> Callable[[dict], bool]:
    def pred(r: dict) -> bool:
        try:
            return bundle_params(r)["type"] == kind
        except (ValueError, KeyError, IndexError, TypeError):
            return False
    return pred


# ---------------- fixtures ----------------

@pytest.fixture
def fhir(sekmet_server: SekmetServer) -> Iterator[httpx.Client]:
    with sekmet_server.client() as client:
        yield client


@pytest.fixture
def receiver(sekmet_server: SekmetServer) -> Iterator[Receiver]:
    r = Receiver()
    yield r
    # a dead endpoint would stall sekmet's shared delivery pool for everyone else
    sekmet_server.delete_subscriptions()
    r.close()


@pytest.fixture
def patient(fhir: httpx.Client) -> dict:
    r = fhir.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Harness"}]})
    assert r.status_code == 201, r.text
    return r.json()


def condition(pid: str, text: str = "Low back pain") -> dict:
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"}, "code": {"text": text}}


def subscription_status(fhir: httpx.Client, sid: str) -> dict:
    return fhir.get(f"/Subscription/{sid}").json()


def wait_status(fhir: httpx.Client, sid: str, status: str, timeout: float = 3.0) -> dict:
    deadline = time.monotonic() + timeout
    while (sub := subscription_status(fhir, sid))["status"] != status and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sub["status"] == status, sub
    return sub


# ---------------- server basics ----------------

def test_server_is_fhir_r4_with_backport_topics(sekmet_server: SekmetServer, fhir: httpx.Client) -> None:
    assert sekmet_server.base_url.startswith("http://127.0.0.1:")
    assert sekmet_server.base_url.endswith("/fhir")
    cs = fhir.get("/metadata").json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["implementation"]["url"] == sekmet_server.base_url
    sub = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Subscription")
    assert sub["supportedProfile"] == [f"{BP}/backport-subscription"]
    topics = {e["valueCanonical"] for e in sub["extension"]
              if e["url"] == f"{BP}/capabilitystatement-subscriptiontopic-canonical"}
    assert BUILTIN_TOPICS <= topics  # no Condition / Observation topic among them
    assert {"name": "status", "definition":
            "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status"
            } in sub["operation"]


def test_create_and_search_conditions(sekmet_server: SekmetServer, fhir: httpx.Client, patient: dict) -> None:
    base, pid = sekmet_server.base_url, patient["id"]
    created = []
    for text in ("Low back pain", "Carcinoma of prostate", "Night pain"):
        r = fhir.post("/Condition", json=condition(pid, text))
        assert r.status_code == 201
        assert r.headers["Location"] == f"{base}/Condition/{r.json()['id']}/_history/1"
        created.append(r.json()["id"])

    bundle = fhir.get("/Condition", params={"patient": pid}).json()
    assert bundle["type"] == "searchset" and bundle["total"] == 3
    assert [e["resource"]["id"] for e in bundle["entry"]] == created  # default order: write order
    assert fhir.get("/Condition", params={"patient": f"Patient/{pid}"}).json()["total"] == 3

    # paging: absolute next links built from _count/_offset
    seen, url = [], f"{base}/Condition?patient={pid}&_count=2"
    while url:
        page = httpx.get(url, headers={"Accept": FHIR_JSON}).json()
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
        url = next((l["url"] for l in page["link"] if l["relation"] == "next"), None)
        assert url is None or "_offset=" in url
    assert seen == created

    # _lastUpdated compares at the instant's millisecond precision
    last = fhir.get(f"/Condition/{created[-1]}").json()["meta"]["lastUpdated"]
    hits = fhir.get("/Condition", params={"patient": pid, "_lastUpdated": f"ge{last}"}).json()
    assert created[-1] in [e["resource"]["id"] for e in hits["entry"]]

    # unknown search parameters are ignored with a warning unless Prefer: handling=strict
    lenient = fhir.get("/Condition", params={"patient": pid, "nonsense": "1"})
    assert lenient.status_code == 200 and lenient.json()["total"] == 3
    assert lenient.json()["entry"][-1]["search"]["mode"] == "outcome"
    strict = fhir.get("/Condition", params={"patient": pid, "nonsense": "1"},
                      headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400


def test_conditional_create(fhir: httpx.Client) -> None:
    ident = {"system": "urn:spinewatch:test", "value": f"mrn-{time.time_ns()}"}
    body = {"resourceType": "Patient", "identifier": [ident]}
    query = {"If-None-Exist": f"identifier={ident['system']}|{ident['value']}"}
    first = fhir.post("/Patient", json=body, headers=query)
    again = fhir.post("/Patient", json=body, headers=query)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


# ---------------- classic R4 rest-hook ----------------

def test_classic_rest_hook_with_payload_puts_resource(fhir: httpx.Client, receiver: Receiver,
                                                      patient: dict) -> None:
    pid = patient["id"]
    r = fhir.post("/Subscription", json={
        "resourceType": "Subscription", "status": "requested", "reason": "harness",
        "criteria": f"Condition?patient=Patient/{pid}",
        "channel": {"type": "rest-hook", "endpoint": f"{receiver.url}/notify", "payload": FHIR_JSON,
                    "header": ["Authorization: Bearer harness-token", "X-SpineWatch-Test: classic"]}})
    assert r.status_code == 201
    sid = r.json()["id"]
    assert r.json()["status"] == "requested"  # the response echoes the request ...
    assert subscription_status(fhir, sid)["status"] == "active"  # ... activation already happened

    cond = fhir.post("/Condition", json=condition(pid)).json()
    (note,) = receiver.wait_for(lambda q: q["path"] == f"/notify/Condition/{cond['id']}")
    assert note["method"] == "PUT"
    assert note["headers"]["content-type"] == "application/fhir+json; charset=utf-8"
    assert note["headers"]["authorization"] == "Bearer harness-token"
    assert note["headers"]["x-spinewatch-test"] == "classic"
    assert json.loads(note["body"]) == cond  # the full stored resource, meta included

    cond["code"]["text"] = "Low back pain, worse at night"
    updated = fhir.put(f"/Condition/{cond['id']}", json=cond).json()
    receiver.wait_for(lambda q: q["path"] == f"/notify/Condition/{cond['id']}", count=2)
    assert json.loads(receiver.requests[-1]["body"])["meta"]["versionId"] == updated["meta"]["versionId"] == "2"


def test_classic_rest_hook_without_payload_posts_empty_ping(fhir: httpx.Client, receiver: Receiver,
                                                            patient: dict) -> None:
    pid = patient["id"]
    fhir.post("/Subscription", json={
        "resourceType": "Subscription", "status": "requested", "reason": "harness",
        "criteria": f"Condition?patient=Patient/{pid}",
        "channel": {"type": "rest-hook", "endpoint": f"{receiver.url}/ping/",
                    "header": ["X-SpineWatch-Test: ping"]}}).raise_for_status()
    fhir.post("/Condition", json=condition(pid)).raise_for_status()
    (note,) = receiver.wait_for(lambda q: True)
    assert (note["method"], note["path"], note["body"]) == ("POST", "/ping", b"")  # trailing slash dropped
    assert note["headers"]["x-spinewatch-test"] == "ping"
    assert "content-type" not in note["headers"]


# ---------------- R5 Backport (topic-based) ----------------

def backport_subscription(topic: str, endpoint: str, content: str, **extra) -> dict:
    sub = {"resourceType": "Subscription", "meta": {"profile": [f"{BP}/backport-subscription"]},
           "status": "requested", "reason": "harness", "criteria": topic,
           "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": FHIR_JSON,
                       "_payload": {"extension": [{"url": f"{BP}/backport-payload-content", "valueCode": content}]},
                       "header": ["Authorization: Bearer harness-token"]}}
    for key, value in extra.items():
        sub[key] = value
    return sub


def test_backport_handshake_event_heartbeat_and_status(sekmet_server: SekmetServer, fhir: httpx.Client,
                                                       receiver: Receiver) -> None:
    topic = "http://sekmet.dev/fhir/SubscriptionTopic/patient-change"
    sub = backport_subscription(topic, f"{receiver.url}/bp", "id-only")
    sub["channel"]["extension"] = [{"url": f"{BP}/backport-heartbeat-period", "valueUnsignedInt": 1}]
    sid = fhir.post("/Subscription", json=sub).json()["id"]

    (hs,) = receiver.wait_for(is_backport("handshake"))
    assert hs["method"] == "POST" and hs["path"] == "/bp"
    assert hs["headers"]["content-type"] == "application/fhir+json; charset=utf-8"
    assert hs["headers"]["authorization"] == "Bearer harness-token"
    bundle = json.loads(hs["body"])
    assert bundle["type"] == "history" and len(bundle["entry"]) == 1
    assert bundle["entry"][0]["resource"]["resourceType"] == "Parameters"
    assert bundle_params(hs) == {
        "subscription": {"reference": f"{sekmet_server.base_url}/Subscription/{sid}"},
        "topic": topic, "status": "requested", "type": "handshake", "events-since-subscription-start": "0"}
    # active only once the handshake POST has returned 2xx; events before that are dropped, not queued
    wait_status(fhir, sid, "active")

    pat = fhir.post("/Patient", json={"resourceType": "Patient"}).json()
    (ev,) = receiver.wait_for(is_backport("event-notification"))
    params = bundle_params(ev)
    assert params["status"] == "active" and params["events-since-subscription-start"] == "1"
    parts = {p["name"]: next(v for k, v in p.items() if k.startswith("value"))
             for p in params["notification-event"]}
    assert parts["event-number"] == "1"
    assert parts["focus"] == {"reference": f"{sekmet_server.base_url}/Patient/{pat['id']}"}
    assert len(json.loads(ev["body"])["entry"]) == 1  # id-only: no resource entry

    receiver.wait_for(is_backport("heartbeat"), timeout=4)

    status = fhir.get(f"/Subscription/{sid}/$status").json()
    assert status["type"] == "searchset"
    st = {p["name"]: next(v for k, v in p.items() if k.startswith("value"))
          for p in status["entry"][0]["resource"]["parameter"]}
    assert (st["type"], st["status"], st["events-since-subscription-start"]) == ("query-status", "active", "1")
    assert fhir.get(f"/Subscription/{sid}/$events").status_code == 404  # $events is not implemented


def test_backport_custom_condition_topic_full_resource(sekmet_server: SekmetServer, fhir: httpx.Client,
                                                       receiver: Receiver, patient: dict) -> None:
    topic = f"http://spinewatch.test/SubscriptionTopic/condition-{time.time_ns()}"
    sekmet_server.add_topic(topic, "Condition", filters=["patient"])
    assert topic in json.dumps(fhir.get("/metadata").json())
    pid = patient["id"]
    sub = backport_subscription(topic, f"{receiver.url}/bp", "full-resource", _criteria={"extension": [
        {"url": f"{BP}/backport-filter-criteria", "valueString": f"Condition?patient=Patient/{pid}"}]})
    sid = fhir.post("/Subscription", json=sub).json()["id"]
    receiver.wait_for(is_backport("handshake"))
    wait_status(fhir, sid, "active")

    fhir.post("/Condition", json=condition("someone-else")).raise_for_status()  # filtered out
    cond = fhir.post("/Condition", json=condition(pid)).json()
    (ev,) = receiver.wait_for(is_backport("event-notification"))
    parts = {p["name"]: next(v for k, v in p.items() if k.startswith("value"))
             for p in bundle_params(ev)["notification-event"]}
    assert parts["focus"]["reference"] == f"{sekmet_server.base_url}/Condition/{cond['id']}"
    assert parts["additional-context"]["reference"] == f"{sekmet_server.base_url}/Patient/{pid}"
    entry = json.loads(ev["body"])["entry"][1]
    assert entry["fullUrl"] == f"{sekmet_server.base_url}/Condition/{cond['id']}"
    assert entry["resource"] == cond
    assert entry["request"] == {"method": "PUT", "url": f"Condition/{cond['id']}"}
    time.sleep(0.3)
    assert len([r for r in receiver.requests if is_backport("event-notification")(r)]) == 1


# ---------------- delivery failure ----------------

def test_failed_delivery_is_retried_then_subscription_goes_to_error(fhir: httpx.Client, receiver: Receiver,
                                                                    patient: dict) -> None:
    receiver.status = 503
    pid = patient["id"]
    sid = fhir.post("/Subscription", json={
        "resourceType": "Subscription", "status": "requested", "reason": "harness",
        "criteria": f"Condition?patient=Patient/{pid}",
        "channel": {"type": "rest-hook", "endpoint": f"{receiver.url}/down", "payload": FHIR_JSON}}).json()["id"]
    cond = fhir.post("/Condition", json=condition(pid)).json()
    receiver.wait_for(lambda q: True, count=3, timeout=6)  # attempts at ~0, 1, 3 s
    sub = wait_status(fhir, sid, "error", timeout=8)  # after a further 4 s back-off: ~7 s in all
    assert sub["error"] == f"Delivery to {receiver.url}/down/Condition/{cond['id']} failed: HTTP 503"
    assert len(receiver.requests) == 3
    fhir.post("/Condition", json=condition(pid)).raise_for_status()
    time.sleep(0.5)
    assert len(receiver.requests) == 3  # an errored Subscription gets nothing more
