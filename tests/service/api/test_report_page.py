"""GET /audit/report (the page), /audit/report.csv and .json through the real app, on audit records
written into a real SQLite store.

Seeded, with the figures worked out by hand (hours from first evidence; median of 3 = the middle one;
p90 by nearest rank = the ceil(0.9 x 3) = 3rd smallest):
  October 2026, emergency (24 h): e1 MRI at 10 h, e2 at 20 h (met), e3 at 30 h (breach, escalated)
      -> 3 flagged, 2 of 3 met = 67%, median 20 h, p90 30 h; alerts 1, 2, 3 h -> median 2, p90 3;
         one breach, e3, linked to /audit?patient=Patient%2Fe3
  October 2026, urgent (168 h): u1 MRI at 48 h -> 1 of 1 = 100%, median and p90 48 h
  November 2026: nothing -> "no data" for both tiers (not 0%)
  Cards, October, emergency: k1 accepted, k2 overridden (already-imaged) -> 2 served, 1, 1
"""

import csv
import io
import re
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.pages import REVIEW_CSP
from service.api.routes.report_page import PLOT_HEIGHT, hours_scale
from service.core.settings import Settings
from service.infra.audit.store import AuditStore

TOKEN = "report-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PERIOD = {"since": "2026-10", "until": "2026-11"}
SVG = "{http://www.w3.org/2000/svg}"


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def episode(store, patient, tier, first, *, mri_after, alert_after=None, escalate_after=None):
    """The clock's records of one episode, each written at its own time."""
    alerted = iso(first + timedelta(hours=alert_after)) if alert_after is not None else None
    events = [("started", 0), ("escalated", escalate_after), ("done", mri_after)]
    for event, after in sorted((e for e in events if e[1] is not None), key=lambda e: e[1]):
        at = first + timedelta(hours=after)
        store.append("mri-clock", "success", actor="worker", patient=patient, at=at,
                     detail={"event": event, "episode": f"{patient}#1", "tier": tier, "first_evidence_at": iso(first),
                             "alerted_at": alerted, "deadline": None, "at": iso(at), "reason": None,
                             "communication": None})


def seed(store) -> None:
    october = datetime(2026, 10, 5, tzinfo=timezone.utc)
    episode(store, "Patient/e1", "emergency", october, mri_after=10, alert_after=1)
    episode(store, "Patient/e2", "emergency", october + timedelta(days=7), mri_after=20, alert_after=2)
    episode(store, "Patient/e3", "emergency", october + timedelta(days=14), mri_after=30, alert_after=3,
            escalate_after=20)
    episode(store, "Patient/u1", "urgent", october + timedelta(days=3), mri_after=48)
    store.append("card", "success", actor="https://ehr.example.org", patient="Patient/e1",
                 at=october + timedelta(minutes=30),
                 detail={"hook": "patient-view", "tier": "emergency", "cards": ["k1", "k2"]})
    store.append("feedback", "accepted", actor="https://ehr.example.org", at=october + timedelta(minutes=40),
                 detail={"card": "k1"})
    store.append("feedback", "overridden", actor="https://ehr.example.org", at=october + timedelta(minutes=41),
                 detail={"card": "k2", "overrideReason": {"system": "urn:x", "code": "already-imaged"}})


@pytest.fixture
def store(tmp_path):
    store = AuditStore(f"sqlite:///{tmp_path}/audit.sqlite")
    seed(store)
    return store


@pytest.fixture
def client(store, tmp_path):
    app = create_app(Settings(environment="test", audit_db_url=f"sqlite:///{tmp_path}/audit.sqlite",
                              reviewer_token=TOKEN))
    with TestClient(app) as c:
        yield c


