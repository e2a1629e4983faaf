"""Assessment → CDS Hooks 2.0 cards, and the whole-spine MRI ServiceRequest a card suggests.

Card content follows NICE NG234 1.4, QS56 statement 3 and the CDS Hooks 2.0 Card, so that a
clinician reads it in five seconds: the detail says first what to do and by when, then the tier's own lines (emergency: call
the MSCC coordinator, what to do meanwhile; urgent: ask about and document neurology, safety-net;
routine: MRI not X-ray, safety-net), then a few evidence lines in clinical words — what was found,
where it was written, when — and never a resource id in the prose (ids stay in the machine-readable
places: a suggestion's `reasonReference`, a delete action's `resourceId`). "Why not X-ray" appears
only where an X-ray is ordered, pending or recent. NICE NG234 is linked once.

Card shape follows CDS Hooks 2.0 §Card Attributes (https://cds-hooks.hl7.org/2.0/#card-attributes):
a uuid on every card and suggestion, `selectionBehavior` whenever there are suggestions, no null or
empty values anywhere.

Budget (tests/fhir_mappings/cds/test_cards.py): `summary` under 140 characters; the detail before the evidence
lines within DETAIL_BUDGET characters.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from fhir_mappings.clinical.evaluate import Assessment
from fhir_mappings.cds.evidence import evidence_count, evidence_lines, fmt_date, how_long_ago, problem_lines
from fhir_mappings.cds.wording import (DEADLINE, DEFAULT_SETTINGS, INDICATOR, LINKS, MEANWHILE, MRI_CODES, MRI_SNOMED,
                                       MRI_TEXT, NG234_URL, OVERRIDE_REASONS, PRIORITY, ROUTINE_SAFETY_NET, SAFETY_NET,
                                       SOURCE, SUMMARY, URGENT_NEUROLOGY, WHY_NOT_XRAY, WITHIN, XRAY_SUMMARY,
                                       CardSettings)

NewId = Callable[[], str]


def _new_uuid() -> str:
    return str(uuid.uuid4())


def _deadline(a: Assessment, now: datetime) -> str:
    if a.urgency == "emergency":
        return f" (by {(now + DEADLINE['emergency']).strftime('%Y-%m-%d %H:%M')} UTC)"
    if a.urgency == "urgent":
        return f" (by {fmt_date(now + DEADLINE['urgent'])})"
    return ""


def _coordinator(s: CardSettings) -> str:
    who = ", ".join(x for x in (s.coordinator_name, s.coordinator_phone) if x)
    link = f" ([MSCC pathway]({s.coordinator_url}))" if s.coordinator_url else ""
    if who:
        return f"**Call the MSCC coordinator now:** {who}{link}."
    return ("**Call the MSCC coordinator now** (acute oncology on call, through switchboard if there is no "
            f"direct number){link}.")


def _action(a: Assessment, now: datetime, xray: bool) -> str:
    instead = " instead of the X-ray" if xray else ""
    if a.urgency == "emergency":
        return (f"**Whole-spine MRI within 24 h{instead}**{_deadline(a, now)}: suspected metastatic spinal cord "
                "compression, an oncological emergency (NG234 Box 2).")
    if a.urgency == "urgent":
        return (f"**Whole-spine MRI within 1 week{instead}**{_deadline(a, now)}: pain suggesting spinal metastasis "
                "(NG234 Box 1).")
    return (f"**MRI of the spine, not X-ray**{',' + instead if xray else ''}, if the back pain needs imaging: "
            "the investigation of choice in a patient with cancer (ACR Low Back Pain, variant 7).")


def _tier_lines(a: Assessment, s: CardSettings) -> list[str]:
    if a.urgency == "emergency":
        return [_coordinator(s), MEANWHILE]
    if a.urgency == "urgent":
        return [URGENT_NEUROLOGY, SAFETY_NET]
    return [ROUTINE_SAFETY_NET]


def head_lines(a: Assessment, now: datetime, xray: bool, settings: CardSettings) -> list[str]:
    """What to do and by when, the tier's own lines, an MRI already ordered (Markdown)."""
    head = [_action(a, now, xray), *_tier_lines(a, settings)]
    for order in a.pending_mri:
        due = f", due {fmt_date(order.due)}" if order.due else ""
        deadline = DEADLINE.get(a.urgency)
        must = f"; it must be done by {fmt_date(now + deadline)}" if deadline else ""
        head.append(f"**An MRI of the spine is already ordered** ({order.status}{due}){must}.")
    return head


