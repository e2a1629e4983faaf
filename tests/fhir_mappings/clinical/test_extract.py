"""Reading a record fast without reading it differently: the reading models (the R4B models cut down
to the elements the rules read) read every record of the repository and of the shared data exactly
as the full fhir.resources R4B models do; what they no longer refuse is only what nothing reads (a
study's DICOM instances, a server's own meta elements); the caller's resources are never changed;
and after warm_models() an evaluation imports nothing."""

from __future__ import annotations

import copy
import glob
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from fhir_mappings.clinical import extract
from fhir_mappings.clinical.evaluate import EvaluationSettings, assess
from fhir_mappings.clinical.extract import read_record
from fhir_mappings.clinical.facts import MODELS
from fhir_mappings.clinical.terminology import load_terminology
from fhir_mappings.fhir.bundle import InputError, read_path, split_by_patient
from tests.support.paths import ROOT

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
# The default lookback, and one long enough for the old Synthea and HL7 example records to reach
# scope, so that suppression by an imaging study and the X-ray findings are exercised too.
SETTINGS = (EvaluationSettings(), EvaluationSettings(lookback_days=365 * 40))
SNOMED = "http://snomed.info/sct"
PATIENT = {"resourceType": "Patient", "id": "p"}
CANCER = {"resourceType": "Condition", "id": "ca", "subject": {"reference": "Patient/p"},
          "code": {"coding": [{"system": SNOMED, "code": "254837009"}]}, "onsetDateTime": "2024-02-10"}
BACK_PAIN = {"resourceType": "Condition", "id": "lbp", "subject": {"reference": "Patient/p"},
             "code": {"coding": [{"system": SNOMED, "code": "279039007"}]}, "onsetDateTime": "2026-05-20"}


def spine_mri(instances: list[dict]) -> dict:
    """A completed MRI whose only spinal site is in its series (modality and body site)."""
    return {"resourceType": "ImagingStudy", "id": "mri", "status": "available",
            "subject": {"reference": "Patient/p"}, "started": "2026-05-28T09:00:00Z",
            "series": [{"uid": "1.2.3", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                                     "code": "MR"},
                        "bodySite": {"system": SNOMED, "code": "122496007", "display": "Lumbar spine"},
                        "instance": instances}]}


def instance(n: int) -> dict:
    return {"uid": f"1.2.3.{n}", "sopClass": {"system": "urn:ietf:rfc:3986", "code": "1.2.840.10008.5.1.4.1.1.4"},
            "number": n}


def outcome(resources: list[dict], settings: EvaluationSettings) -> dict:
    a = assess(resources, NOW, settings)
    return a.to_json() | {"seen": a.seen}


class _FullModel:
    """A full R4B model in a reading model's place: validates every element the resource has."""

    def __init__(self, model):
        self.model = model

    def model_validate(self, raw: dict):
        return self.model.model_validate(raw)


@contextmanager
def full_r4b_models(monkeypatch):
    """As before the reading models: each resource validated whole by its fhir.resources R4B model."""
    with monkeypatch.context() as m:
        m.setattr(extract, "READING_MODELS", {rtype: _FullModel(model) for rtype, model in MODELS.items()})
        yield


def read_by_full_models(monkeypatch, resources: list[dict], settings: EvaluationSettings) -> dict:
    with full_r4b_models(monkeypatch):
        return outcome(resources, settings)


def assert_read_as_the_full_models_read(monkeypatch, records: dict[str, list[dict]],
                                       settings: tuple[EvaluationSettings, ...] = SETTINGS) -> int:
    compared = 0
    for name, resources in records.items():
        for group in split_by_patient(resources).values():
            for each in settings:
                assert outcome(group, each) == read_by_full_models(monkeypatch, group, each), name
                compared += 1
    return compared


