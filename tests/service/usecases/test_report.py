"""The MRI-standards report builder on hand-made audit records (plain dicts, as AuditRecord.to_json()).

Expected figures are worked out by hand in the comments: hours from first evidence; median = the mean
of the two middle values for even n; p90 = nearest rank, the ceil(0.9 n)-th smallest value."""

from datetime import datetime, timezone

import pytest

from service.infra.audit.records import utc_iso
from service.usecases.report import build_report, csv_rows, parse_month, percentile, summary

NOW = datetime(2026, 12, 10, 12, 0, tzinfo=timezone.utc)
BASE = "https://cds.example.org"


class Log:
    """Records in chain order (seq 1, 2, ...)."""

    def __init__(self):
        self.records = []

    def add(self, kind, detail, *, patient=None, recorded="2026-11-01T00:00:00.000000Z", outcome="success"):
        self.records.append({"seq": len(self.records) + 1, "recorded": recorded, "kind": kind, "outcome": outcome,
                             "actor": "test", "patient": patient, "detail": detail})

    def clock(self, patient, episode, event, at, *, tier, first, alerted=None, reason=None):
        self.add("mri-clock", {"event": event, "episode": episode, "tier": tier, "first_evidence_at": first,
                               "alerted_at": alerted, "deadline": None, "at": at, "reason": reason,
                               "communication": None}, patient=f"Patient/{patient}", recorded=at)

    def episode(self, patient, tier, first, *, alerted=None, ordered=None, done=None, escalated=None, closed=None):
        ep = f"{patient}1"
        self.clock(patient, ep, "started", first, tier=tier, first=first, alerted=alerted)
        for event, at in (("escalated", escalated), ("ordered", ordered), ("done", done), ("closed", closed)):
            if at:
                self.clock(patient, ep, event, at, tier=tier, first=first, alerted=alerted,
                           reason="retracted" if event == "closed" else None)