@pytest.fixture
def signed_in(client):
    assert client.post("/audit/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303
    return client


def cells(html: str, row_id: str) -> dict[str, str]:
    """The cells of the table row with this id: class -> text."""
    row = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', html, re.S).group(1)
    return {m.group(1): re.sub(r"<[^>]+>", "", m.group(2)).strip()
            for m in re.finditer(r'<td class="([\w-]+)">(.*?)</td>', row, re.S)}


def charts(html: str) -> dict[str, ET.Element]:
    """Each inline <svg> parsed as XML (so also: well-formed), by id."""
    return {(svg := ET.fromstring(m.group(0))).get("id"): svg for m in re.finditer(r"<svg.*?</svg>", html, re.S)}


def bars(svg: ET.Element) -> list[tuple[str, str, float]]:
    """(label drawn, tooltip, height) of each bar."""
    rects = [r for r in svg.iter(f"{SVG}rect") if r.get("class") == "bar"]
    labels = [t.text for t in svg.iter(f"{SVG}text") if t.get("class") == "bar-label"]
    assert len(rects) == len(labels)
    return [(label, rect.find(f"{SVG}title").text, float(rect.get("height"))) for label, rect in zip(labels, rects)]


def test_without_a_session_the_page_is_the_sign_in_form_and_downloads_are_refused(client):
    page = client.get("/audit/report", params=PERIOD)
    assert page.status_code == 401 and 'name="token"' in page.text and "Patient/e3" not in page.text
    for fmt in ("csv", "json"):
        assert client.get(f"/audit/report.{fmt}", params=PERIOD).status_code == 401


def test_the_page_shows_the_hand_worked_figures(signed_in):
    page = signed_in.get("/audit/report", params=PERIOD)
    assert page.status_code == 200
    html = page.text
    assert cells(html, "share-2026-10-emergency") == {
        "month": "2026-10", "tier": "emergency", "flagged": "3", "met": "2", "breaches": "1", "denominator": "3",
        "share": "67%", "open": "0", "closed-early": "0"}
    assert cells(html, "share-2026-10-urgent")["share"] == "100%"
    assert cells(html, "share-2026-11-emergency")["share"] == "no data"
    hours = cells(html, "hours-2026-10-emergency")
    assert (hours["mri-n"], hours["mri-median"], hours["mri-p90"]) == ("3", "20", "30")
    assert (hours["alert-median"], hours["alert-p90"], hours["target"], hours["escalated"]) == ("2", "3", "24", "1")
    assert (cells(html, "hours-2026-10-urgent")["mri-median"], cells(html, "hours-2026-10-urgent")["target"]) == \
        ("48", "168")
    assert cells(html, "hours-2026-11-urgent")["mri-median"] == "no data"
    assert cells(html, "cards-2026-10-emergency") == {"served": "2", "accepted": "1", "overridden": "1",
                                                      "reasons": "already-imaged (1)"}
    breaches = re.search(r'<table id="breaches">(.*?)</table>', html, re.S).group(1)
    assert re.findall(r'<a class="timeline-link" href="([^"]+)">([^<]+)</a>', breaches) == \
        [("/audit?patient=Patient%2Fe3", "Patient/e3")]
    assert 'href="/audit"' in html  # back to the audit log


def test_the_charts_draw_the_same_numbers_accessibly(signed_in):
    found = charts(signed_in.get("/audit/report", params=PERIOD).text)
    assert set(found) == {"chart-share", "chart-hours-emergency", "chart-hours-urgent"}
    for chart_id, svg in found.items():
        assert svg.get("role") == "img"
        assert svg.get("aria-labelledby") == f"{chart_id}-title {chart_id}-desc"
        assert svg.find(f"{SVG}title").text and svg.find(f"{SVG}desc").text

    share = bars(found["chart-share"])  # October emergency, urgent; November emergency, urgent
    assert [label for label, _, _ in share] == ["67%", "100%", "no data", "no data"]
    assert [height for _, _, height in share] == [round(2 / 3 * PLOT_HEIGHT, 1), PLOT_HEIGHT, 0, 0]
    assert "2 of 3" in share[0][1] and "2026-10: emergency 67% (2 of 3)" in found["chart-share"].find(f"{SVG}desc").text

    emergency = found["chart-hours-emergency"]
    top, _ = hours_scale(24, [20, 30])
    assert top == 36  # 1.5 x 24 h, above the 30 h p90, on the 12 h ticks
    assert [(label, height) for label, _, height in bars(emergency)] == [
        ("20 h", round(20 / 36 * PLOT_HEIGHT, 1)), ("30 h", round(30 / 36 * PLOT_HEIGHT, 1)),
        ("no data", 0)]  # November: one label for the month, not a 0 h bar
    target = next(line for line in emergency.iter(f"{SVG}line") if line.get("class") == "target")
    assert float(target.get("y1")) == pytest.approx(24 + PLOT_HEIGHT * (1 - 24 / 36))
    assert "target 24 h" in ET.tostring(emergency, encoding="unicode")
    assert "target 168 h" in ET.tostring(found["chart-hours-urgent"], encoding="unicode")


def test_the_page_keeps_the_review_sites_policy(signed_in):
    page = signed_in.get("/audit/report", params=PERIOD)
    assert page.headers["content-security-policy"] == REVIEW_CSP
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
    # The CSP allows the page's one <style> block by hash: no other style, no script, nothing fetched.
    assert page.text.count("<style>") == 1 and " style=" not in page.text and "<script" not in page.text
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)


