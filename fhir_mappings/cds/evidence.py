"""Evidence in clinical words: what was found (the quote, or the code's display), where it was
written (the note type, the problem list, the exam), when (the date and how long ago) — never a
resource id in the prose. Used by the card detail (a few lines) and the full-evidence view (all)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

from fhir_mappings.clinical.evaluate import Assessment
from fhir_mappings.clinical.facts import Evidence
from fhir_mappings.clinical.terminology import ICD10, ICD10CM, LOINC, SNOMED, load_terminology
from fhir_mappings.cds.wording import MAX_EVIDENCE_LINES, QUOTE_MAX

_SYSTEM_NAMES = {SNOMED: "SNOMED CT", ICD10CM: "ICD-10-CM", ICD10: "ICD-10", LOINC: "LOINC"}
# A resource id in a problem line ("DocumentReference/d1: ...") becomes a clinical noun.
_REFERENCE = re.compile(r"\b([A-Z][A-Za-z]+)/[A-Za-z0-9\-.?]{1,64}")
_NOUN = {"DocumentReference": "a clinical note", "Condition": "a problem-list entry", "Observation": "an observation",
         "DiagnosticReport": "a report", "ClinicalImpression": "a clinical impression", "Binary": "its content",
         "ImagingStudy": "an imaging study", "ServiceRequest": "an order", "Procedure": "a procedure"}
_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|])")


def fmt_date(value: datetime | None) -> str:
    return value.date().isoformat() if value else "undated"


def how_long_ago(value: datetime | None, now: datetime) -> str:
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


def where_written(e: Evidence) -> str:
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


def plain(text: str) -> str:
    """Patient text as plain text (the evidence page escapes it as HTML): whitespace folded only."""
    return " ".join(text.split())


def what_found(e: Evidence, escape: Callable[[str], str] = _escape, quote_max: int = QUOTE_MAX) -> str:
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
    what = what_found(e)
    head = f"{title}: {what}" if title and what else (title or what or "recorded")
    return f"{head} ({where_written(e)}, {how_long_ago(e.date, now)})"


def short(title: str) -> str:
    return re.split(r"[,;]", title)[0].strip()


def evidence_lines(a: Assessment, now: datetime) -> list[str]:
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
        lines = [f"- {_line(e, now, short(term.rule(flag).title))}" for flag, e in chosen]
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


def problem_lines(a: Assessment) -> list[str]:
    unreadable = sum(1 for p in a.problems if " skipped: " in p)  # extract.describe_validation_error
    lines = []
    if unreadable:
        lines.append(f"**Note:** {unreadable} entry(ies) in the record could not be read; this assessment may be "
                     "incomplete.")
    others = [p for p in a.problems if " skipped: " not in p]  # e.g. a note not read, no terminology server
    if others:
        text = "; ".join(_REFERENCE.sub(lambda m: _NOUN.get(m.group(1), "an entry"), p) for p in others[:3])
        lines.append("**Note:** " + text[:1].upper() + text[1:] + ".")
    return lines


def evidence_count(a: Assessment) -> int:
    """How many findings the full evidence lists: red-flag evidence, back pain and cancers."""
    return len(a.evidence) + len(a.back_pain) + len(a.cancers)
