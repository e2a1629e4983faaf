"""Cards a clinician reads in five seconds and acts on, on every card type: patient-view
emergency / urgent / routine and the order-select/order-sign X-ray card for each tier.

Budgets: `summary` under 140 characters; the detail before its evidence lines ("what to do and by
when" plus the tier's lines) at most wording.DETAIL_BUDGET (600) characters; at most
wording.MAX_EVIDENCE_LINES finding lines (plus a "more" line and the cancer line)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from fhir_mappings.cds.cards import cards_for, detail_parts, mri_service_request, xray_card
from fhir_mappings.cds.wording import DETAIL_BUDGET, MAX_EVIDENCE_LINES, NG234_URL, CardSettings
from scripts.card_gallery import COORDINATOR, NOW, PATIENT, assessment, gallery, xray_order

CARDS = gallery()
RESOURCE_ID = re.compile(r"\b(Patient|Condition|Observation|DocumentReference|DiagnosticReport|ServiceRequest|Binary|"
                         r"ImagingStudy|Procedure|ClinicalImpression|Encounter|Practitioner)/[A-Za-z0-9\-.]+")
TIER_OF = {"critical": "emergency", "warning": "urgent", "info": "routine"}


def prose(card: dict) -> str:
    """What a clinician reads: summary, detail, suggestion labels, action descriptions, link labels."""
    parts = [card["summary"], card["detail"]]
    for s in card.get("suggestions", []):
        parts += [s["label"]] + [a["description"] for a in s["actions"]]
    parts += [link["label"] for link in card.get("links", [])]
    return "\n".join(parts)


@pytest.fixture(params=CARDS, ids=[name for name, _, _ in CARDS])
def one(request):
    return request.param


def test_gallery_has_every_card_type():
    kinds = {(hook, card["indicator"]) for _, hook, card in CARDS}
    assert kinds == {(h, i) for h in ("patient-view", "order-sign") for i in ("critical", "warning", "info")}


def test_summary_under_140_characters(one):
    _, _, card = one
    assert 0 < len(card["summary"]) < 140


def test_what_to_do_comes_first_within_the_budget(one):
    name, hook, card = one
    tier = TIER_OF[card["indicator"]]
    settings = COORDINATOR if tier == "emergency" and "no-coordinator" not in name else CardSettings()
    head, evidence, _ = detail_parts(assessment(tier), NOW, hook != "patient-view", settings)
    assert card["detail"].startswith(head)
    assert len(head) <= DETAIL_BUDGET, f"{name}: {len(head)} characters before the evidence"
    assert head.startswith("**") and ("MRI" in head.split("\n")[0])
    findings = [line for line in evidence if not line.startswith(("- Cancer:", "- and "))]
    assert 1 <= len(findings) <= MAX_EVIDENCE_LINES
    assert any(line.startswith("- Cancer:") for line in evidence)


def test_no_resource_id_in_the_prose(one):
    name, _, card = one
    assert not RESOURCE_ID.search(prose(card)), f"{name}: {RESOURCE_ID.search(prose(card)).group(0)}"


def test_ids_stay_in_the_machine_readable_places():
    _, _, card = next(c for c in CARDS if c[0] == "order-sign-xray-urgent")
    [update] = card["suggestions"][0]["actions"]
    assert update["type"] == "update" and update["resource"]["id"] == "xr-1"
    refs = [r["reference"] for r in update["resource"]["reasonReference"]]
    assert refs[0] == "Condition/ca-1" and "DocumentReference/gp-1" in refs


def test_nice_is_linked_once(one):
    _, _, card = one
    assert card["detail"].count(NG234_URL) == 1
    assert NG234_URL not in [link["url"] for link in card["links"]]
    assert card["source"].get("url") != NG234_URL
    urls = re.findall(r"\]\((https?://[^)]+)\)", card["detail"]) + [link["url"] for link in card["links"]]
    assert len(urls) == len(set(urls)), "a link is repeated"


def test_evidence_says_what_where_and_when(one):
    _, _, card = one
    tier = TIER_OF[card["indicator"]]
    where = {"emergency": "Emergency department note", "urgent": "GP consultation note", "routine": "problem list"}
    assert where[tier] in card["detail"]
    assert re.search(r"\(\w[^()]*, 20\d\d-\d\d-\d\d, (today|yesterday|\d+ (days|weeks|months|years) ago)\)",
                     card["detail"])
    assert "Cancer: Malignant neoplasm of breast (problem list, " in card["detail"]


@pytest.mark.parametrize("hook", ["patient-view", "order-sign"])
def test_emergency_lines(hook):
    card = next(c for n, h, c in CARDS if h == hook and c["indicator"] == "critical" and "no-coordinator" not in n)
    detail = card["detail"]
    assert "within 24 h" in card["summary"] and "within 24 h" in detail
    assert "(by 2026-12-02 09:00 UTC)" in detail
    assert "Call the MSCC coordinator now:** MSCC coordinator (acute oncology), 01632 960 123" in detail
    assert "(https://intranet.example.org/mscc)" in detail
    assert "dexamethasone 16 mg" in detail and "neutral alignment" in detail and "Meanwhile (NG234)" in detail


def test_emergency_without_a_configured_coordinator_has_a_generic_line():
    [card] = [c for n, _, c in CARDS if n == "patient-view-emergency-no-coordinator"]
    assert "**Call the MSCC coordinator now** (acute oncology on call" in card["detail"]
    assert "None" not in card["detail"]


@pytest.mark.parametrize("hook", ["patient-view", "order-sign"])
def test_urgent_lines(hook):
    card = next(c for _, h, c in CARDS if h == hook and c["indicator"] == "warning")
    detail = card["detail"]
    assert "within 1 week" in card["summary"] and "within 1 week" in detail and "(by 2026-12-08)" in detail
    assert "Ask about and document neurology" in detail and "does not mention them" in detail
    assert "Safety-net (NG234)" in detail
    assert "makes it an emergency" in detail and "within 24 h" in detail
    assert "without neurological symptoms" not in detail  # the record lacks them; that is not their absence


@pytest.mark.parametrize("hook", ["patient-view", "order-sign"])
def test_routine_lines(hook):
    card = next(c for _, h, c in CARDS if h == hook and c["indicator"] == "info")
    assert "MRI of the spine, not X-ray" in card["detail"] and "Safety-net (NG234)" in card["detail"]
    assert "within 24 h" not in card["summary"]


def test_why_not_xray_only_where_an_xray_is_ordered_pending_or_recent():
    for name, hook, card in CARDS:
        assert ("Why not X-ray" in card["detail"]) == (hook != "patient-view"), name
    ordered = xray_order() | {"status": "active", "authoredOn": (NOW - timedelta(days=1)).isoformat()}
    [card] = cards_for(assessment("urgent", [ordered]), NOW)
    assert "Why not X-ray" in card["detail"] and "A spine X-ray is ordered (2026-11-30, yesterday)" in card["detail"]
    done = {"resourceType": "DiagnosticReport", "id": "xr-report", "status": "final",
            "code": {"text": "XR lumbar spine"}, "subject": {"reference": PATIENT},
            "effectiveDateTime": (NOW - timedelta(days=20)).isoformat()}
    [card] = cards_for(assessment("routine", [done]), NOW)
    assert "Why not X-ray" in card["detail"] and "A spine X-ray is on record" in card["detail"]
    old = done | {"effectiveDateTime": (NOW - timedelta(days=400)).isoformat()}
    [card] = cards_for(assessment("routine", [old]), NOW)
    assert "Why not X-ray" not in card["detail"]  # outside the lookback: not "recent"


@pytest.mark.parametrize("tier, indicator", [("emergency", "critical"), ("urgent", "warning"), ("routine", "info")])
def test_xray_card_follows_the_tier(tier, indicator):
    card = xray_card(assessment(tier), ["ServiceRequest/xr-1"], NOW)
    assert card["indicator"] == indicator and "X-ray cannot exclude metastasis" in card["summary"]


@pytest.mark.parametrize("tier, code, contrast, priority, hours", [
    ("emergency", "36531-2", "without contrast", "stat", 24),
    ("urgent", "36400-0", "without and with IV contrast", "urgent", 24 * 7),
    ("routine", "36400-0", "without and with IV contrast", "routine", None)])
def test_mri_order_by_tier(tier, code, contrast, priority, hours):
    order = mri_service_request(assessment(tier), NOW)
    assert [(c["system"], c["code"]) for c in order["code"]["coding"]] == [
        ("http://loinc.org", code), ("http://snomed.info/sct", "241645008")]
    assert order["code"]["text"] == f"MRI whole spine {contrast}"
    assert order["priority"] == priority and order["status"] == "draft"
    if hours:
        assert order["occurrencePeriod"]["end"] == (NOW + timedelta(hours=hours)).isoformat()
    else:
        assert "occurrencePeriod" not in order
    refs = [r["reference"] for r in order["reasonReference"]]
    assert refs[0] == "Condition/ca-1" and len(refs) >= 2  # the cancer, then the evidence


def test_mri_codes_are_settings():
    settings = CardSettings(mri_codes={"emergency": ("http://example.org/local-imaging", "MRWS", "MRI whole spine MSCC"),
                                       "urgent": ("http://loinc.org", "36400-0", "MR Spine WO and W contrast IV"),
                                       "routine": ("http://loinc.org", "36400-0", "MR Spine WO and W contrast IV")})
    order = mri_service_request(assessment("emergency"), NOW, settings=settings)
    assert order["code"]["coding"][0] == {"system": "http://example.org/local-imaging", "code": "MRWS",
                                          "display": "MRI whole spine MSCC"}
    assert order["code"]["text"] == "MRI whole spine MSCC"


@pytest.mark.parametrize("intent, label", [("proposal", "Propose whole-spine MRI within 24 h"),
                                           ("plan", "Propose whole-spine MRI within 24 h"),
                                           ("order", "Add to orders: whole-spine MRI within 24 h")])
def test_suggestion_label_says_what_the_ehr_will_do(intent, label):
    [card] = cards_for(assessment("emergency"), NOW, intent)
    [suggestion] = card["suggestions"]
    assert suggestion["label"] == label and suggestion["actions"][0]["resource"]["intent"] == intent


def test_settings_feed_the_cards(monkeypatch):
    from service.core.settings import Settings, card_settings

    s = card_settings(Settings(mscc_coordinator_name="Dr On Call", mscc_coordinator_phone="bleep 1234",
                               mri_code_emergency="http://loinc.org|36531-2|MR Spine WO contrast"))
    assert s.coordinator_name == "Dr On Call" and s.coordinator_url is None
    assert s.mri_codes["emergency"] == ("http://loinc.org", "36531-2", "MR Spine WO contrast")
    assert s.mri_codes["urgent"][1] == "36400-0"
    [card] = cards_for(assessment("emergency"), NOW, settings=s)
    assert "Dr On Call, bleep 1234" in card["detail"]
    with pytest.raises(ValueError):
        Settings(mri_code_urgent="36400-0")
    with pytest.raises(ValueError):
        Settings(mscc_coordinator_url="javascript:alert(1)")


def test_patient_text_cannot_inject_markdown():
    note = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "Clinical note"},
            "subject": {"reference": PATIENT}, "effectiveDateTime": (NOW - timedelta(days=1)).isoformat(),
            "valueString": "New leg weakness [click](https://evil.example) <img src=x> **now**"}
    from fhir_mappings.clinical.evaluate import assess
    from scripts.card_gallery import record

    a = assess(record("routine") + [note], NOW)
    a.patient = PATIENT
    [card] = cards_for(a, NOW)
    assert card["indicator"] == "critical" and "New leg weakness" in card["detail"]  # the note is quoted
    # Escaped: Markdown shows the characters, it does not make a link, an image or emphasis of them.
    assert not re.search(r"(?<!\\)\]\(https://evil", card["detail"])
    assert not re.search(r"(?<!\\)<img", card["detail"]) and "\\*\\*now\\*\\*" in card["detail"]


def test_a_suspicion_is_shown_as_suspected():
    from fhir_mappings.clinical.evaluate import assess
    from scripts.card_gallery import _note, record

    a = assess(record("routine") + [_note("ed-2", "Emergency department note", "?cauda equina syndrome.", 0.5)], NOW)
    a.patient = PATIENT
    [card] = cards_for(a, NOW)
    assert card["indicator"] == "critical" and "(suspected)" in card["detail"]


# ---------------------------------------------------------------- the full evidence and its link

EVIDENCE_URL = "https://cds.example.org/evidence/abcdefghijklmnopqrstuvwxyz012345"
MACHINE_KEYS = {"reference", "field", "concept", "id", "patient", "url", "date", "evaluated_at", "version",
                "tier", "section", "status", "box", "findings", "count"}


def _ids():
    counter = iter(range(1, 1000))
    return lambda: f"00000000-0000-4000-8000-{next(counter):012d}"


def _prose_of_view(value, key: str = "") -> list[str]:
    """Every string of an evidence view a clinician reads (machine fields left out)."""
    if key in MACHINE_KEYS:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _prose_of_view(v, k)]
    if isinstance(value, list):
        return [s for v in value for s in _prose_of_view(v)]
    return []


def _busy_emergency():
    """More findings than a card shows: three more notes, each with red flags."""
    from scripts.card_gallery import _note

    return assessment("emergency", [
        _note("ed-2", "Emergency department note", "Saddle anaesthesia reported this morning.", 0.1),
        _note("gp-7", "GP consultation note", "Back pain wakes her at night for the past 3 weeks.", 3),
        _note("on-3", "Oncology clinic letter", "Numbness in both legs, walking with difficulty.", 1)])


@pytest.mark.parametrize("tier", ["emergency", "urgent", "routine"])
def test_evidence_view_lists_every_evidence_item(tier):
    import json

    from fhir_mappings.cds.evidence import evidence_count
    from fhir_mappings.cds.evidence_view import evidence_view

    a = assessment(tier)
    view = evidence_view(a, NOW)
    assert json.loads(json.dumps(view)) == view  # JSON-serialisable as it is
    items = a.evidence + a.back_pain + a.cancers
    assert view["count"] == len(view["findings"]) == len(items) == evidence_count(a)
    assert sorted(f["reference"] for f in view["findings"]) == sorted(e.reference for e in items)
    assert [f["id"] for f in view["flags"]] == a.red_flags
    assert view["tier"] == tier and view["summary"] == cards_for(a, NOW)[0]["summary"]
    assert view["what_to_do"][0].startswith({"emergency": "Whole-spine MRI within 24 h",
                                             "urgent": "Whole-spine MRI within 1 week",
                                             "routine": "MRI of the spine, not X-ray"}[tier])
    assert not any("**" in line for line in view["what_to_do"])  # plain text, not the card's Markdown
    for item in view["findings"]:  # what, where, when
        assert item["what"] and item["where"] and re.match(r"20\d\d-\d\d-\d\d, ", item["when"])
        assert item["line"] == f"{item['title']}: {item['what']} ({item['where']}, {item['when']})"
    assert any(f["line"].startswith("Cancer: Malignant neoplasm of breast (problem list, ")
               for f in view["findings"])


def test_evidence_view_holds_what_the_card_leaves_out():
    from fhir_mappings.cds.evidence_view import evidence_view

    a = _busy_emergency()
    [card] = cards_for(a, NOW)
    view = evidence_view(a, NOW)
    assert "more finding(s) in the record" in card["detail"]  # the card shows MAX_EVIDENCE_LINES of them
    assert view["count"] == len(a.evidence) + len(a.back_pain) + len(a.cancers) > MAX_EVIDENCE_LINES + 1
    text = "\n".join(f["line"] for f in view["findings"])
    for e in a.evidence + a.back_pain:
        assert e.quote is None or e.quote in text, e.quote
    for phrase in ("Saddle anaesthesia", "Numbness in both legs", "Oncology clinic letter", "wakes her at night"):
        assert phrase in text


def test_evidence_view_keeps_resource_ids_out_of_the_prose():
    from fhir_mappings.cds.evidence_view import evidence_view

    a = _busy_emergency()
    a.problems = ["DocumentReference/gp-9 skipped: DocumentReference.date: invalid datetime",
                  "Binary/bin-4: note content not read (over 2000000 bytes)"]
    view = evidence_view(a, NOW)
    prose = "\n".join(_prose_of_view(view))
    assert not RESOURCE_ID.search(prose), RESOURCE_ID.search(prose).group(0)
    for rid in ("ed-1", "ed-2", "gp-7", "on-3", "ca-1", "lbp-1", "gp-9", "bin-4", "demo"):
        assert rid not in prose, rid
    # the references are there, as machine fields
    assert {"DocumentReference/ed-2", "DocumentReference/on-3", "Condition/ca-1"} <= {
        f["reference"] for f in view["findings"]}
    assert view["patient"] == PATIENT
    # the problems, made clinical as on the card
    assert "Note: 1 entry(ies) in the record could not be read; this assessment may be incomplete." in view["notes"]
    assert "Note: Its content: note content not read (over 2000000 bytes)." in view["notes"]


def test_evidence_view_quotes_patient_text_plain_for_the_page_to_escape():
    from fhir_mappings.cds.evidence_view import evidence_view
    from fhir_mappings.clinical.evaluate import assess
    from scripts.card_gallery import record

    note = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "Clinical note"},
            "subject": {"reference": PATIENT}, "effectiveDateTime": (NOW - timedelta(days=1)).isoformat(),
            "valueString": "New leg weakness <img src=x> **now**"}
    a = assess(record("routine") + [note], NOW)
    view = evidence_view(a, NOW)
    assert any("<img src=x> **now**" in f["what"] for f in view["findings"])  # not Markdown-escaped: HTML escapes


def _without(card: dict) -> dict:
    return {k: v for k, v in card.items() if k != "links"}


@pytest.mark.parametrize("tier", ["emergency", "urgent", "routine"])
@pytest.mark.parametrize("hook", ["patient-view", "order-sign"])
def test_evidence_link_only_with_evidence_url_and_within_the_budgets(tier, hook):
    import copy
    import json

    from fhir_mappings.cds.evidence_view import evidence_view
    from fhir_mappings.cds.wording import LINKS

    before = copy.deepcopy(LINKS)
    a = assessment(tier)

    def make(**kw):
        if hook == "patient-view":
            return cards_for(a, NOW, "proposal", _ids(), COORDINATOR, **kw)[0]
        return xray_card(a, ["ServiceRequest/xr-1"], NOW, "order", _ids(), COORDINATOR, **kw)

    plain, none, linked = make(), make(evidence_url=None), make(evidence_url=EVIDENCE_URL)
    assert json.dumps(none, sort_keys=True) == json.dumps(plain, sort_keys=True)  # byte for byte as before
    assert plain["links"] == LINKS and all(link["url"] != EVIDENCE_URL for link in plain["links"])
    count = evidence_view(a, NOW)["count"]
    assert linked["links"] == LINKS + [{"label": f"Full evidence ({count} findings)", "url": EVIDENCE_URL,
                                        "type": "absolute"}]
    assert _without(linked) == _without(plain)  # summary, detail, suggestions: unchanged
    assert len(linked["summary"]) < 140 and not RESOURCE_ID.search(prose(linked))
    urls = [link["url"] for link in linked["links"]]
    assert len(urls) == len(set(urls))
    assert LINKS == before and linked["links"] is not LINKS  # the shared constant is never changed
    assert make()["links"] == before  # and the next card without a link has no evidence link


def test_gallery_cards_have_no_evidence_link():
    assert all(not link["label"].startswith("Full evidence") for _, _, card in CARDS for link in card["links"])