def test_a_spine_mri_read_from_its_series_still_suppresses_with_its_instances_unread(monkeypatch):
    record = [PATIENT, CANCER, BACK_PAIN, spine_mri([instance(n) for n in range(1, 4)])]
    result = outcome(record, SETTINGS[0])
    assert result["suppressed_by"] == ["ImagingStudy/mri"] and result["urgency"] == "none"
    assert result == read_by_full_models(monkeypatch, record, SETTINGS[0])


def test_the_callers_resources_are_never_changed():
    record = [PATIENT, CANCER, BACK_PAIN, spine_mri([instance(1), instance(2)])]
    before = copy.deepcopy(record)
    assess(record, NOW)
    assert record == before


def test_malformed_instances_no_longer_hide_the_study_they_are_in(monkeypatch):
    # An instance without its required uid (FHIR R4 ImagingStudy.series.instance.uid, 1..1) made
    # the whole study unreadable; nothing reads the instances, so the study now counts.
    record = [PATIENT, CANCER, BACK_PAIN, spine_mri([{"number": 1}])]
    assert outcome(record, SETTINGS[0])["suppressed_by"] == ["ImagingStudy/mri"]
    before = read_by_full_models(monkeypatch, record, SETTINGS[0])
    assert before["suppressed_by"] == [] and before["problems"][0].startswith("ImagingStudy/mri skipped")


def test_the_repository_records_assess_as_the_full_models_assess_them(monkeypatch):
    clinical = ROOT / "tests" / "fhir_mappings" / "clinical"
    paths = sorted(clinical.glob("rules/fixtures/**/*.json")) + sorted(clinical.glob("corpus/patients/*.json"))
    assert len(paths) > 400
    records = {str(p): read_path(p) for p in paths}
    assert assert_read_as_the_full_models_read(monkeypatch, records) >= 2 * len(paths)


def test_the_shared_synthea_and_hl7_records_read_as_the_full_models_read_them(monkeypatch, shared_data):
    # The same Record (every item's dates, statuses, codings, texts, body sites and modalities; the
    # problems; the versions seen) is the same assessment at any time and with any settings.
    synthea = sorted(glob.glob(str(shared_data / "synthea" / "**" / "*.json*"), recursive=True))
    examples = sorted(glob.glob(str(shared_data / "hl7-r4-examples" / "*.json")))
    assert len(synthea) > 150 and len(examples) > 100
    compared = 0
    for path in synthea + examples:  # one at a time: the corpus is 300 MB of JSON
        try:
            resources = read_path(path)
        except InputError:  # an example that is not a record (a Parameters, a bare Bundle entry ...)
            continue
        with full_r4b_models(monkeypatch):
            before = read_record(resources, load_terminology())
        assert read_record(resources, load_terminology()) == before, path
        compared += 1
    assert compared > 300


def test_the_synthea_patient_with_45_studies_assesses_as_the_full_models_assess_it(monkeypatch, shared_data):
    path = shared_data / "synthea" / "samply__blaze__test-data_synthea" / "e5a8d3f4-4484-ebfd-7404-d9f02c9fe6a6.json.bz2"
    resources = read_path(path)
    assert sum(r["resourceType"] == "ImagingStudy" for r in resources) == 45
    assert assert_read_as_the_full_models_read(monkeypatch, {str(path): resources}) >= len(SETTINGS)


def test_a_resource_invalid_in_an_element_the_rules_read_is_still_refused_and_named():
    bad_date = {**BACK_PAIN, "onsetDateTime": "2026-13-45"}
    bad_code = {**CANCER, "verificationStatus": {"coding": [{"code": " confirmed "}]}}
    no_status = {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p"},
                 "code": {"text": "Back pain"}}
    two_onsets = {**BACK_PAIN, "onsetPeriod": {"start": "2026-05-20"}}
    for resource, where in ((bad_date, "Condition.onsetDateTime"), (bad_code, "Condition.verificationStatus.coding.0.code"),
                            (no_status, "Observation: "), (two_onsets, "Condition: ")):
        record = read_record([PATIENT, resource], load_terminology())
        assert record.items == [], where
        assert len(record.problems) == 1 and record.problems[0].startswith(
            f"{resource['resourceType']}/{resource['id']} skipped: {where}"), record.problems
        assert " confirmed " not in record.problems[0]  # the input value is never quoted