def xray_lines(a: Assessment, now: datetime, xray: bool) -> list[str]:
    lines: list[str] = []
    if xray or a.spine_xrays:
        if not xray:
            x = a.spine_xrays[0]
            when = how_long_ago(x.date, now)
            lines.append(f"A spine X-ray is {'ordered' if x.state == 'ordered' else 'on record'} ({when}).")
        lines.append(WHY_NOT_XRAY)
    return lines


def detail_parts(a: Assessment, now: datetime, xray: bool = False,
                 settings: CardSettings = DEFAULT_SETTINGS) -> tuple[str, list[str], str]:
    """(what to do, the evidence lines, the rest): the detail is their join; tests check each."""
    head = head_lines(a, now, xray, settings)
    evidence = evidence_lines(a, now)
    tail = xray_lines(a, now, xray)
    tail += problem_lines(a)
    box = {"emergency": "Box 2, QS56", "urgent": "Box 1"}.get(a.urgency, "ACR variant 7")
    tail.append(f"Guideline: [NICE NG234]({NG234_URL}) ({box}).")
    return "\n\n".join(head), evidence, "\n\n".join(tail)


def _detail(a: Assessment, now: datetime, xray: bool, settings: CardSettings) -> str:
    head, evidence, tail = detail_parts(a, now, xray, settings)
    return "\n\n".join([head, "**Found:**\n" + "\n".join(evidence), tail])


def mri_code(a: Assessment, settings: CardSettings = DEFAULT_SETTINGS) -> dict:
    system, code, display = settings.mri_codes.get(a.urgency) or MRI_CODES[a.urgency]
    default = (system, code, display) == MRI_CODES[a.urgency]
    return {"coding": [{"system": system, "code": code, "display": display}, MRI_SNOMED],
            "text": MRI_TEXT[a.urgency] if default else display}


def mri_service_request(a: Assessment, now: datetime, intent: str = "proposal",
                        settings: CardSettings = DEFAULT_SETTINGS) -> dict:
    """A draft whole-spine MRI order (NG234 1.4, QS56 statement 3 and the CDS Hooks 2.0 Card)."""
    reasons = [{"reference": ref} for ref in dict.fromkeys(
        e.reference for e in a.cancers[:1] + a.evidence[:5] + (a.back_pain[:1] if not a.evidence else []))]
    request = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": intent,
        "priority": PRIORITY[a.urgency],
        "code": mri_code(a, settings),
        "subject": {"reference": a.patient},
        "authoredOn": now.isoformat(),
        "reasonReference": reasons,
    }
    if a.urgency in DEADLINE:
        request["occurrencePeriod"] = {"start": now.isoformat(), "end": (now + DEADLINE[a.urgency]).isoformat()}
    return request


def suggestion_label(intent: str, urgency: str, replacing: bool = False) -> str:
    """"Propose" for a proposal or plan the clinician signs, "Add to orders" when the EHR takes it as an order."""
    when = WITHIN.get(urgency, "")
    if intent in ("proposal", "plan"):
        return f"Propose whole-spine MRI{when}" + (" instead of the X-ray" if replacing else "")
    return f"Add to orders: whole-spine MRI{when}" + (" (replaces the X-ray)" if replacing else "")


