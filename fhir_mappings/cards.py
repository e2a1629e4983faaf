"""Assessment → CDS Hooks 2.0 cards, and the whole-spine MRI ServiceRequest a card suggests.

Card content follows CLINICAL.md "What a card says"; card shape follows CDS Hooks 2.0 §Card
Attributes (https://cds-hooks.hl7.org/2.0/#card-attributes): a uuid on every card and suggestion,
`selectionBehavior` whenever there are suggestions, no null or empty values anywhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from fhir_mappings.evaluate import Assessment
from fhir_mappings.facts import Evidence
from fhir_mappings.terminology import ICD10, ICD10CM, LOINC, SNOMED, load_terminology

NG234_URL = "https://www.nice.org.uk/guidance/ng234"
ACR_LBP_URL = "https://acsearch.acr.org/docs/69483/Narrative/"
OVERRIDE_SYSTEM = "https://spinewatch.example.org/fhir/CodeSystem/override-reason"
SOURCE = {"label": "SpineWatch (NICE NG234 red flags)", "url": NG234_URL}

INDICATOR = {"emergency": "critical", "urgent": "warning", "routine": "info"}
PRIORITY = {"emergency": "stat", "urgent": "urgent", "routine": "routine"}
# QS56 statement 3: MRI within 24 h for suspected MSCC; CG75 audits: within 1 week for Box 1.
DEADLINE = {"emergency": timedelta(hours=24), "urgent": timedelta(days=7)}
SUMMARY = {
    "emergency": "Suspected spinal cord compression: whole-spine MRI within 24 h",
    "urgent": "Suspected spinal metastasis: whole-spine MRI within 1 week",
    "routine": "Back pain in a patient with cancer: MRI, not X-ray, is the test of choice",
}
RECOMMENDATION = {
    "emergency": "Suspected metastatic spinal cord compression (NG234 Box 2), an oncological emergency: "
                 "**whole-spine MRI immediately, and always within 24 hours** (NICE QS56 statement 3). "
                 "Contact the MSCC / acute oncology team now.",
    "urgent": "Pain suggesting spinal metastasis (NG234 Box 1) without neurological symptoms: "
              "**urgent whole-spine MRI, within 1 week**.",
    "routine": "Back pain in a patient with a history of cancer: **MRI (not X-ray)** is the investigation "
               "of choice (ACR Appropriateness Criteria Low Back Pain, variant 7; ACP 2011).",
}
WHY_NOT_XRAY = ("A plain X-ray shows a vertebral metastasis only after 30-50 % of the vertebral body is "
                "destroyed; it must not be used to diagnose or exclude spinal metastases (NG234).")
MRI_CODE = {
    "coding": [
        {"system": LOINC, "code": "36400-0", "display": "MR Spine WO and W contrast IV"},
        {"system": SNOMED, "code": "241645008", "display": "MRI of spine"},
    ],
    "text": "MRI whole spine without and with IV contrast",
}
OVERRIDE_REASONS = [
    {"code": "already-imaged", "system": OVERRIDE_SYSTEM, "display": "Already imaged elsewhere"},
    {"code": "patient-declined", "system": OVERRIDE_SYSTEM, "display": "Patient declined"},
    {"code": "not-clinically-relevant", "system": OVERRIDE_SYSTEM, "display": "Not clinically relevant"},
    {"code": "mri-contraindicated", "system": OVERRIDE_SYSTEM, "display": "MRI contraindicated"},
]
LINKS = [
    {"label": "NICE NG234: Spinal metastases and MSCC", "url": NG234_URL, "type": "absolute"},
    {"label": "ACR Appropriateness Criteria: Low Back Pain", "url": ACR_LBP_URL, "type": "absolute"},
]
_SYSTEM_NAMES = {SNOMED: "SNOMED CT", ICD10CM: "ICD-10-CM", ICD10: "ICD-10", LOINC: "LOINC"}

NewId = Callable[[], str]


def _new_uuid() -> str:
    return str(uuid.uuid4())


def _fmt_date(value: datetime | None) -> str:
    return value.date().isoformat() if value else "undated"


def _describe(e: Evidence) -> str:
    where = f"{e.reference}, {_fmt_date(e.date)}"
    if e.quote:
        return f'{where}: "{e.quote}"'
    if e.code:
        system, _, code = e.code.partition("|")
        name = _SYSTEM_NAMES.get(system, system)
        return f"{where}: {name} {code}" + (f" ({e.display})" if e.display else "")
    if e.value is not None:
        return f"{where}: pain score {e.value:g}/10"
    return where


def _detail(a: Assessment, now: datetime) -> str:
    term = load_terminology()
    lines = ["**Cancer:** " + "; ".join(_describe(c) for c in a.cancers[:3])]
    if a.red_flags:
        lines.append("")
        lines.append("**Red flags:**")
        for flag in a.red_flags:
            rule = term.rule(flag)
            items = [e for e in a.evidence if e.concept == flag]
            lines.append(f"- {rule.title} (NG234 Box {rule.box}): " + "; ".join(_describe(e) for e in items[:3]))
    elif a.back_pain:
        lines.append("")
        lines.append("**Back pain:** " + "; ".join(_describe(e) for e in a.back_pain[:3]))
    lines += ["", "**Recommendation:** " + RECOMMENDATION[a.urgency]]
    for order in a.pending_mri:
        due = f", to be done by {_fmt_date(order.due)}" if order.due else ""
        deadline = DEADLINE.get(a.urgency)
        must = f"; it must be done by {_fmt_date(now + deadline)}" if deadline else ""
        lines.append(f"An MRI of the spine is already ordered ({order.reference}{due}){must}.")
    lines += ["", "**Why not X-ray:** " + WHY_NOT_XRAY]
    unreadable = sum(1 for p in a.problems if " skipped: " in p)  # facts.describe_validation_error
    if unreadable:
        lines += ["", f"**Note:** {unreadable} resource(s) in the record could not be read; "
                      "this assessment may be incomplete."]
    if len(a.problems) > unreadable:  # e.g. the terminology server was not consulted
        lines += ["", "**Note:** " + "; ".join(p for p in a.problems if " skipped: " not in p) + "."]
    lines += ["", f"**Source:** [NICE NG234]({NG234_URL}); [ACR Low Back Pain, variant 7]({ACR_LBP_URL})."]
    return "\n".join(lines)


def mri_service_request(a: Assessment, now: datetime, intent: str = "proposal") -> dict:
    """A draft whole-spine MRI order (CLINICAL.md "What a card says")."""
    reasons = [{"reference": ref} for ref in dict.fromkeys(
        e.reference for e in a.cancers[:1] + a.evidence[:5] + (a.back_pain[:1] if not a.evidence else []))]
    request = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": intent,
        "priority": PRIORITY[a.urgency],
        "code": MRI_CODE,
        "subject": {"reference": a.patient},
        "authoredOn": now.isoformat(),
        "reasonReference": reasons,
    }
    if a.urgency in DEADLINE:
        request["occurrencePeriod"] = {"start": now.isoformat(), "end": (now + DEADLINE[a.urgency]).isoformat()}
    return request


def _mri_suggestion(a: Assessment, now: datetime, intent: str, new_id: NewId, replacing: list[str] = ()) -> dict:
    when = {"emergency": " within 24 h", "urgent": " within 1 week"}.get(a.urgency, "")
    # CDS Hooks 2.0 §Action: `resourceId` is a *string*, "a relative reference to the relevant resource".
    actions = [{"type": "delete", "description": "Remove the draft spine X-ray order", "resourceId": ref}
               for ref in replacing]
    actions.append({"type": "create", "description": f"Order whole-spine MRI{when}",
                    "resource": mri_service_request(a, now, intent)})
    label = ("Replace the X-ray with whole-spine MRI" if replacing else "Order whole-spine MRI") + when
    return {"label": label, "uuid": new_id(), "isRecommended": True, "actions": actions}


def _card(summary: str, detail: str, indicator: str, suggestions: list[dict], new_id: NewId) -> dict:
    card = {
        "uuid": new_id(),
        "summary": summary,
        "detail": detail,
        "indicator": indicator,
        "source": SOURCE,
        "overrideReasons": OVERRIDE_REASONS,
        "links": LINKS,
    }
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "at-most-one"
    return card


def cards_for(a: Assessment, now: datetime, intent: str = "proposal", new_id: NewId = _new_uuid) -> list[dict]:
    """The patient-view card for an assessment: none for tier `none`."""
    if a.urgency == "none":
        return []
    # No "order MRI" suggestion when one is already ordered (CLINICAL.md "Suppression"), and none
    # without a patient to order it for (clinical identifiers never get defaults).
    suggestions = [] if a.pending_mri or not a.patient else [_mri_suggestion(a, now, intent, new_id)]
    return [_card(SUMMARY[a.urgency], _detail(a, now), INDICATOR[a.urgency], suggestions, new_id)]


def xray_card(a: Assessment, xray_refs: list[str], now: datetime, intent: str = "order",
              new_id: NewId = _new_uuid) -> dict:
    """order-select / order-sign: a spine X-ray is being ordered for an in-scope patient."""
    summary = "Spine X-ray cannot exclude metastasis: order MRI instead"
    detail = "\n".join([
        f"This patient has a known cancer and back pain ({a.urgency} tier).", "",
        "**Why not X-ray:** " + WHY_NOT_XRAY, "",
        "**Recommendation:** " + RECOMMENDATION[a.urgency], "",
        f"**Source:** [NICE NG234]({NG234_URL}); [ACR Low Back Pain, variant 7]({ACR_LBP_URL}).",
    ])
    suggestions = [] if a.pending_mri or not a.patient else [_mri_suggestion(a, now, intent, new_id, xray_refs)]
    return _card(summary, detail, "warning", suggestions, new_id)
