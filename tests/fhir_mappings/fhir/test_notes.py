"""Clinical notes read by the pure core (US Core Clinical Notes): DocumentReference content inline
or by Binary, plain / HTML / charset, statuses, unreadable formats named, the size cap, report and
component text, and evidence that quotes the sentence with the note's type and date."""

import base64
from datetime import datetime, timezone

from fhir_mappings.fhir.bundle import split_by_patient
from fhir_mappings.clinical.evaluate import EvaluationSettings, assess
from fhir_mappings.fhir.notes import html_text

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
SNOMED = "http://snomed.info/sct"
PATIENT = {"resourceType": "Patient", "id": "p"}
CANCER = {"resourceType": "Condition", "id": "ca", "subject": {"reference": "Patient/p"},
          "verificationStatus": {"coding": [{"code": "confirmed"}]}, "onsetDateTime": "2024-01-01",
          "code": {"coding": [{"system": SNOMED, "code": "254837009"}]}}
ED_NOTE = "PC: 2/52 thoracic back pain.\nO/E: power 3/5 hip flexion BLE, PVR 900 ml.\nImp: ?MSCC."


def b64(text: str, encoding: str = "utf-8") -> str:
    return base64.b64encode(text.encode(encoding)).decode()


def note(nid="n1", text=ED_NOTE, content_type="text/plain; charset=utf-8", status="current", **extra):
    attachment = {"contentType": content_type, "data": b64(text)} if text is not None else {}
    return {"resourceType": "DocumentReference", "id": nid, "status": status, "subject": {"reference": "Patient/p"},
            "type": {"coding": [{"system": "http://loinc.org", "code": "34111-5",
                                 "display": "Emergency department note"}]},
            "date": "2026-05-30T10:00:00Z", "content": [{"attachment": attachment}]} | extra


def test_a_plain_note_raises_what_it_says_and_quotes_its_sentence_with_its_type_and_date():
    a = assess([PATIENT, CANCER, note()], NOW)
    assert a.urgency == "emergency"
    assert {"limb-weakness", "sphincter-dysfunction", "cord-compression", "thoracic-or-cervical-pain"} <= set(a.red_flags)
    weakness = next(e for e in a.evidence if e.concept == "limb-weakness")
    assert weakness.reference == "DocumentReference/n1" and weakness.display == "Emergency department note"
    assert weakness.quote == "O/E: power 3/5 hip flexion BLE, PVR 900 ml" and weakness.date.isoformat().startswith("2026-05-30")


def test_html_notes_are_read_without_their_markup_and_keep_their_blocks():
    html = ("<html><head><style>p{}</style></head><body><h2>Family history</h2><p>Mother &amp; sister: "
            "breast cancer</p><h2>Examination</h2><ul><li>Power: 3/5 BLE</li><li>Clonus: nil</li></ul></body></html>")
    assert html_text(html) == "Family history\n\nMother & sister: breast cancer\n\nExamination\n\n• Power: 3/5 BLE\n• Clonus: nil"
    a = assess([PATIENT, CANCER, note(text=html, content_type="text/html")], NOW)
    assert a.red_flags == ["limb-weakness"]


def test_a_note_in_a_binary_of_the_record_is_read_and_a_latin1_charset_honoured():
    latin1 = base64.b64encode("Numbness in both feet since the caf\xe9 visit. Back pain.".encode("latin-1")).decode()
    binary = {"resourceType": "Binary", "id": "b1", "contentType": "text/plain; charset=ISO-8859-1", "data": latin1}
    by_ref = note(text=None) | {"content": [{"attachment": {"contentType": "text/plain", "url": "Binary/b1"}}]}
    a = assess([PATIENT, CANCER, by_ref, binary], NOW)
    assert "sensory-deficit" in a.red_flags
    grouped = split_by_patient([PATIENT, CANCER, by_ref, binary])  # the Binary goes with its note
    assert binary in grouped["Patient/p"]


def test_a_note_that_cannot_be_read_is_named_never_skipped_silently():
    pdf = note(text="%PDF-1.4 ...", content_type="application/pdf")
    elsewhere = note("n2", text=None) | {"content": [{"attachment": {"url": "https://other.example.org/Binary/9"}}]}
    a = assess([PATIENT, CANCER, pdf, elsewhere], NOW)
    assert a.urgency == "none"
    assert any("DocumentReference/n1" in p and "application/pdf" in p for p in a.problems)
    assert any("DocumentReference/n2" in p and "URL that was not read" in p for p in a.problems)


def test_entered_in_error_and_replaced_notes_never_count_and_a_superseded_one_counts_until_replaced():
    assert assess([PATIENT, CANCER, note(status="entered-in-error")], NOW).urgency == "none"
    assert assess([PATIENT, CANCER, note(docStatus="entered-in-error")], NOW).urgency == "none"
    assert assess([PATIENT, CANCER, note(docStatus="preliminary")], NOW).urgency == "emergency"
    old = note(status="superseded")
    assert assess([PATIENT, CANCER, old], NOW).urgency == "emergency"
    new = note("n2", text="Back pain. Power 5/5, saddle sensation intact, no retention.",
               relatesTo=[{"code": "replaces", "target": {"reference": "DocumentReference/n1"}}])
    assert assess([PATIENT, CANCER, old, new], NOW).urgency == "routine"


def test_a_long_note_is_cut_at_the_cap_and_named():
    long_note = note(text=("Routine review, well. " * 200) + "New urinary retention.")
    a = assess([PATIENT, CANCER, long_note], NOW, EvaluationSettings(note_max_chars=1000))
    assert "sphincter-dysfunction" not in a.red_flags
    assert any("longer than 1000 characters" in p for p in a.problems)
    assert "sphincter-dysfunction" in assess([PATIENT, CANCER, long_note], NOW).red_flags


def test_report_conclusions_and_observation_components_are_read():
    report = {"resourceType": "DiagnosticReport", "id": "r1", "status": "final", "subject": {"reference": "Patient/p"},
              "code": {"text": "CT chest"}, "effectiveDateTime": "2026-05-29", "conclusion": "Lytic lesion T11 with cord compression."}
    a = assess([PATIENT, CANCER, report], NOW)
    assert {"cord-compression", "known-bone-metastasis"} <= set(a.red_flags)
    exam = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p"},
            "code": {"text": "Neurological examination"}, "effectiveDateTime": "2026-05-29",
            "component": [{"code": {"text": "Saddle sensation"}, "valueString": "reduced"},
                          {"code": {"text": "Clonus"}, "valueString": "nil"}]}
    a = assess([PATIENT, CANCER, exam], NOW)
    assert a.red_flags == ["saddle-anaesthesia"]
