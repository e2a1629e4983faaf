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

Budget (tests/unit/test_cards.py): `summary` under 140 characters; the detail before the evidence
lines within DETAIL_BUDGET characters.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fhir_mappings.clinical.evaluate import Assessment
from fhir_mappings.clinical.facts import Evidence
from fhir_mappings.clinical.terminology import ICD10, ICD10CM, LOINC, SNOMED, load_terminology

NG234_URL = "https://www.nice.org.uk/guidance/ng234"
ACR_LBP_URL = "https://acsearch.acr.org/docs/69483/Narrative/"
OVERRIDE_SYSTEM = "https://spinewatch.example.org/fhir/CodeSystem/override-reason"
# No url: the card names NICE NG234 once, as a link in the detail (the sandbox shows a source url
# as one more link).
SOURCE = {"label": "SpineWatch (NICE NG234 red flags)"}

DETAIL_BUDGET = 600  # characters of detail before the evidence lines ("what to do" must fit)
MAX_EVIDENCE_LINES = 3
QUOTE_MAX = 120

INDICATOR = {"emergency": "critical", "urgent": "warning", "routine": "info"}
PRIORITY = {"emergency": "stat", "urgent": "urgent", "routine": "routine"}
# QS56 statement 3: MRI within 24 h for suspected MSCC; CG75 audits: within 1 week for Box 1.
DEADLINE = {"emergency": timedelta(hours=24), "urgent": timedelta(days=7)}
WITHIN = {"emergency": " within 24 h", "urgent": " within 1 week"}
SUMMARY = {
    "emergency": "Suspected spinal cord compression: whole-spine MRI within 24 h",
    "urgent": "Suspected spinal metastasis: whole-spine MRI within 1 week",
    "routine": "Back pain in a patient with cancer: MRI, not X-ray, is the test of choice",
}
XRAY_SUMMARY = {
    "emergency": "Suspected cord compression, X-ray cannot exclude metastasis: whole-spine MRI within 24 h instead",
    "urgent": "Spine X-ray cannot exclude metastasis: whole-spine MRI within 1 week instead",
    "routine": "Spine X-ray cannot exclude metastasis: MRI of the spine instead",
}

# What to do meanwhile, as NG234 says. Dexamethasone: NG234 1.8.1, for people with neurological
# symptoms or signs of MSCC, "16 mg of oral dexamethasone (or an equivalent parenteral dose) as soon
# as possible" (wording checked through a summary that cites 1.8.1; the NICE page itself was not
# readable here). Neutral spine alignment (lying flat) where severe pain or neurology suggests
# spinal instability, until it is assessed: NG234's immediate-management section, wording to be
# confirmed at clinical sign-off.
MEANWHILE = ("**Meanwhile (NG234):** if severe pain or neurology suggests an unstable spine, keep the spine "
             "in neutral alignment (lie flat) until assessed; with neurological symptoms or signs, offer "
             "dexamethasone 16 mg orally as soon as possible; discuss with the MSCC coordinator.")
URGENT_NEUROLOGY = ("**Ask about and document neurology:** limb weakness, numbness, walking, bladder or bowel, "
                    "saddle sensation; the record does not mention them. Any of these makes it an emergency: "
                    "MRI within 24 h and call the MSCC coordinator.")
SAFETY_NET = ("**Safety-net (NG234):** tell the patient to seek help at once if they develop leg weakness, "
              "numbness, difficulty walking, or bladder or bowel problems.")
ROUTINE_SAFETY_NET = ("**Safety-net (NG234):** ask about night pain, upper back pain and pain on coughing or "
                      "straining (urgent MRI within 1 week); tell the patient to seek help at once for leg "
                      "weakness, numbness, or bladder or bowel problems.")
WHY_NOT_XRAY = ("**Why not X-ray:** a plain X-ray shows a vertebral metastasis only once 30-50 % of the "
                "vertebral body is destroyed; it must not be used to diagnose or exclude spinal metastases.")

