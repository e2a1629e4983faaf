"""order-select / order-sign: a plain spine X-ray among the draft orders of a patient with cancer
and back pain gets a warning card that replaces it with a whole-spine MRI (NG234: X-ray must not be
used to diagnose or exclude spinal metastases)."""

from __future__ import annotations

import pytest
import respx

from tests.support.cds_hooks import (ORDER_IMAGING, ORDER_SERVICES, ORDER_SIGN, PATIENT_VIEW, draft_bundle,
                                     hook_request, make_env, mri_order, prefetch_for, record, reset_audit,
                                     unrelated_order, validate_cds_response, xray_order)


@pytest.fixture
def env(tmp_path):
    env = make_env(tmp_path)
    yield env
    reset_audit()


def order_body(hook: str, drafts: list[dict], tier: str = "routine", selections: list[str] | None = None,
               prefetch: dict | None | str = "record") -> dict:
    context = {"draftOrders": draft_bundle(*drafts)}
    if hook == "order-select":
        context["selections"] = selections if selections is not None else \
            [f"{d['resourceType']}/{d['id']}" for d in drafts]
    return hook_request(hook, prefetch=prefetch_for(record(tier)) if prefetch == "record" else prefetch,
                        context=context)


def order_call(env, hook: str, drafts: list[dict], tier: str = "routine", service: str | None = None, **kw):
    """The hook called on its own service (or on `service`); its cards, validated."""
    response = env.call(service or ORDER_SERVICES[hook], order_body(hook, drafts, tier, **kw))
    assert response.status_code == 200, response.text
    return validate_cds_response(response.json())


HOOKS = ["order-select", "order-sign"]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("tier", ["emergency", "urgent", "routine"])
def test_spine_xray_for_an_in_scope_patient_gets_a_card_following_the_tier(env, hook, tier):
    """Every in-scope tier gets the X-ray card, and it follows the tier: critical and 24 h
    for suspected cord compression, warning and 1 week for urgent, info for routine."""
    [card] = order_call(env, hook, [xray_order(), unrelated_order()], tier)
    assert card["indicator"] == {"emergency": "critical", "urgent": "warning", "routine": "info"}[tier]
    assert "X-ray cannot exclude metastasis" in card["summary"]
    within = {"emergency": "within 24 h", "urgent": "within 1 week"}.get(tier)
    if within:
        assert within in card["summary"] and within in card["detail"] and within in card["suggestions"][0]["label"]
    assert "30-50 %" in card["detail"]  # why an X-ray cannot exclude metastasis
    [suggestion] = card["suggestions"]
    assert card["selectionBehavior"] == "at-most-one" and suggestion["isRecommended"] is True
    [update] = suggestion["actions"]  # the draft X-ray becomes the MRI in place (the sandbox applies only update)
    assert update["type"] == "update"
    mri = update["resource"]
    assert mri["id"] == "xr-1"
    # NG234 1.4, QS56 statement 3 and the CDS Hooks 2.0 Card (corrected): no contrast for suspected MSCC.
    expected = {"emergency": "36531-2"}.get(tier, "36400-0")
    assert mri["resourceType"] == "ServiceRequest" and mri["code"]["coding"][0]["code"] == expected
    assert mri["intent"] == "order"  # the replacement is an order, like the X-ray it replaces
    assert mri["subject"] == {"reference": "Patient/p1"}
    assert mri["priority"] == {"emergency": "stat", "urgent": "urgent", "routine": "routine"}[tier]


@pytest.mark.parametrize("hook", HOOKS)
def test_no_card_when_an_mri_is_already_among_the_drafts(env, hook):
    assert order_call(env, hook, [xray_order(), mri_order()], "emergency") == []


@pytest.mark.parametrize("hook", HOOKS)
def test_no_card_for_unrelated_drafts(env, hook):
    assert order_call(env, hook, [unrelated_order()], "emergency") == []


@pytest.mark.parametrize("hook", HOOKS)
def test_no_card_for_an_mri_draft_alone(env, hook):
    assert order_call(env, hook, [mri_order()], "urgent") == []


@pytest.mark.parametrize("hook", HOOKS)
def test_no_card_for_a_patient_out_of_scope(env, hook):
    assert order_call(env, hook, [xray_order()], "none") == []


def test_order_select_challenges_only_the_new_selections(env):
    drafts = [xray_order(), unrelated_order()]
    assert order_call(env, "order-select", drafts, "urgent", selections=["MedicationRequest/med-1"]) == []
    [card] = order_call(env, "order-select", drafts, "urgent", selections=["ServiceRequest/xr-1"])
    assert replaced(card) == ["ServiceRequest/xr-1"]


def replaced(card: dict) -> list[str]:
    """The draft orders the suggestion changes into the MRI (update) or removes (delete), in order."""
    return [f"ServiceRequest/{a['resource']['id']}" if a["type"] == "update" else a["resourceId"]
            for a in card["suggestions"][0]["actions"]]


