"""Every SpineWatch card type, built by the real card code from small demo records.

One source for the card set: tests/fhir_mappings/cds/test_cards.py checks each card here (length budgets, no
resource ids in the prose, tier lines, links once), and scripts/render_cards.py renders each as the
CDS Hooks Sandbox shows it, for docs/cards.md.

    from scripts.card_gallery import gallery
    for name, hook, card in gallery(): ...
"""

from __future__ import annotations

import base64
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fhir_mappings.cds.cards import cards_for, xray_card  # noqa: E402
from fhir_mappings.cds.wording import CardSettings  # noqa: E402
from fhir_mappings.clinical.evaluate import assess  # noqa: E402

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)  # fixed: the images do not change from day to day
PATIENT = "Patient/demo"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
CPT = "http://www.ama-assn.org/go/cpt"
# A site that configured its coordinator (SPINEWATCH_MSCC_COORDINATOR_*), and one that did not.
COORDINATOR = CardSettings(coordinator_name="MSCC coordinator (acute oncology)", coordinator_phone="01632 960 123",
                           coordinator_url="https://intranet.example.org/mscc")
GENERIC = CardSettings()
TIERS = ("emergency", "urgent", "routine")


def _ago(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat()


def _condition(rid: str, system: str, code: str, display: str, days: float, status: str = "active") -> dict:
    return {"resourceType": "Condition", "id": rid,
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": status}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "code": {"coding": [{"system": system, "code": code, "display": display}]},
            "subject": {"reference": PATIENT}, "onsetDateTime": _ago(days)}


def _note(rid: str, kind: str, text: str, days: float) -> dict:
    data = base64.b64encode(text.encode()).decode()
    return {"resourceType": "DocumentReference", "id": rid, "status": "current", "type": {"text": kind},
            "subject": {"reference": PATIENT}, "date": _ago(days),
            "content": [{"attachment": {"contentType": "text/plain", "data": data}}]}


def xray_order() -> dict:
    return {"resourceType": "ServiceRequest", "id": "xr-1", "status": "draft", "intent": "order",
            "code": {"coding": [{"system": CPT, "code": "72100", "display": "X-ray exam of lower spine, 2 or 3 views"}],
                     "text": "XR lumbar spine 2-3 views"},
            "subject": {"reference": PATIENT}}


def record(tier: str) -> list[dict]:
    """A demo patient's record for each tier: a cancer on the problem list, and what raised the tier."""
    out = [{"resourceType": "Patient", "id": "demo", "gender": "female", "birthDate": "1958-03-02"},
           _condition("ca-1", SNOMED, "254837009", "Malignant neoplasm of breast", 800, "remission")]
    if tier == "emergency":
        out += [_condition("lbp-1", ICD10CM, "M54.50", "Low back pain, unspecified", 12),
                _note("ed-1", "Emergency department note",
                      "Thoracic back pain for 2 weeks. New bilateral leg weakness since yesterday, power 4/5. "
                      "Urinary retention, PVR 900 ml.", 0.2)]
    elif tier == "urgent":
        out += [_condition("tsp-1", ICD10CM, "M54.6", "Pain in thoracic spine", 9),
                _note("gp-1", "GP consultation note", "Back pain wakes her at night for the past 3 weeks.", 2)]
    else:
        out += [_condition("lbp-1", ICD10CM, "M54.50", "Low back pain, unspecified", 5)]
    return out


def assessment(tier: str, extra: list[dict] = ()):
    a = assess(record(tier) + list(extra), NOW)
    assert a.urgency == tier, (tier, a.urgency)
    a.patient = PATIENT
    return a


def gallery() -> list[tuple[str, str, dict]]:
    """(name, hook, card) for every card type: patient-view per tier (the emergency one with and
    without a configured MSCC coordinator), and the order-select/order-sign X-ray card per tier."""
    out: list[tuple[str, str, dict]] = []
    ids = iter(f"00000000-0000-4000-8000-{n:012d}" for n in range(1, 1000))
    new_id = lambda: next(ids)  # noqa: E731  stable uuids: stable images
    for tier in TIERS:
        settings = COORDINATOR if tier == "emergency" else GENERIC
        [card] = cards_for(assessment(tier), NOW, "proposal", new_id, settings)
        out.append((f"patient-view-{tier}", "patient-view", card))
    [card] = cards_for(assessment("emergency"), NOW, "proposal", new_id, GENERIC)
    out.append(("patient-view-emergency-no-coordinator", "patient-view", card))
    for tier in TIERS:
        settings = COORDINATOR if tier == "emergency" else GENERIC
        card = xray_card(assessment(tier), ["ServiceRequest/xr-1"], NOW, "order", new_id, settings)
        out.append((f"order-sign-xray-{tier}", "order-sign", card))
    return out


if __name__ == "__main__":
    import json

    print(json.dumps([{"name": n, "hook": h, "card": c} for n, h, c in gallery()], indent=2))