# MRI codes, LOINC/RSNA Radiology Playbook (https://loinc.org/kb/users-guide/radiology-playbook/;
# LOINC long common names): 36531-2 "MR Spine WO contrast" for suspected MSCC (NICE NG234 1.4 whole-spine MRI;
# no contrast needed: sagittal T1 and T2/STIR of the whole spine), 36400-0 "MR Spine WO and W
# contrast IV" for the urgent and routine work-up of suspected metastasis (ACR Low Back Pain,
# variant 7). Sites order by their own codes: each is a setting (SPINEWATCH_MRI_CODE_<TIER>).
MRI_CODES = {
    "emergency": (LOINC, "36531-2", "MR Spine WO contrast"),
    "urgent": (LOINC, "36400-0", "MR Spine WO and W contrast IV"),
    "routine": (LOINC, "36400-0", "MR Spine WO and W contrast IV"),
}
MRI_SNOMED = {"system": SNOMED, "code": "241645008", "display": "MRI of spine"}
MRI_TEXT = {"emergency": "MRI whole spine without contrast",
            "urgent": "MRI whole spine without and with IV contrast",
            "routine": "MRI whole spine without and with IV contrast"}

OVERRIDE_REASONS = [
    {"code": "already-imaged", "system": OVERRIDE_SYSTEM, "display": "Already imaged elsewhere"},
    {"code": "patient-declined", "system": OVERRIDE_SYSTEM, "display": "Patient declined"},
    {"code": "not-clinically-relevant", "system": OVERRIDE_SYSTEM, "display": "Not clinically relevant"},
    {"code": "mri-contraindicated", "system": OVERRIDE_SYSTEM, "display": "MRI contraindicated"},
]
# NICE is linked in the detail; the buttons add what the detail does not.
LINKS = [
    {"label": "ACR Appropriateness Criteria: Low Back Pain", "url": ACR_LBP_URL, "type": "absolute"},
]
_SYSTEM_NAMES = {SNOMED: "SNOMED CT", ICD10CM: "ICD-10-CM", ICD10: "ICD-10", LOINC: "LOINC"}
# A resource id in a problem line ("DocumentReference/d1: ...") becomes a clinical noun.
_REFERENCE = re.compile(r"\b([A-Z][A-Za-z]+)/[A-Za-z0-9\-.?]{1,64}")
_NOUN = {"DocumentReference": "a clinical note", "Condition": "a problem-list entry", "Observation": "an observation",
         "DiagnosticReport": "a report", "ClinicalImpression": "a clinical impression", "Binary": "its content",
         "ImagingStudy": "an imaging study", "ServiceRequest": "an order", "Procedure": "a procedure"}
_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|])")

NewId = Callable[[], str]


@dataclass(frozen=True)
class CardSettings:
    """What a site configures about its cards (service/core/settings.py card_settings)."""
    coordinator_name: str | None = None
    coordinator_phone: str | None = None
    coordinator_url: str | None = None
    mri_codes: dict[str, tuple[str, str, str]] = field(default_factory=lambda: dict(MRI_CODES))


DEFAULT_SETTINGS = CardSettings()


def _new_uuid() -> str:
    return str(uuid.uuid4())


def _fmt_date(value: datetime | None) -> str:
    return value.date().isoformat() if value else "undated"


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "undated"
    days = (now.date() - value.date()).days
    if days <= 0:
        rel = "today"
    elif days == 1:
        rel = "yesterday"
    elif days < 14:
        rel = f"{days} days ago"
    elif days < 60:
        rel = f"{days // 7} weeks ago"
    elif days < 730:
        rel = f"{days // 30} months ago"
    else:
        rel = f"{days // 365} years ago"
    return f"{value.date().isoformat()}, {rel}"


def _escape(text: str) -> str:
    """Patient text inside Markdown: no emphasis, links or HTML from a note."""
    return _MARKDOWN.sub(r"\\\1", " ".join(text.split()))


def _where(e: Evidence) -> str:
    """Where a clinician would find it: the note type, the problem list, the exam, a report."""
    if e.resource_type == "DocumentReference":
        return e.display or "clinical note"
    if e.resource_type == "ClinicalImpression":
        return "clinical impression"
    if e.resource_type == "Condition":
        return "problem list"
    if e.resource_type == "Observation":
        return "pain score" if e.value is not None else "exam observation"
    if e.resource_type == "DiagnosticReport":
        return "report"
    return "record"


def _plain(text: str) -> str:
    """Patient text as plain text (the evidence page escapes it as HTML): whitespace folded only."""
    return " ".join(text.split())


def _what(e: Evidence, escape: Callable[[str], str] = _escape, quote_max: int = QUOTE_MAX) -> str:
    if e.quote:
        quote = e.quote if len(e.quote) <= quote_max else e.quote[:quote_max - 1].rstrip() + "…"
        return f'"{escape(quote)}"' + (" (suspected)" if e.status == "uncertain" else "") \
            + (" (past)" if e.status == "historical" else "")
    if e.value is not None:
        return f"pain {e.value:g}/10"
    if e.display:
        return escape(e.display)
    if e.code:
        system, _, code = e.code.partition("|")
        return f"{_SYSTEM_NAMES.get(system, 'code')} {code}"
    return ""