def hand_made() -> list[dict]:
    log = Log()
    # November, emergency (24 h)
    log.episode("a", "emergency", "2026-11-03T08:00:00Z", alerted="2026-11-03T08:30:00Z",      # alert 0.5 h
                ordered="2026-11-03T10:00:00Z", done="2026-11-03T20:00:00Z")                    # order 2, MRI 12: met
    log.episode("b", "emergency", "2026-11-10T00:00:00Z", alerted="2026-11-10T01:00:00Z",      # alert 1
                ordered="2026-11-10T04:00:00Z", escalated="2026-11-10T20:00:00Z",               # order 4
                done="2026-11-11T06:00:00Z")                                                    # MRI 30: breach
    log.clock("b", "b1", "breached", "2026-11-11T00:00:00Z", tier="emergency", first="2026-11-10T00:00:00Z")
    # c: urgent, then an emergency: the clock closes the urgent episode "upgraded" and opens an emergency
    # one (event "upgraded"); counted once, as emergency, timed from the emergency's evidence
    log.clock("c", "c-u", "started", "2026-11-20T00:00:00Z", tier="urgent", first="2026-11-20T00:00:00Z",
              alerted="2026-11-20T02:00:00Z")
    log.clock("c", "c-u", "closed", "2026-11-21T00:30:00Z", tier="urgent", first="2026-11-20T00:00:00Z",
              alerted="2026-11-20T02:00:00Z", reason="upgraded")
    log.clock("c", "c-e", "upgraded", "2026-11-21T00:30:00Z", tier="emergency", first="2026-11-21T00:00:00Z")
    for event, at in (("ordered", "2026-11-21T05:00:00Z"), ("done", "2026-11-21T10:00:00Z"),   # order 5, MRI 10
                      ("closed", "2026-11-21T10:05:00Z")):                                     # met
        log.clock("c", "c-e", event, at, tier="emergency", first="2026-11-21T00:00:00Z",
                  alerted="2026-11-21T03:00:00Z", reason="done" if event == "closed" else None)  # alert 3
    # d: first evidence in the last hour of November, MRI in December: a November episode
    log.episode("d", "emergency", "2026-11-30T23:00:00Z", alerted="2026-12-01T00:30:00Z",      # alert 1.5
                done="2026-12-01T21:00:00Z")                                                    # MRI 22: met
    # December, emergency
    log.episode("e", "emergency", "2026-12-01T00:00:00Z", alerted="2026-12-01T02:00:00Z")      # no MRI, 24 h gone
    log.episode("f", "emergency", "2026-12-10T00:00:00Z", alerted="2026-12-10T01:00:00Z",      # 12 h in: open
                ordered="2026-12-10T06:00:00Z")
    log.episode("g", "emergency", "2026-12-05T00:00:00Z", closed="2026-12-05T06:00:00Z")       # closed early
    log.episode("k", "emergency", "2026-12-02T00:00:00Z", done="2026-12-03T00:00:00Z")         # MRI at 24 h: met
    # November, urgent (7 days = 168 h)
    log.episode("h", "urgent", "2026-11-15T00:00:00Z", alerted="2026-11-15T12:00:00Z",         # alert 12
                ordered="2026-11-16T00:00:00Z", done="2026-11-20T00:00:00Z")                    # order 24, MRI 120
    log.episode("i", "urgent", "2026-11-01T00:00:00Z", done="2026-11-09T00:00:00Z")            # MRI 192: breach
    # December, urgent: 60 h in, open
    log.episode("j", "urgent", "2026-12-08T00:00:00Z")
    # cards and feedback
    log.add("card", {"hook": "patient-view", "tier": "emergency", "cards": ["c-1", "c-2"]}, patient="Patient/a",
            recorded="2026-11-03T09:00:00.000000Z")
    log.add("card", {"hook": "patient-view", "tier": "urgent", "cards": ["c-3"]}, patient="Patient/h",
            recorded="2026-11-30T23:59:59.999999Z")
    log.add("card", {"hook": "patient-view", "tier": "routine", "cards": ["c-4"]}, patient="Patient/z",
            recorded="2026-11-04T00:00:00.000000Z")
    log.add("card", {"hook": "patient-view", "tier": "emergency", "cards": ["c-5"]}, patient="Patient/e",
            recorded="2026-12-01T00:00:00.000000Z")
    reason = {"system": "https://spinewatch.example.org/override-reason", "code": "already-imaged"}
    log.add("feedback", {"card": "c-1"}, outcome="accepted", recorded="2026-11-03T09:05:00.000000Z")
    log.add("feedback", {"card": "c-2", "overrideReason": reason}, outcome="overridden",
            recorded="2026-11-03T09:06:00.000000Z")
    log.add("feedback", {"card": "c-3"}, outcome="overridden", recorded="2026-12-01T00:10:00.000000Z")
    log.add("feedback", {"card": "c-4"}, outcome="accepted", recorded="2026-11-04T00:01:00.000000Z")
    log.add("feedback", {"card": "c-x"}, outcome="accepted", recorded="2026-11-04T00:01:00.000000Z")
    log.add("feedback", {"card": "c-5", "overrideReason": reason}, outcome="overridden",
            recorded="2026-12-01T00:05:00.000000Z")
    # other kinds are not read
    log.add("evaluation", {"tier": "emergency"}, patient="Patient/a", recorded="2026-11-03T08:10:00.000000Z")
    return log.records


def rows(report) -> dict:
    return {(r["month"], r["tier"]): r for r in report["rows"]}


@pytest.fixture(scope="module")
def report():
    return build_report(hand_made(), now=NOW, review_base=BASE)


def test_months_default_to_first_with_data_until_now(report):
    assert (report["since"], report["until"]) == ("2026-11", "2026-12")
    assert [(r["month"], r["tier"]) for r in report["rows"]] == [
        ("2026-11", "emergency"), ("2026-11", "urgent"), ("2026-12", "emergency"), ("2026-12", "urgent")]
    assert set(report["definitions"]) >= {"p90", "median", "met_share", "open", "breaches", "closed_early"}


def test_november_emergency_times_and_share(report):
    row = rows(report)[("2026-11", "emergency")]
    assert row["flagged"] == 4  # a, b, c (upgraded), d (first evidence 23:00 on 30 Nov)
    assert row["alert_hours"] == {"n": 4, "median": 1.25, "p90": 3.0}   # 0.5 1 1.5 3
    assert row["order_hours"] == {"n": 3, "median": 4.0, "p90": 5.0}    # 2 4 5
    assert row["mri_hours"] == {"n": 4, "median": 17.0, "p90": 30.0}    # 10 12 22 30
    assert (row["target_hours"], row["met"], row["denominator"], row["met_share"]) == (24, 3, 4, 0.75)
    assert (row["open"], row["escalated"], row["closed_early"]) == (0, 1, [])