def _mri_suggestion(a: Assessment, now: datetime, intent: str, new_id: NewId, replacing: list[str] = (),
                    settings: CardSettings = DEFAULT_SETTINGS) -> dict:
    when = WITHIN.get(a.urgency, "")
    mri = mri_service_request(a, now, intent, settings)
    if not replacing:
        actions = [{"type": "create", "description": f"Whole-spine MRI{when}", "resource": mri}]
    else:
        # The first draft X-ray becomes the MRI in place: an `update` of the draft by its id (CDS
        # Hooks 2.0 §Action; restful-interaction "update an existing resource by its id"). One
        # action, and the one the CDS Hooks Sandbox applies to draft orders (it applies no create
        # or delete there). Any other draft spine X-ray is removed; 2.0 §Action: a delete's
        # `resourceId` is a *string*, "a relative reference to the relevant resource".
        first, *others = replacing
        actions = [{"type": "update", "description": f"Change the draft spine X-ray into a whole-spine MRI{when}",
                    "resource": mri | {"id": first.split("/", 1)[1]}}]
        actions += [{"type": "delete", "description": "Remove the other draft spine X-ray order", "resourceId": ref}
                    for ref in others]
    return {"label": suggestion_label(intent, a.urgency, bool(replacing)), "uuid": new_id(), "isRecommended": True,
            "actions": actions}


def evidence_link(url: str, findings: int) -> dict:
    """The card's link to the full evidence page (CDS Hooks 2.0 §Link, https://cds-hooks.hl7.org/2.0/#link):
    an absolute URL the EHR opens as it is."""
    return {"label": f"Full evidence ({findings} finding{'' if findings == 1 else 's'})", "url": url,
            "type": "absolute"}


def _card(summary: str, detail: str, indicator: str, suggestions: list[dict], new_id: NewId,
          link: dict | None = None) -> dict:
    card = {
        "uuid": new_id(),
        "summary": summary,
        "detail": detail,
        "indicator": indicator,
        "source": SOURCE,
        "overrideReasons": OVERRIDE_REASONS,
        # LINKS is shared by every card: a copy when a link is added, never LINKS itself changed.
        "links": LINKS if link is None else [dict(x) for x in LINKS] + [link],
    }
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "at-most-one"
    return card


def cards_for(a: Assessment, now: datetime, intent: str = "proposal", new_id: NewId = _new_uuid,
              settings: CardSettings = DEFAULT_SETTINGS, *, evidence_url: str | None = None) -> list[dict]:
    """The patient-view card for an assessment: none for tier `none`. `evidence_url`: the page with
    the full evidence (`evidence_view`), added as one more link; None: no such link."""
    if a.urgency == "none":
        return []
    # No "order MRI" suggestion when one is already ordered (NG234 1.4 (MRI of the spine)), and none
    # without a patient to order it for (clinical identifiers never get defaults).
    suggestions = [] if a.pending_mri or not a.patient else [_mri_suggestion(a, now, intent, new_id,
                                                                             settings=settings)]
    link = evidence_link(evidence_url, evidence_count(a)) if evidence_url else None
    return [_card(SUMMARY[a.urgency], _detail(a, now, False, settings), INDICATOR[a.urgency], suggestions, new_id,
                  link)]


def xray_card(a: Assessment, xray_refs: list[str], now: datetime, intent: str = "order",
              new_id: NewId = _new_uuid, settings: CardSettings = DEFAULT_SETTINGS, *,
              evidence_url: str | None = None) -> dict:
    """order-select / order-sign: a spine X-ray is being ordered for an in-scope patient. The card
    follows the tier: `critical` and 24 h for an emergency, `warning` and 1 week for urgent, `info`."""
    suggestions = [] if a.pending_mri or not a.patient else [
        _mri_suggestion(a, now, intent, new_id, xray_refs, settings)]
    link = evidence_link(evidence_url, evidence_count(a)) if evidence_url else None
    return _card(XRAY_SUMMARY[a.urgency], _detail(a, now, True, settings), INDICATOR[a.urgency], suggestions, new_id,
                 link)