def _line(e: Evidence, now: datetime, title: str | None = None) -> str:
    what = _what(e)
    head = f"{title}: {what}" if title and what else (title or what or "recorded")
    return f"{head} ({_where(e)}, {_ago(e.date, now)})"


def _short(title: str) -> str:
    return re.split(r"[,;]", title)[0].strip()


def _evidence_lines(a: Assessment, now: datetime) -> list[str]:
    """At most MAX_EVIDENCE_LINES findings: one per red flag first, then more of the same."""
    term = load_terminology()
    lines: list[str] = []
    if a.red_flags:
        by_flag = [(flag, [e for e in a.evidence if e.concept == flag]) for flag in a.red_flags]
        picked = [(flag, items[0]) for flag, items in by_flag if items]
        rest = [(flag, e) for flag, items in by_flag for e in items[1:]]
        chosen = (picked + rest)[:MAX_EVIDENCE_LINES]
        total = len(a.evidence)
        # The rule title's first clause: "Limb weakness", not its whole list of synonyms.
        lines = [f"- {_line(e, now, _short(term.rule(flag).title))}" for flag, e in chosen]
    else:
        chosen = a.back_pain[:MAX_EVIDENCE_LINES]
        total = len(a.back_pain)
        lines = [f"- {_line(e, now, 'Back pain')}" for e in chosen]
    if total > len(chosen):
        lines.append(f"- and {total - len(chosen)} more finding(s) in the record")
    if a.cancers:
        newest = max(a.cancers, key=lambda c: c.date.timestamp() if c.date else 0)
        lines.append(f"- {_line(newest, now, 'Cancer')}")
    return lines


def _deadline(a: Assessment, now: datetime) -> str:
    if a.urgency == "emergency":
        return f" (by {(now + DEADLINE['emergency']).strftime('%Y-%m-%d %H:%M')} UTC)"
    if a.urgency == "urgent":
        return f" (by {_fmt_date(now + DEADLINE['urgent'])})"
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


def _problem_lines(a: Assessment) -> list[str]:
    unreadable = sum(1 for p in a.problems if " skipped: " in p)  # facts.describe_validation_error
    lines = []
    if unreadable:
        lines.append(f"**Note:** {unreadable} entry(ies) in the record could not be read; this assessment may be "
                     "incomplete.")
    others = [p for p in a.problems if " skipped: " not in p]  # e.g. a note not read, no terminology server
    if others:
        text = "; ".join(_REFERENCE.sub(lambda m: _NOUN.get(m.group(1), "an entry"), p) for p in others[:3])
        lines.append("**Note:** " + text[:1].upper() + text[1:] + ".")
    return lines


def _head_lines(a: Assessment, now: datetime, xray: bool, settings: CardSettings) -> list[str]:
    """What to do and by when, the tier's own lines, an MRI already ordered (Markdown)."""
    head = [_action(a, now, xray), *_tier_lines(a, settings)]
    for order in a.pending_mri:
        due = f", due {_fmt_date(order.due)}" if order.due else ""
        deadline = DEADLINE.get(a.urgency)
        must = f"; it must be done by {_fmt_date(now + deadline)}" if deadline else ""
        head.append(f"**An MRI of the spine is already ordered** ({order.status}{due}){must}.")
    return head


def _xray_lines(a: Assessment, now: datetime, xray: bool) -> list[str]:
    lines: list[str] = []
    if xray or a.spine_xrays:
        if not xray:
            x = a.spine_xrays[0]
            when = _ago(x.date, now)
            lines.append(f"A spine X-ray is {'ordered' if x.state == 'ordered' else 'on record'} ({when}).")
        lines.append(WHY_NOT_XRAY)
    return lines


def detail_parts(a: Assessment, now: datetime, xray: bool = False,
                 settings: CardSettings = DEFAULT_SETTINGS) -> tuple[str, list[str], str]:
    """(what to do, the evidence lines, the rest): the detail is their join; tests check each."""
    head = _head_lines(a, now, xray, settings)
    evidence = _evidence_lines(a, now)
    tail = _xray_lines(a, now, xray)
    tail += _problem_lines(a)
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
    # CDS Hooks 2.0 §Action: `resourceId` is a *string*, "a relative reference to the relevant resource".
    actions = [{"type": "delete", "description": "Remove the draft spine X-ray order", "resourceId": ref}
               for ref in replacing]
    actions.append({"type": "create", "description": f"Whole-spine MRI{when}",
                    "resource": mri_service_request(a, now, intent, settings)})
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