def test_a_breach_names_patient_episode_and_timeline_link(report):
    [breach] = rows(report)[("2026-11", "emergency")]["breaches"]
    assert breach == {"patient": "Patient/b", "episode": "b1", "tier": "emergency",
                      "first_evidence_at": "2026-11-10T00:00:00.000000Z", "target_end": "2026-11-11T00:00:00.000000Z",
                      "mri_done_at": "2026-11-11T06:00:00.000000Z", "mri_hours": 30.0, "escalations": 1,
                      "review_url": "https://cds.example.org/audit?patient=Patient%2Fb"}


def test_upgrade_counts_once_as_emergency(report):
    november = rows(report)
    assert november[("2026-11", "urgent")]["flagged"] == 2  # h and i, not c's urgent episode
    assert november[("2026-11", "urgent")]["closed_early"] == []
    assert november[("2026-11", "emergency")]["flagged"] == 4


def test_november_urgent(report):
    row = rows(report)[("2026-11", "urgent")]
    assert row["alert_hours"] == {"n": 1, "median": 12.0, "p90": 12.0}
    assert row["order_hours"] == {"n": 1, "median": 24.0, "p90": 24.0}
    assert row["mri_hours"] == {"n": 2, "median": 156.0, "p90": 192.0}  # 120 192
    assert (row["target_hours"], row["met"], row["denominator"], row["met_share"]) == (168, 1, 2, 0.5)
    assert [(b["patient"], b["mri_hours"]) for b in row["breaches"]] == [("Patient/i", 192.0)]


def test_december_open_closed_and_not_done(report):
    row = rows(report)[("2026-12", "emergency")]
    assert row["flagged"] == 4 and row["open"] == 1            # f: 12 h of 24 gone, not in the denominator
    assert (row["met"], row["denominator"], row["met_share"]) == (1, 2, 0.5)  # k met, e breached
    [breach] = row["breaches"]                                 # e: no MRI, 24 h passed on 2 Dec
    assert (breach["patient"], breach["mri_done_at"], breach["mri_hours"]) == ("Patient/e", None, None)
    [closed] = row["closed_early"]
    assert (closed["patient"], closed["reason"], closed["closed_at"]) == (
        "Patient/g", "retracted", "2026-12-05T06:00:00.000000Z")
    assert row["alert_hours"] == {"n": 2, "median": 1.5, "p90": 2.0}  # e 2, f 1
    assert row["mri_hours"] == {"n": 1, "median": 24.0, "p90": 24.0}  # k, exactly on target
    urgent = rows(report)[("2026-12", "urgent")]
    assert (urgent["flagged"], urgent["open"], urgent["denominator"], urgent["met_share"]) == (1, 1, 0, None)


def test_an_open_episode_counts_once_its_target_passes():
    later = build_report(hand_made(), now=datetime(2026, 12, 11, 0, 0, tzinfo=timezone.utc))
    row = rows(later)[("2026-12", "emergency")]
    assert (row["open"], row["denominator"]) == (0, 3)  # f's 24 h ended at 00:00 on 11 Dec
    assert sorted(b["patient"] for b in row["breaches"]) == ["Patient/e", "Patient/f"]


def test_card_acceptance_and_override_reasons(report):
    r = rows(report)
    assert {k: r[("2026-11", "emergency")][k] for k in ("cards_served", "cards_accepted", "cards_overridden",
                                                          "override_reasons")} == {
        "cards_served": 2, "cards_accepted": 1, "cards_overridden": 1, "override_reasons": {"already-imaged": 1}}
    # c-3 was recorded in the last microsecond of November; its feedback (in December) counts with it
    assert (r[("2026-11", "urgent")]["cards_overridden"], r[("2026-11", "urgent")]["override_reasons"]) == (
        1, {"unspecified": 1})
    assert (r[("2026-12", "emergency")]["cards_served"], r[("2026-12", "emergency")]["override_reasons"]) == (
        1, {"already-imaged": 1})
    assert r[("2026-12", "urgent")]["cards_served"] == 0