def test_two_draft_xrays_one_becomes_the_mri_the_other_is_removed(env):
    [card] = order_call(env, "order-sign", [xray_order(rid="xr-1"), xray_order(rid="xr-9")], "emergency")
    update, delete = card["suggestions"][0]["actions"]
    assert (update["type"], update["resource"]["id"]) == ("update", "xr-1")
    assert delete == {"type": "delete", "description": delete["description"], "resourceId": "ServiceRequest/xr-9"}


def test_xray_found_by_text_and_body_site(env):
    draft = {"resourceType": "ServiceRequest", "id": "xr-2", "status": "draft", "intent": "order",
             "code": {"text": "Plain radiograph"}, "bodySite": [{"text": "Lumbar spine"}],
             "subject": {"reference": "Patient/p1"}}
    [card] = order_call(env, "order-sign", [draft], "urgent")
    assert replaced(card) == ["ServiceRequest/xr-2"]


def test_nothing_to_challenge_needs_no_data(env):
    """No spine X-ray among the drafts: the answer does not depend on the record, so a call without
    prefetch or fhirServer is a 200 with no cards (not a 412)."""
    with respx.mock(assert_all_called=False) as mock:
        assert order_call(env, "order-sign", [unrelated_order()], prefetch=None) == []
        assert not mock.calls


def test_xray_without_data_is_412(env):
    body = hook_request("order-sign", context={"draftOrders": draft_bundle(xray_order())})
    response = env.call(ORDER_SIGN, body)
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"


def test_xray_card_is_audited(env):
    [card] = order_call(env, "order-sign", [xray_order()], "emergency")
    [audited] = env.audit_records("card")
    assert audited.detail["hook"] == "order-sign" and audited.detail["cards"] == [card["uuid"]]
    assert audited.detail["service"] == ORDER_SIGN


# ---------------------------------------------------------------- service ids


@pytest.mark.parametrize("hook", HOOKS)
def test_the_old_order_id_still_answers_both_hooks_and_is_audited_as_called(env, hook, caplog):
    """EHRs registered with spinewatch-order-imaging keep getting the same card; the audit record
    and the log line name the id they called."""
    [old] = order_call(env, hook, [xray_order()], "urgent", service=ORDER_IMAGING)
    [new] = order_call(env, hook, [xray_order()], "urgent")
    assert (old["summary"], old["indicator"]) == (new["summary"], new["indicator"])
    assert [r.detail["service"] for r in env.audit_records("card")] == [ORDER_IMAGING, ORDER_SERVICES[hook]]
    logged = [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "cds.hook"]
    assert [line["service"] for line in logged] == [ORDER_IMAGING, ORDER_SERVICES[hook]]


@pytest.mark.parametrize("service, hook", [(ORDER_SERVICES["order-select"], "order-sign"),
                                           (ORDER_SERVICES["order-sign"], "order-select"),
                                           (PATIENT_VIEW, "order-sign"), (ORDER_IMAGING, "patient-view")])
def test_a_hook_its_service_does_not_answer_is_400(env, service, hook):
    body = order_body(hook, [xray_order()], "urgent") if hook != "patient-view" else \
        hook_request(hook, prefetch=prefetch_for(record("urgent")))
    response = env.call(service, body)
    assert response.status_code == 400, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"] == f"service {service} does not answer {hook}"
    assert env.audit_records("card") == []


@pytest.mark.parametrize("draft, named", [
    ({"resourceType": "ProcedureRequest", "id": "xr-3", "status": "draft", "intent": "order",
      "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72100"}]},
      "subject": {"reference": "Patient/p1"}}, "ProcedureRequest"),
    ({"resourceType": "DiagnosticOrder", "id": "xr-4", "status": "draft", "subject": {"reference": "Patient/p1"},
      "item": [{"code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72100"}]}}]},
     "DiagnosticOrder"),
])
def test_draft_orders_of_an_earlier_fhir_release_are_412_not_ignored(env, draft, named):
    """Read as R4, a DSTU2/STU3 X-ray order is no ServiceRequest and would never be challenged."""
    response = env.call(ORDER_SIGN, order_body("order-sign", [draft], "urgent"))
    assert response.status_code == 412, response.text
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert diagnostics.startswith("context.draftOrders is not FHIR R4") and named in diagnostics


def test_pending_mri_outside_the_drafts_keeps_the_warning_without_a_new_order(env):
    from datetime import datetime, timezone

    resources = record("urgent") + [{
        "resourceType": "ServiceRequest", "id": "mri-ordered", "status": "active", "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "36400-0"}]},
        "subject": {"reference": "Patient/p1"}, "authoredOn": datetime.now(timezone.utc).isoformat()}]
    [card] = order_call(env, "order-sign", [xray_order()], prefetch=prefetch_for(resources))
    assert card["indicator"] == "warning" and "suggestions" not in card


def test_order_hooks_are_not_answered_by_the_patient_view_service(env):
    body = hook_request("order-sign", prefetch=prefetch_for(record("urgent")),
                        context={"draftOrders": draft_bundle(xray_order())})
    response = env.call(PATIENT_VIEW, body)
    assert response.status_code == 400
