"""fhir_mappings.clinical.orders: which draft orders are a plain spine X-ray or a spine MRI (value sets
xray-spine and mri-spine, fhir_mappings/clinical/valuesets/)."""

from __future__ import annotations

import pytest

from fhir_mappings.clinical.orders import MRI_SPINE, XRAY_SPINE, classify_order, draft_resources, reference

CPT = "http://www.ama-assn.org/go/cpt"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"


def order(code: dict | None = None, body_site: list[dict] | None = None, rtype: str = "ServiceRequest") -> dict:
    out = {"resourceType": rtype, "id": "o1", "status": "draft", "intent": "order"}
    if code is not None:
        out["code"] = code
    if body_site is not None:
        out["bodySite"] = body_site
    return out


@pytest.mark.parametrize("code", ["72020", "72040", "72070", "72100", "72110", "72120"])
def test_cpt_spine_radiographs_are_xray(code):
    assert classify_order(order({"coding": [{"system": CPT, "code": code}]})) == XRAY_SPINE


@pytest.mark.parametrize("system, code", [(LOINC, "36400-0"), (LOINC, "24967-2"), (SNOMED, "241645008"),
                                          (CPT, "72148"), (CPT, "72158")])
def test_spine_mri_codes_are_mri(system, code):
    assert classify_order(order({"coding": [{"system": system, "code": code}]})) == MRI_SPINE


@pytest.mark.parametrize("text", ["XR lumbar spine 2-3 views", "X-ray thoracic spine", "Lumbosacral spine X-ray",
                                  "Plain films of the cervical spine", "radiograph of the L-spine"])
def test_xray_text(text):
    assert classify_order(order({"text": text})) == XRAY_SPINE


@pytest.mark.parametrize("text", ["MRI whole spine with and without contrast", "MR lumbar spine",
                                  "Magnetic resonance imaging of thoracic spine"])
def test_mri_text(text):
    assert classify_order(order({"text": text})) == MRI_SPINE


def test_modality_in_code_and_site_in_body_site():
    assert classify_order(order({"text": "X-ray"}, [{"text": "Lumbar spine"}])) == XRAY_SPINE
    assert classify_order(order({"coding": [{"system": LOINC, "code": "xx", "display": "Plain radiograph"}]},
                                [{"coding": [{"system": SNOMED, "code": "122496007", "display": "Lumbar spine"}]}])) \
        == XRAY_SPINE


@pytest.mark.parametrize("drafted", [
    order({"text": "X-ray chest PA and lateral"}),
    order({"text": "CT lumbar spine"}),
    order({"text": "Knee radiograph"}),
    order({"coding": [{"system": CPT, "code": "71046"}]}),  # chest X-ray
    order(None),
    order({"text": "XR lumbar spine"}, rtype="MedicationRequest"),
    {"resourceType": "NutritionOrder", "id": "n1"},
])
def test_other_orders_are_neither(drafted):
    assert classify_order(drafted) is None


def test_mri_wins_over_xray_text():
    both = order({"coding": [{"system": LOINC, "code": "36400-0"}], "text": "MRI spine (X-ray of spine not needed)"})
    assert classify_order(both) == MRI_SPINE


def test_malformed_input_is_not_an_error():
    assert classify_order(None) is None
    assert classify_order(order({"coding": "not-a-list-of-codings"})) is None
    assert classify_order(order({"coding": [None, 3, {"system": CPT}]})) is None


def test_draft_resources_and_reference():
    bundle = {"resourceType": "Bundle", "entry": [{"resource": order({"text": "x"})}, {"fullUrl": "urn:x"}, "junk"]}
    [only] = draft_resources(bundle)
    assert reference(only) == "ServiceRequest/o1"
    assert reference({"resourceType": "ServiceRequest"}) is None
    assert draft_resources(None) == [] and draft_resources({"entry": None}) == []
