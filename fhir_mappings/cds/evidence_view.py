"""The full evidence: what a card's "Full evidence" link opens (service/api/routes/evidence.py).
Every finding in the same clinical words as the card (what / where / when), in plain text (the page
escapes it as HTML); the resource reference only in each item's machine field `reference`."""

from __future__ import annotations

import re
from datetime import datetime

from fhir_mappings.clinical.evaluate import Assessment
from fhir_mappings.clinical.facts import Evidence
from fhir_mappings.clinical.terminology import load_terminology
from fhir_mappings.cds.cards import head_lines, xray_lines
from fhir_mappings.cds.evidence import how_long_ago, plain, problem_lines, short, what_found, where_written
from fhir_mappings.cds.wording import DEFAULT_SETTINGS, NG234_URL, SUMMARY, XRAY_SUMMARY, CardSettings

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


def _view_item(e: Evidence, now: datetime, section: str, title: str) -> dict:
    what = what_found(e, plain, VIEW_QUOTE_MAX)
    where, when = where_written(e), how_long_ago(e.date, now)
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
            return short(term.rule(flag).title)
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
        "what_to_do": [_unmarkdown(line) for line in head_lines(a, now, xray, settings)] if in_tier else [],
        "flags": flags,
        "findings": findings,
        "count": len(findings),
        "notes": [_unmarkdown(line) for line in xray_lines(a, now, xray) + problem_lines(a)],
        "guideline": {"label": "NICE NG234", "url": NG234_URL},
    }
    if a.patient:
        view["patient"] = a.patient  # machine field: the audit record's patient, not shown
    return view
