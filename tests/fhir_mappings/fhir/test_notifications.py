"""fhir_mappings.fhir.notifications: every notification in ../shared/data/subscriptions/ parsed, with the
action each one calls for; the R4B and classic shapes; malformed input refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_mappings.fhir.notifications import (NotificationError, event_key, missing_event_numbers, parse_notification,
                                         parse_resource, parse_rest_hook, parse_status_bundle, ping,
                                         relative_reference, version_key)
from tests.support.paths import SHARED

SUBS = SHARED / "data" / "subscriptions"
ENCOUNTER = "Encounter/86009987-eabe-42bf-8c02-b112b18cb616"
PATIENT = "Patient/1599eb66-431a-447c-a3de-6897fe9ae9a1"


def load(name: str) -> dict:
    path = SUBS / name
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return json.loads(path.read_text())


def summary(note) -> dict:
    return {"kind": note.kind, "subscription": note.subscription, "events": note.event_numbers,
            "work": [("evaluate", w.patient) if w.patient else ("resolve", w.focus) if w.resolve
                     else ("catch-up", w.event_number) for w in note.work()]}


# The action each example calls for. "record": control traffic, no evaluation. "evaluate": the
# payload names the patient (full resource, or a Patient among the included resources). "resolve":
# id-only, the focus must be read to learn whose it is. "catch-up": empty payload, ask the server.
CASES = {
    # HL7 Subscriptions R5 Backport IG, compiled R4 examples
    "backport-ig/Bundle-r4-notification-handshake.json": ("handshake", "Subscription/admission", [], []),
    "backport-ig/Bundle-r4-notification-heartbeat.json": ("heartbeat", "Subscription/admission", [], []),
    "backport-ig/Bundle-r4-notification-empty.json":
        ("event-notification", "Subscription/admission", [2], [("catch-up", 2)]),
    "backport-ig/Bundle-r4-notification-empty-with-auth.json":
        ("event-notification", "Subscription/admission", [2], [("catch-up", 2)]),
    "backport-ig/Bundle-r4-notification-id-only.json":
        ("event-notification", "Subscription/admission", [2], [("resolve", (ENCOUNTER,))]),
    "backport-ig/Bundle-r4-notification-id-only-with-auth.json":
        ("event-notification", "Subscription/admission", [2], [("resolve", (ENCOUNTER,))]),
    "backport-ig/Bundle-r4-notification-id-only-with-query.json":
        ("event-notification", "Subscription/admission", [2], [("resolve", (ENCOUNTER,))]),
    "backport-ig/Bundle-r4-notification-full-resource.json":
        ("event-notification", "Subscription/admission", [2], [("evaluate", PATIENT)]),
    "backport-ig/Bundle-r4-notification-full-resource-with-query.json":
        ("event-notification", "Subscription/admission", [2], [("evaluate", PATIENT)]),
    "backport-ig/Bundle-r4-notification-multi-resource.json":
        ("event-notification", "Subscription/admission", [2], [("evaluate", PATIENT)]),
    "backport-ig/Bundle-r4-notification-error.json": ("query-status", "Subscription/admission", [], []),
    # Inferno subscriptions test kit fixtures
    "inferno/handshake_bundle_example.json": ("handshake", "Subscription/123", [], []),
    "inferno/heartbeat_bundle_example.json": ("heartbeat", "Subscription/123", [], []),
    "inferno/empty_notification_bundle_example.json":
        ("event-notification", "Subscription/123", [1], [("catch-up", 1)]),
    "inferno/id_only_notification_bundle_example.json":
        ("event-notification", "Subscription/123", [1], [("resolve", (ENCOUNTER,))]),
    "inferno/full_resource_notification_bundle_example.json":
        ("event-notification", "Subscription/123", [1], [("evaluate", PATIENT)]),
    "inferno/empty_notification_bundle_non_conformant_example.json":
        ("event-notification", "Subscription/admission", [1], [("catch-up", 1)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_shared_notification_parses_to_its_action(name):
    kind, subscription, events, work = CASES[name]
    assert summary(parse_notification(load(name))) == {"kind": kind, "subscription": subscription,
                                                       "events": events, "work": work}


def test_the_shared_folder_holds_no_notification_without_a_case():
    bundles = {f"{p.parent.name}/{p.name}" for p in SUBS.glob("*/*.json")
               if json.loads(p.read_text()).get("resourceType") == "Bundle"
               and json.loads(p.read_text()).get("type") == "history"}
    if not bundles:
        pytest.skip("shared data not found")
    assert bundles == set(CASES)


def test_conformant_examples_raise_no_warning():
    for name in CASES:
        if "non_conformant" not in name:
            assert parse_notification(load(name)).warnings == [], name


def test_the_non_conformant_inferno_example_is_handled_not_refused():
    """Inferno's empty_notification_bundle_non_conformant_example.json differs from the conformant
    empty example only in that its first entry has no `request` and `response`. R4 Bundle invariants
    bdl-3/bdl-4 require both in a history Bundle, and the IG wants the first to be the GET of
    Subscription/{id}/$status; Inferno's notification_conformance_verification.rb fails it for
    exactly that ("The `entry.request` field is mandatory for history Bundles").

    We handle it (200, the event is acted on) rather than answer 400, because nothing we read is
    missing: the SubscriptionStatus (subscription, status, type, event number 1) is complete and valid.
    A 400 would make the server retry the same bytes and then set the Subscription to `error`, losing
    this event and the ones after it. sekmet-fhir, the server of our end-to-end tests, sends the
    same shape (its notification Bundles' first entry has no request/response). The deviation is
    kept as a warning, which the service logs and audits."""
    note = parse_notification(load("inferno/empty_notification_bundle_non_conformant_example.json"))
    assert note.warnings == ["Bundle.entry[0] lacks request/response (R4 bdl-3/bdl-4, history Bundle)"]
    (item,) = note.work()
    assert item.catch_up and item.event_number == 1
    assert item.keys == (event_key("Subscription/admission", 1),)


def test_error_query_status_reports_the_error_code_and_the_event_count():
    note = parse_notification(load("backport-ig/Bundle-r4-notification-error.json"))
    assert (note.status, note.errors, note.events_since_start, note.is_control) == ("error", ["no-response"], 3, True)


def test_id_only_keeps_focus_and_dedup_key():
    note = parse_notification(load("inferno/id_only_notification_bundle_example.json"))
    (event,) = note.events
    assert (event.number, event.focus, event.timestamp) == (1, ENCOUNTER, "2020-05-29T11:44:13.1882432-05:00")
    assert note.resources == {}  # the id-only entry has a fullUrl and no resource


def test_full_resource_includes_the_resource_and_finds_its_patient():
    note = parse_notification(load("backport-ig/Bundle-r4-notification-multi-resource.json"))
    assert set(note.resources) == {ENCOUNTER, PATIENT}
    assert note.events[0].context == (PATIENT,)


def test_status_parameters_alone_and_the_status_operation_answer():
    (status,) = parse_status_bundle(load("inferno/subscription_status_example.json"))
    assert (status.kind, status.subscription, status.events_since_start) == ("event-notification", "Subscription/123", 2)
    params = load("backport-ig/Parameters-r4-notification-status.json")
    note = parse_notification({"resourceType": "Bundle", "type": "history",
                               "entry": [{"resource": params, "request": {}, "response": {}}]})
    assert note.event_numbers == [2]


# ---------------- shapes from other senders ----------------

def bundle(first: dict, *rest: dict, btype: str = "history") -> dict:
    return {"resourceType": "Bundle", "type": btype,
            "entry": [{"resource": first, "request": {"method": "GET", "url": "x"}, "response": {"status": "200"}},
                      *rest]}


def sekmet_id_only(number: int = 1) -> dict:
    """What sekmet-fhir 0.1.1 sends for an id-only topic event (tests/support/test_sekmet_harness.py)."""
    return {"resourceType": "Bundle", "type": "history", "entry": [{"fullUrl": "urn:uuid:x", "resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": "http://h:1/fhir/Subscription/s1"}},
            {"name": "topic", "valueCanonical": "http://t"}, {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": str(number)},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": str(number)},
                {"name": "focus", "valueReference": {"reference": "http://h:1/fhir/Condition/c9"}},
                {"name": "additional-context", "valueReference": {"reference": "http://h:1/fhir/Patient/p7"}}]}]}}]}


def test_sekmet_id_only_names_the_patient_in_additional_context():
    note = parse_notification(sekmet_id_only(4))
    assert note.warnings  # no request/response on the first entry, as Inferno's non-conformant one
    (item,) = note.work()
    assert (item.patient, item.focus, item.keys) == ("Patient/p7", ("Condition/c9",), ("event:Subscription/s1:4",))


def test_r4b_subscription_status_first_entry():
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": "event-notification",
              "eventsSinceSubscriptionStart": "7", "subscription": {"reference": "Subscription/s2"},
              "notificationEvent": [{"eventNumber": "7", "focus": {"reference": "Observation/o1/_history/3"}}]}
    obs = {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "3"}, "subject": {"reference": "Patient/p1"}}
    note = parse_notification(bundle(status, {"fullUrl": "Observation/o1", "resource": obs,
                                               "request": {"method": "PUT", "url": "Observation/o1"},
                                               "response": {"status": "200"}}))
    (item,) = note.work()
    assert item.patient == "Patient/p1"
    assert item.keys == ("event:Subscription/s2:7", version_key("Observation/o1", "3"))


def test_camel_case_parameter_names_and_integer_numbers_are_accepted():
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": "Subscription/s"}},
        {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": "heartbeat"},
        {"name": "eventsSinceSubscriptionStart", "valueInteger": 12}]}
    assert parse_notification(bundle(params)).events_since_start == 12


def test_classic_rest_hook_payload_and_empty_body():
    cond = {"resourceType": "Condition", "id": "c1", "meta": {"versionId": "2"}, "subject": {"reference": "Patient/p"}}
    (item,) = parse_rest_hook("Condition", "c1", cond).work()
    assert (item.patient, item.keys, item.focus) == ("Patient/p", ("version:Condition/c1:2",), ("Condition/c1",))
    (item,) = parse_rest_hook("Condition", "c1", None).work()
    assert item.resolve and item.focus == ("Condition/c1",) and item.keys == ()
    (item,) = parse_resource(cond).work()  # POSTed to the endpoint itself
    assert item.patient == "Patient/p"
    (item,) = ping().work()
    assert item.catch_up and item.keys == ()


def test_version_from_last_updated_when_there_is_no_version_id():
    cond = {"resourceType": "Condition", "id": "c1", "meta": {"lastUpdated": "2026-01-01T00:00:00Z"},
            "subject": {"reference": "Patient/p"}}
    (item,) = parse_rest_hook("Condition", "c1", cond).work()
    assert item.keys == ("updated:Condition/c1:2026-01-01T00:00:00Z",)


@pytest.mark.parametrize("rtype, rid, body, reason", [
    ("condition", "c1", None, "path"),
    ("Condition", "c 1", None, "path"),
    ("Condition", "c1", {"resourceType": "Observation", "id": "c1"}, "resourceType differs"),
    ("Condition", "c1", {"resourceType": "Condition", "id": "c2"}, "id differs"),
    ("Condition", "c1", ["not", "a", "resource"], "no resourceType"),
])
def test_rest_hook_mismatches_are_refused(rtype, rid, body, reason):
    with pytest.raises(NotificationError, match=reason):
        parse_rest_hook(rtype, rid, body)


def _params(*drop: str, **override) -> dict:
    base = {"subscription": {"valueReference": {"reference": "Subscription/s"}}, "status": {"valueCode": "active"},
            "type": {"valueCode": "event-notification"},
            "notification-event": {"part": [{"name": "event-number", "valueString": "1"}]}}
    base |= override
    return {"resourceType": "Parameters", "parameter": [{"name": k, **v} for k, v in base.items() if k not in drop]}


@pytest.mark.parametrize("body, reason", [
    ({"resourceType": "Patient"}, "Patient payload without a valid id"),
    ({"resourceType": "Bundle", "type": "history", "entry": []}, "no entries"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"fullUrl": "x"}]}, "no resource"),
    (bundle({"resourceType": "Patient", "id": "p"}), "must be a Parameters"),
    (bundle(_params("type")), "type must be one of"),
    (bundle(_params(type={"valueCode": "gossip"})), "type must be one of"),
    (bundle(_params("subscription")), "must reference a Subscription"),
    (bundle(_params(subscription={"valueReference": {"reference": "Patient/x"}})), "must reference a Subscription"),
    (bundle(_params(**{"notification-event": {"part": [{"name": "event-number", "valueString": "-3"}]}})),
     "event-number must be a non-negative integer"),
    (bundle(_params(**{"notification-event": {"part": [{"name": "focus", "valueReference": {"reference": "urn:uuid:1"}}]}})),
     "not a literal reference"),
    (bundle(_params(**{"events-since-subscription-start": {"valueString": "many"}})), "must be a non-negative integer"),
])
def test_malformed_notifications_are_refused_with_a_reason(body, reason):
    with pytest.raises(NotificationError, match=reason):
        parse_resource(body)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["resourceType", "entry", "resource", "parameter", "name", "part", "type",
                                         "valueCode", "valueReference", "reference", "valueString"]), inner, max_size=4),
                    max_leaves=20))
def test_any_json_either_parses_or_raises_notification_error(body):
    try:
        note = parse_resource(body)
    except NotificationError:
        return
    note.work()  # and what parsed can be acted on


# ---------------- references and event numbers ----------------

@pytest.mark.parametrize("reference, expected", [
    ("Patient/123", ("Patient/123", None)),
    ("https://x.org/fhir/Encounter/e-1/_history/4", ("Encounter/e-1", "4")),
    ("http://h:8080/fhir/Condition/c.1/", ("Condition/c.1", None)),
    ("urn:uuid:9e41ff6d", None),
    ("#contained", None),
    (None, None),
])
def test_relative_reference(reference, expected):
    assert relative_reference(reference) == expected


@pytest.mark.parametrize("highest, numbers, since_start, missing", [
    (None, [7], 7, []),  # first contact: nothing known to be missing
    (0, [1], 1, []),
    (3, [4, 5], 5, []),
    (3, [6], 6, [4, 5]),
    (3, [4, 6], 6, [5]),
    (5, [4], 5, []),  # late arrival of an earlier event
    (5, [], 8, [6, 7, 8]),  # heartbeat says 8 events happened
    (5, [], 5, []),
])
def test_missing_event_numbers(highest, numbers, since_start, missing):
    assert missing_event_numbers(highest, numbers, since_start) == missing