def test_reading_the_report_is_audited_like_the_command(signed_in, store):
    signed_in.get("/audit/report", params=PERIOD)
    signed_in.get("/audit/report.csv", params=PERIOD)
    access = store.query(kinds=["audit-access"], newest_first=False)[0]
    assert [(r.actor, r.detail) for r in access] == [
        ("reviewer", {"action": "report", "format": fmt, "since": "2026-10", "until": "2026-11", "count": 4})
        for fmt in ("html", "csv")]


@pytest.mark.parametrize("params, message", [
    ({"since": "2026-13"}, "since: expected a month as YYYY-MM"),
    ({"until": "Oct 2026"}, "until: expected a month as YYYY-MM"),
    ({"since": "2026-11", "until": "2026-10"}, "since (2026-11) is after until (2026-10)"),
    ({"since": "0026-10", "until": "2026-11"}, "at most 120 months at a time"),
    ({"until": "9026-10"}, "at most 120 months at a time"),  # from this month on
])
def test_bad_months_are_400_and_not_read(signed_in, store, params, message):
    page = signed_in.get("/audit/report", params=params)
    assert page.status_code == 400 and message in page.text and 'id="months"' in page.text
    download = signed_in.get("/audit/report.csv", params=params)
    assert download.status_code == 400 and download.json()["issue"][0]["diagnostics"] == message
    assert store.query(kinds=["audit-access"])[1] == 0


def test_ten_years_are_one_page(signed_in):
    assert signed_in.get("/audit/report", params={"since": "2016-12", "until": "2026-11"}).status_code == 200
    assert signed_in.get("/audit/report", params={"since": "2016-11", "until": "2026-11"}).status_code == 400


def test_downloads_are_the_commands_documents(signed_in):
    got = signed_in.get("/audit/report.csv", params=PERIOD, headers=AUTH)
    assert got.headers["content-type"].startswith("text/csv")
    assert got.headers["content-disposition"] == 'attachment; filename="spinewatch-report-2026-10-2026-11.csv"'
    rows = {(r["month"], r["tier"]): r for r in csv.DictReader(io.StringIO(got.text))}
    assert len(rows) == 4
    assert {k: rows[("2026-10", "emergency")][k] for k in ("met", "denominator", "met_share", "breaches")} == \
        {"met": "2", "denominator": "3", "met_share": "0.6667", "breaches": "1"}
    assert rows[("2026-11", "urgent")]["met_share"] == ""
    document = signed_in.get("/audit/report.json", params=PERIOD).json()
    breach, = document["rows"][0]["breaches"]
    assert (breach["patient"], breach["mri_hours"], breach["review_url"]) == \
        ("Patient/e3", 30.0, "/audit?patient=Patient%2Fe3")
    assert signed_in.get("/audit/report.xml", params=PERIOD).status_code == 400  # path.format: csv or json


def test_the_audit_page_links_to_the_report(signed_in):
    assert 'href="/audit/report"' in signed_in.get("/audit").text


def test_signing_in_from_the_report_page_returns_to_it_and_never_elsewhere(client):
    form = client.get("/audit/report")
    assert form.status_code == 401 and '<input type="hidden" name="next" value="/audit/report">' in form.text
    bad = client.post("/audit/login", data={"token": "nope", "next": "/audit/report"}, follow_redirects=False)
    assert bad.status_code == 303 and bad.headers["location"] == "/audit/report?failed=1"
    for elsewhere in ("https://evil.example/audit", "//evil.example", "/audit/../metrics", "/audit/report?x=1", "/"):
        sent = client.post("/audit/login", data={"token": TOKEN, "next": elsewhere}, follow_redirects=False)
        assert sent.status_code == 303 and sent.headers["location"] == "/audit", elsewhere
    ok = client.post("/audit/login", data={"token": TOKEN, "next": "/audit/report"}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/audit/report"
    assert client.get("/audit/report").status_code == 200