def test_since_and_until_select_months():
    december = build_report(hand_made(), now=NOW, since="2026-12", until="2026-12")
    assert [(r["month"], r["tier"]) for r in december["rows"]] == [("2026-12", "emergency"), ("2026-12", "urgent")]
    empty = build_report([], now=NOW, since="2026-09", until="2026-10")
    assert [r["month"] for r in empty["rows"]] == ["2026-09", "2026-09", "2026-10", "2026-10"]
    assert all(r["flagged"] == 0 and r["met_share"] is None for r in empty["rows"])


def test_csv_rows(report):
    header, *body = list(csv_rows(report))
    assert header[:5] == ["month", "tier", "flagged", "open", "closed_early"] and len(body) == 4
    line = dict(zip(header, body[0]))
    assert (line["month"], line["tier"], line["mri_median_h"], line["mri_p90_h"], line["met_share"],
            line["breaches"], line["override_reasons"]) == ("2026-11", "emergency", 17.0, 30.0, 0.75, 1,
                                                             "already-imaged=1")
    december = dict(zip(header, body[2]))
    assert (december["alert_median_h"], december["closed_early"]) == (1.5, 1)
    assert dict(zip(header, body[3]))["met_share"] == ""


def test_nearest_rank_percentile_and_median():
    assert percentile(list(range(1, 11)), 90) == 9     # ceil(9.0) = 9th
    assert percentile(list(range(1, 12)), 90) == 10    # ceil(9.9) = 10th
    assert percentile([5.0], 90) == 5.0
    assert summary([4.0, 1.0, 3.0]) == {"n": 3, "median": 3.0, "p90": 4.0}


@pytest.mark.parametrize("bad", ["2026-13", "2026-00", "2026-1", "26-01", "2026/01", "december", ""])
def test_parse_month_refuses(bad):
    with pytest.raises(ValueError):
        parse_month(bad)


def test_fed_by_the_mri_clocks_own_events():
    """The producer's side of the interface: the records the MRI clock (fhir_mappings/cds/mri_clock.py)
    writes for an urgent patient who becomes an emergency and has the MRI 20 h after that evidence."""
    from datetime import timedelta

    from fhir_mappings.cds import mri_clock as mc

    settings = mc.ClockSettings({"emergency": timedelta(hours=4), "urgent": timedelta(hours=48)},
                                timedelta(days=30), timedelta(minutes=5))
    t0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
    urgent_evidence, emergency_evidence = t0 - timedelta(hours=2), t0 + timedelta(hours=10)
    events = []
    clock, new = mc.on_evaluation(None, "Patient/p1", mc.Assessed("urgent", {"urgent": [urgent_evidence]},
                                                                  alerted_at=t0), [], t0, settings)
    events += new
    upgrade_at = t0 + timedelta(hours=11)
    clock, new = mc.on_evaluation(clock, "Patient/p1", mc.Assessed(
        "emergency", {"emergency": [emergency_evidence], "urgent": [urgent_evidence]},
        alerted_at=upgrade_at), [], upgrade_at, settings)
    events += new
    mri = mc.MriFact("ImagingStudy/mri-1", "done", emergency_evidence + timedelta(hours=20))
    clock, new = mc.watch(clock, [mri], emergency_evidence + timedelta(hours=21), settings)
    events += new
    records = [{"seq": n, "recorded": utc_iso(e.at), "kind": "mri-clock", "outcome": "success", "actor": "worker",
                "patient": e.clock.patient, "detail": e.audit_detail()} for n, e in enumerate(events, 1)]
    report = build_report(records, now=t0 + timedelta(days=30))
    november = rows(report)
    assert november[("2026-11", "urgent")]["flagged"] == 0
    emergency = november[("2026-11", "emergency")]
    assert (emergency["flagged"], emergency["met"], emergency["denominator"]) == (1, 1, 1)
    assert emergency["mri_hours"] == {"n": 1, "median": 20.0, "p90": 20.0}
    assert emergency["alert_hours"] == {"n": 1, "median": 1.0, "p90": 1.0}  # alerted 1 h after the evidence
