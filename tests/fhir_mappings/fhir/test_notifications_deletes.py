"""fhir_mappings.fhir.notifications: deletes in every server's shape, Medplum's headers, and the
de-duplication keys of a delete. The shapes:

- Medplum 4.5.2: POST {endpoint} with the two bytes `{}`, X-Medplum-Interaction: delete,
  X-Medplum-Deleted-Resource: Type/id (plus X-Medplum-Subscription and x-trace-id);
- HAPI FHIR classic rest-hook with a payload: DELETE {endpoint}/{type}/{id}, no body;
- HAPI FHIR topic-based (backport IG, R4): a history Bundle whose focus entry has request
  DELETE Type/id and no resource."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_mappings.fhir.notifications import (Delivery, NotificationError, delete_key, delivery_headers,
                                              parse_notification, parse_post, parse_rest_hook, version_key)

SUB_ID = "8cb7d041-5805-4ed0-9e3a-d81f7d906ada"
TRACE = "14b9cebc-7a0f-48a6-869f-cfe2fee9858d"


def medplum(interaction: str = "create", deleted: str | None = None, **extra) -> dict[str, str]:
    headers = {"Content-Type": "application/fhir+json", "X-Medplum-Subscription": SUB_ID,
               "X-Medplum-Interaction": interaction, "Authorization": "Bearer capture-secret",
               "x-trace-id": TRACE, "User-Agent": "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)"}
    if deleted is not None:
        headers["X-Medplum-Deleted-Resource"] = deleted
    return headers | extra


def work(note) -> list[tuple]:
    return [(w.keys, w.patient, w.focus, w.resolve, w.deleted) for w in note.work()]


CONDITION = {"resourceType": "Condition", "id": "c1", "meta": {"versionId": "3"},
             "subject": {"reference": "Patient/p1"}}


# ---------------- Medplum's headers ----------------

def test_medplum_headers_name_the_subscription_the_interaction_and_the_trace():
    assert delivery_headers(medplum()) == Delivery(subscription=f"Subscription/{SUB_ID}", interaction="create",
                                                   deleted=None, trace=TRACE, warnings=())


def test_header_names_are_case_insensitive_and_values_trimmed():
    headers = {"x-medplum-subscription": f" {SUB_ID} ", "X-MEDPLUM-INTERACTION": "Delete",
               "x-medplum-deleted-resource": "Condition/c1", "X-Trace-Id": TRACE}
    assert delivery_headers(headers) == Delivery(f"Subscription/{SUB_ID}", "delete", "Condition/c1", TRACE, ())


def test_no_headers_is_an_empty_delivery():
    assert delivery_headers({}) == Delivery()


@pytest.mark.parametrize("name, value", [
    ("X-Medplum-Subscription", "Subscription/abc"),  # Medplum sends the bare id
    ("X-Medplum-Subscription", "not an id"),
    ("X-Medplum-Subscription", "x" * 65),
    ("X-Medplum-Interaction", "purge"),
    ("x-trace-id", "has spaces in it"),
    ("x-trace-id", "t" * 129),
])
def test_an_unusable_header_is_ignored_with_a_warning_that_names_it_not_its_value(name, value):
    delivery = delivery_headers(medplum() | {name: value})
    field = {"X-Medplum-Subscription": "subscription", "X-Medplum-Interaction": "interaction",
             "x-trace-id": "trace"}[name]
    assert getattr(delivery, field) is None
    assert delivery.warnings == (f"{name} header ignored (not a valid value)",)
    assert value not in delivery.warnings[0]


@pytest.mark.parametrize("value", ["Condition", "condition/c1", "Condition/", "Condition/c 1",
                                   "http://ehr/fhir/Condition/c1", "Condition/c1/_history/2", "", "Condition/" + "x" * 65])
def test_a_malformed_deleted_resource_header_is_refused_naming_the_header(value):
    with pytest.raises(NotificationError) as caught:
        delivery_headers(medplum("delete", value))
    assert str(caught.value) == "the X-Medplum-Deleted-Resource header must be a reference Type/id"


# ---------------- Medplum deliveries (POST to the endpoint itself) ----------------

@pytest.mark.parametrize("body", [{}, None])  # `{}` as Medplum sends it; an empty body the same
def test_medplum_delete_names_the_deleted_resource_to_be_resolved(body):
    note = parse_post(body, delivery_headers(medplum("delete", "Condition/c1")))
    assert (note.kind, note.subscription, note.interaction, note.trace, note.deleted, note.warnings) == (
        "rest-hook", f"Subscription/{SUB_ID}", "delete", TRACE, ["Condition/c1"], [])
    assert work(note) == [((f"deleted:Condition/c1:trace:{TRACE}",), None, ("Condition/c1",), True, True)]


def test_a_delete_without_version_or_trace_has_no_key_so_a_later_delete_is_not_dropped():
    note = parse_post({}, Delivery(interaction="delete", deleted="Condition/c1"))
    assert work(note) == [((), None, ("Condition/c1",), True, True)]


def test_a_delete_carrying_the_last_version_names_its_patient_and_is_not_that_versions_update():
    delete = parse_post(CONDITION, delivery_headers(medplum("delete", "Condition/c1")))
    update = parse_post(CONDITION, delivery_headers(medplum("update")))
    assert work(delete) == [(("deleted:Condition/c1:3",), "Patient/p1", ("Condition/c1",), False, True)]
    assert work(update) == [((version_key("Condition/c1", "3"),), "Patient/p1", ("Condition/c1",), False, False)]
    assert delete_key("Condition/c1", "3") != version_key("Condition/c1", "3")


def test_a_delete_interaction_with_the_resource_but_no_deleted_header_deletes_that_resource():
    note = parse_post(CONDITION, Delivery(interaction="delete"))
    assert note.deleted == ["Condition/c1"] and note.interaction == "delete"


def test_a_delete_whose_body_is_another_resource_is_refused():
    with pytest.raises(NotificationError, match="resourceType differs from X-Medplum-Deleted-Resource"):
        parse_post(CONDITION, delivery_headers(medplum("delete", "Observation/c1")))
    with pytest.raises(NotificationError, match="id differs from X-Medplum-Deleted-Resource"):
        parse_post(CONDITION, delivery_headers(medplum("delete", "Condition/c2")))


def test_medplum_create_takes_the_subscription_from_its_header():
    note = parse_post(CONDITION, delivery_headers(medplum("create")))
    assert (note.kind, note.subscription, note.interaction, note.trace, note.deleted) == (
        "rest-hook", f"Subscription/{SUB_ID}", "create", TRACE, [])
    assert work(note) == [((version_key("Condition/c1", "3"),), "Patient/p1", ("Condition/c1",), False, False)]


def test_an_empty_object_without_delete_headers_is_a_ping():
    """`{}` names no resource. Refused, Medplum would retry it for about 73 hours and learn nothing;
    read as a rest-hook ping, the reconciliation sweep finds whatever changed."""
    note = parse_post({}, delivery_headers(medplum("update")))
    assert note.kind == "ping" and note.subscription == f"Subscription/{SUB_ID}"
    assert note.warnings == ["an empty JSON object without a delete header: read as a ping"]
    assert [w.catch_up for w in note.work()] == [True]


def test_a_delete_interaction_without_the_deleted_resource_is_a_ping():
    note = parse_post({}, Delivery(interaction="delete"))
    assert note.kind == "ping"
    assert note.warnings == ["X-Medplum-Interaction: delete without X-Medplum-Deleted-Resource: read as a ping"]


def test_the_bodys_subscription_wins_over_a_contradicting_header():
    bundle = _backport([("5", "Condition/c1", None)], [])
    note = parse_post(bundle, Delivery(subscription="Subscription/other"))
    assert note.subscription == "Subscription/s1"
    assert note.warnings[-1] == "X-Medplum-Subscription differs from the notification's subscription: ignored"


# ---------------- on the path {type}/{id}: HAPI's DELETE, Medplum's headers ----------------

@pytest.mark.parametrize("body", [None, {}])
def test_http_delete_on_the_path_deletes_the_paths_resource(body):
    note = parse_rest_hook("Condition", "c1", body, Delivery(interaction="delete"))
    assert note.deleted == ["Condition/c1"] and note.subscription is None
    assert work(note) == [((), None, ("Condition/c1",), True, True)]


def test_medplum_delete_headers_on_the_path_must_name_the_path():
    note = parse_rest_hook("Condition", "c1", {}, delivery_headers(medplum("delete", "Condition/c1")))
    assert work(note) == [((f"deleted:Condition/c1:trace:{TRACE}",), None, ("Condition/c1",), True, True)]
    with pytest.raises(NotificationError, match="X-Medplum-Deleted-Resource header differs from the path"):
        parse_rest_hook("Condition", "c1", {}, delivery_headers(medplum("delete", "Condition/c2")))


def test_an_empty_object_on_the_path_names_the_resource_like_an_empty_body():
    assert work(parse_rest_hook("Observation", "o1", {})) == work(parse_rest_hook("Observation", "o1", None)) == [
        ((), None, ("Observation/o1",), True, False)]


# ---------------- backport IG notifications for deletes ----------------

def _backport(events, entries, sub="Subscription/s1") -> dict:
    params = [{"name": "subscription", "valueReference": {"reference": f"http://ehr/fhir/{sub}"}},
              {"name": "topic", "valueCanonical": "http://ehr/topic/condition"},
              {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": "event-notification"},
              {"name": "events-since-subscription-start", "valueString": events[-1][0]}]
    for number, focus, patient in events:
        parts = [{"name": "event-number", "valueString": number},
                 {"name": "focus", "valueReference": {"reference": focus}}]
        if patient:
            parts.append({"name": "additional-context", "valueReference": {"reference": patient}})
        params.append({"name": "notification-event", "part": parts})
    status = {"fullUrl": "urn:uuid:s", "resource": {"resourceType": "Parameters", "parameter": params},
              "request": {"method": "GET", "url": f"{sub}/$status"}, "response": {"status": "200"}}
    return {"resourceType": "Bundle", "type": "history", "entry": [status, *entries]}


def hapi_delete_entry(reference: str) -> dict:
    """BundleBuilder.addTransactionDeleteEntry: request DELETE Type/id, no resource."""
    return {"request": {"method": "DELETE", "url": reference}, "response": {"status": "204"}}


def test_hapi_topic_delete_is_a_deleted_focus_without_resource():
    note = parse_notification(_backport([("5", "Condition/c1", None)], [hapi_delete_entry("Condition/c1")]))
    assert note.deleted == ["Condition/c1"] and note.warnings == []
    assert work(note) == [(("event:Subscription/s1:5",), None, ("Condition/c1",), True, True)]


def test_a_backport_delete_naming_the_patient_is_evaluated_for_that_patient():
    note = parse_notification(_backport([("5", "http://ehr/fhir/Condition/c1", "http://ehr/fhir/Patient/p1")],
                                        [hapi_delete_entry("http://ehr/fhir/Condition/c1")]))
    assert work(note) == [(("event:Subscription/s1:5",), "Patient/p1", ("Condition/c1",), False, True)]


def test_a_full_resource_delete_with_the_last_version_finds_the_patient_in_it():
    entry = {"fullUrl": "http://ehr/fhir/Condition/c1", "resource": CONDITION,
             "request": {"method": "DELETE", "url": "Condition/c1"}, "response": {"status": "204"}}
    note = parse_notification(_backport([("6", "Condition/c1", None)], [entry]))
    assert work(note) == [(("event:Subscription/s1:6",), "Patient/p1", ("Condition/c1",), False, True)]


def test_in_a_batch_only_the_deleted_focus_is_a_delete():
    entries = [hapi_delete_entry("Condition/c1"),
               {"fullUrl": "http://ehr/fhir/Condition/c2", "request": {"method": "PUT", "url": "Condition/c2"},
                "response": {"status": "200"}}]
    note = parse_notification(_backport([("7", "Condition/c1", None), ("8", "Condition/c2", None)], entries))
    assert [(w.focus, w.deleted) for w in note.work()] == [(("Condition/c1",), True), (("Condition/c2",), False)]


@pytest.mark.parametrize("entry", [
    {"fullUrl": "http://ehr/fhir/Condition/c1", "request": {"method": "GET", "url": "Condition/c1"},
     "response": {"status": "200"}},  # id-only: a GET, no resource
    {"request": {"method": "DELETE", "url": "Condition/c9"}, "response": {"status": "204"}},  # another resource
    {"request": "DELETE Condition/c1", "response": {}},  # not a request element
])
def test_only_a_delete_request_for_the_focus_makes_it_a_delete(entry):
    assert parse_notification(_backport([("5", "Condition/c1", None)], [entry])).deleted == []


def test_r4b_subscription_status_delete():
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": "event-notification",
              "subscription": {"reference": "Subscription/s1"}, "topic": "http://ehr/topic/condition",
              "notificationEvent": [{"eventNumber": "3", "focus": {"reference": "Condition/c1"}}]}
    bundle = {"resourceType": "Bundle", "type": "history",
              "entry": [{"resource": status, "request": {"method": "GET", "url": "Subscription/s1/$status"},
                         "response": {"status": "200"}}, hapi_delete_entry("Condition/c1")]}
    assert work(parse_notification(bundle)) == [(("event:Subscription/s1:3",), None, ("Condition/c1",), True, True)]


# ---------------- anything else ----------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
HEADER_VALUES = st.sampled_from(["", "delete", "create", "Condition/c1", SUB_ID, "a b", "Patient/p1", "x" * 70])


@settings(max_examples=300, deadline=None)
@given(body=JSON, headers=st.dictionaries(st.sampled_from(["X-Medplum-Subscription", "X-Medplum-Interaction",
                                                          "X-Medplum-Deleted-Resource", "x-trace-id"]),
                                          HEADER_VALUES, max_size=4))
def test_any_body_with_any_headers_parses_or_raises_notification_error(body, headers):
    try:
        note = parse_post(body, delivery_headers(headers))
        note.work()
        parse_rest_hook("Condition", "c1", body, delivery_headers(headers)).work()
    except NotificationError as exc:
        # the reason names the part, never a header's value
        assert not any(v in str(exc) for v in headers.values() if len(v) > 6), exc