def test_a_resource_invalid_only_in_elements_nothing_reads_is_read():
    # Condition.category's code and an Observation's interpretation are not read by any rule: the
    # full R4B models refused the whole resource, and with it the patient's cancer or red flag.
    cancer = {**CANCER, "category": [{"coding": [{"system": SNOMED, "code": " not a code "}]}]}
    with_r5_element = {**BACK_PAIN, "participant": [{"actor": {"reference": "Practitioner/x"}}]}
    record = read_record([PATIENT, cancer, with_r5_element], load_terminology())
    assert record.problems == []
    assert [i.resource_id for i in record.items] == ["ca", "lbp"]
    for resource in (cancer, with_r5_element):
        with pytest.raises(ValidationError):
            MODELS[resource["resourceType"]].model_validate(resource)


def test_after_warm_models_an_evaluation_imports_no_model_module(shared_data):
    # A fresh interpreter: this one has imported every model already.
    records = [str(p) for p in sorted((ROOT / "tests" / "fhir_mappings" / "clinical").glob("**/*.json"))]
    records += sorted(glob.glob(str(shared_data / "synthea" / "samply__blaze__test-data_synthea" / "*.json*")))[:3]
    records += sorted(glob.glob(str(shared_data / "hl7-r4-examples" / "*.json")))
    script = textwrap.dedent("""
        import sys
        from datetime import datetime, timezone
        from fhir_mappings.clinical.evaluate import assess
        from fhir_mappings.clinical.extract import warm_models
        from fhir_mappings.fhir.bundle import InputError, read_path

        if sys.argv[1] == "warm":
            warm_models()
        before = set(sys.modules)
        for path in sys.argv[2:]:
            try:
                resources = read_path(path)
            except InputError:
                continue
            assess(resources, datetime(2026, 6, 1, tzinfo=timezone.utc))
        print(" ".join(sorted(m for m in set(sys.modules) - before if m.startswith("fhir.resources"))))
    """)

    def imported(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", script, mode, *records], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        return done.stdout.strip()

    # Building the reading models (on import) imports every R4B class they are cut from.
    assert imported("cold") == imported("warm") == ""



def test_a_server_s_own_meta_elements_do_not_make_its_resources_unreadable():
    """Medplum adds meta.author, meta.project, meta.account and meta.compartment to every resource
    (https://www.medplum.com/docs/api/fhir/datatypes/meta); R4's Meta has none of them. Read as they
    come, every resource was refused and the patient assessed `none`."""
    medplum_meta = {"versionId": "5c9d1b3e-8f3a-4c55-9d7e-0a4b1c2d3e4f", "lastUpdated": "2026-05-20T10:00:00.000Z",
                    "author": {"reference": "ClientApplication/c1"}, "project": "proj-1",
                    "account": {"reference": "Organization/o1"},
                    "compartment": [{"reference": "Project/proj-1"}, {"reference": "Patient/p"}]}
    resources = [{**r, "meta": copy.deepcopy(medplum_meta)} for r in (PATIENT, CANCER, BACK_PAIN)]
    untouched = copy.deepcopy(resources)
    record = read_record(resources, load_terminology())
    assert record.problems == []
    assert {f"{i.resource_type}/{i.resource_id}" for i in record.items} >= {"Condition/ca", "Condition/lbp"}
    assert assess(resources, NOW).urgency == "routine"
    assert resources == untouched  # the caller's resources are not changed
    assert [i.version_id for i in record.items if i.resource_id == "ca"] == [medplum_meta["versionId"]]
