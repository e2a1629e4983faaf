"""order-select / order-sign: a plain spine X-ray among the draft orders of a patient with cancer
and back pain gets a warning card that replaces it with a whole-spine MRI (NG234: X-ray must not be
used to diagnose or exclude spinal metastases)."""

from __future__ import annotations

import pytest
import respx

from tests.support.cds_hooks import (ORDER_IMAGING, draft_bundle, hook_request, make_env, mri_order, prefetch_for,
                                     record, reset_audit, unrelated_order, validate_cds_response, xray_order)


@pytest.fixture
def env(tmp_path):
    env = make_env(tmp_path)
    yield env
    reset_audit()


def order_call(env, hook: str, drafts: list[dict], tier: str = "routine", selections: list[str] | None = None,
               prefetch: dict | None | str = "record"):
    context = {"draftOrders": draft_bundle(*drafts)}
    if hook == "order-select":
        context["selections"] = selections if selections is not None else \
            [f"{d['resourceType']}/{d['id']}" for d in drafts]
    body = hook_request(hook, prefetch=prefetch_for(record(tier)) if prefetch == "record" else prefetch,
                        context=context)
    response = env.call(ORDER_IMAGING, body)
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
    delete, create = suggestion["actions"]
    assert delete == {"type": "delete", "description": delete["description"], "resourceId": "ServiceRequest/xr-1"}
    assert create["type"] == "create"
    mri = create["resource"]
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
    assert card["suggestions"][0]["actions"][0]["resourceId"] == "ServiceRequest/xr-1"


def test_xray_found_by_text_and_body_site(env):
    draft = {"resourceType": "ServiceRequest", "id": "xr-2", "status": "draft", "intent": "order",
             "code": {"text": "Plain radiograph"}, "bodySite": [{"text": "Lumbar spine"}],
             "subject": {"reference": "Patient/p1"}}
    [card] = order_call(env, "order-sign", [draft], "urgent")
    assert card["suggestions"][0]["actions"][0]["resourceId"] == "ServiceRequest/xr-2"


def test_nothing_to_challenge_needs_no_data(env):
    """No spine X-ray among the drafts: the answer does not depend on the record, so a call without
    prefetch or fhirServer is a 200 with no cards (not a 412)."""
    with respx.mock(assert_all_called=False) as mock:
        assert order_call(env, "order-sign", [unrelated_order()], prefetch=None) == []
        assert not mock.calls


def test_xray_without_data_is_412(env):
    body = hook_request("order-sign", context={"draftOrders": draft_bundle(xray_order())})
    response = env.call(ORDER_IMAGING, body)
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"


def test_xray_card_is_audited(env):
    [card] = order_call(env, "order-sign", [xray_order()], "emergency")
    [audited] = env.audit_records("card")
    assert audited.detail["hook"] == "order-sign" and audited.detail["cards"] == [card["uuid"]]


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
    response = env.call("spinewatch-patient-view", body)
    assert response.status_code == 400