# ---------------------------------------------------------------------------------------------
# The full evidence: what the card's "Full evidence" link opens (service/api/routes/evidence.py).
# Every finding in the same clinical words as the card (what / where / when), in plain text (the
# page escapes it as HTML); the resource reference only in each item's machine field `reference`.

VIEW_VERSION = 1
VIEW_QUOTE_MAX = 500  # a quote is one clause; bounded all the same
TIER_TEXT = {"emergency": "Emergency: suspected metastatic spinal cord compression (NG234 Box 2)",
             "urgent": "Urgent: suspected spinal metastasis (NG234 Box 1)",
             "routine": "Routine: back pain in a patient with cancer (ACR Low Back Pain, variant 7)",
             "none": "No SpineWatch tier: no card"}
_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")
_MD_LINK = re.compile(r"\[([^\]]+)\]\((https?://[^)\s]+)\)")


def _unmarkdown(text: str) -> str:
    """One of our own card lines (no patient text in it) as plain text."""
    return _MD_BOLD.sub(r"\1", _MD_LINK.sub(lambda m: f"{m.group(1)} ({m.group(2)})", text))


def evidence_count(a: Assessment) -> int:
    """How many findings the full evidence lists: red-flag evidence, back pain and cancers."""
    return len(a.evidence) + len(a.back_pain) + len(a.cancers)


def _view_item(e: Evidence, now: datetime, section: str, title: str) -> dict:
    what = _what(e, _plain, VIEW_QUOTE_MAX)
    where, when = _where(e), _ago(e.date, now)
    item = {"section": section, "title": title, "what": what or "recorded", "where": where, "when": when,
            "line": f"{title}: {what} ({where}, {when})" if what else f"{title} ({where}, {when})",
            # machine fields: never shown as prose
            "concept": e.concept, "reference": e.reference, "field": e.field}
    if e.date is not None:
        item["date"] = e.date.isoformat()
    if e.status:
        item["status"] = e.status
    return item


def evidence_view(a: Assessment, now: datetime, *, xray: bool = False,
                  settings: CardSettings = DEFAULT_SETTINGS) -> dict:
    """All the evidence of an assessment, JSON-serialisable, for the page a card links to: the tier,
    the summary, what to do, the flags raised, every finding (what / where / when) and the notes the
    card carries (an X-ray, entries that could not be read). Pure: `now` is the card's time."""
    term = load_terminology()

    def title_of(flag: str) -> str:
        try:
            return _short(term.rule(flag).title)
        except LookupError:
            return "Finding"

    flags, findings = [], []
    for flag in a.red_flags:
        items = [e for e in a.evidence if e.concept == flag]
        title = title_of(flag)
        entry = {"id": flag, "title": title, "findings": len(items)}
        try:
            entry["box"] = term.rule(flag).box
        except LookupError:
            pass
        flags.append(entry)
        findings += [_view_item(e, now, "red-flag", title) for e in items]
    findings += [_view_item(e, now, "red-flag", title_of(e.concept)) for e in a.evidence
                 if e.concept not in a.red_flags]
    findings += [_view_item(e, now, "back-pain", "Back pain") for e in a.back_pain]
    cancers = sorted(a.cancers, key=lambda c: c.date.timestamp() if c.date else 0, reverse=True)
    findings += [_view_item(e, now, "cancer", "Cancer") for e in cancers]
    in_tier = a.urgency in SUMMARY
    view = {
        "version": VIEW_VERSION,
        "evaluated_at": now.isoformat(),
        "tier": a.urgency,
        "tier_text": TIER_TEXT.get(a.urgency, a.urgency),
        "summary": (XRAY_SUMMARY if xray else SUMMARY)[a.urgency] if in_tier else TIER_TEXT["none"],
        "what_to_do": [_unmarkdown(line) for line in _head_lines(a, now, xray, settings)] if in_tier else [],
        "flags": flags,
        "findings": findings,
        "count": len(findings),
        "notes": [_unmarkdown(line) for line in _xray_lines(a, now, xray) + _problem_lines(a)],
        "guideline": {"label": "NICE NG234", "url": NG234_URL},
    }
    if a.patient:
        view["patient"] = a.patient  # machine field: the audit record's patient, not shown
    return view
