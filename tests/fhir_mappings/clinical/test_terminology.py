"""Value sets and rules load from their data files and match by system|code (SNOMED CT and ICD-10-CM)."""

from pathlib import Path

import yaml

from fhir_mappings.clinical.terminology import ICD10, ICD10CM, LOINC, SNOMED, load_terminology
from tests.support.paths import ROOT

RULES_DIR = ROOT / "fhir_mappings" / "clinical" / "rules"
FLAG_IDS = {
    "radicular-pain", "limb-weakness", "gait-disturbance", "sensory-deficit", "sphincter-dysfunction",
    "saddle-anaesthesia", "upper-motor-neuron-signs", "cord-compression",  # Box 2
    "thoracic-or-cervical-pain", "nocturnal-pain", "mechanical-pain", "pain-on-straining", "progressive-pain",
    "severe-unremitting-pain", "localised-tenderness", "known-bone-metastasis",  # Box 1
}


def test_every_clinical_flag_has_a_reviewed_rule_file():
    term = load_terminology()
    assert {r.id for r in term.rules} == FLAG_IDS
    for rule in term.rules:
        assert (rule.box, rule.tier) in {(2, "emergency"), (1, "urgent")}
        assert rule.sources and rule.version and rule.status == "stable"
        assert rule.codes.keys or rule.codes.icd_prefixes or term.matcher.concepts[rule.id].pattern or rule.score


def test_rule_files_carry_their_review_metadata():
    for path in RULES_DIR.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        assert data["id"] == path.stem
        assert "known_false_positives" in data
        assert all("id" in s and "section" in s for s in data["sources"])


def test_cancer_matching_by_code_prefix_and_exclusions():
    cancer = load_terminology().cancer
    assert cancer.match_coding(SNOMED, "254837009") is True  # breast
    assert cancer.match_coding(ICD10CM, "C50.911") is True
    assert cancer.match_coding(ICD10, "C61") is True  # ICD-10 accepted as ICD-10-CM
    assert cancer.match_coding(ICD10CM, "Z85.3") is True  # personal history counts
    assert cancer.match_coding(ICD10CM, "C44.91") is False  # non-melanoma skin
    assert cancer.match_coding(ICD10CM, "D05.10") is None  # in situ: not included
    assert cancer.match_coding(SNOMED, "126906006") is False  # neoplasm of prostate, unspecified
    assert cancer.match_coding(SNOMED, "92691004") is False  # carcinoma in situ of prostate
    assert cancer.match_coding(LOINC, "254837009") is None  # the system matters


def test_cancer_text_fallback_is_conservative():
    cancer = load_terminology().cancer
    assert cancer.match_text("Primary small cell malignant neoplasm of lung, TNM stage 1 (disorder)")
    assert cancer.match_text("History of breast cancer")
    for text in ["Neoplasm of prostate", "Carcinoma in situ of prostate", "Suspected lung cancer",
                 "Family history of colon cancer", "Basal cell carcinoma of skin", "Benign neoplasm of colon",
                 "No history of cancer"]:
        assert not cancer.match_text(text), text


def test_mri_and_xray_value_sets():
    term = load_terminology()
    assert term.mri_spine.match_coding(LOINC, "36400-0")
    assert term.mri_spine.match_text("MRI whole spine with contrast")
    assert not term.mri_spine.match_text("MRI brain")
    assert term.xray_spine.match_coding("http://www.ama-assn.org/go/cpt", "72100")
    assert term.xray_spine.match_text("XR lumbar spine 2 views")
    assert not term.xray_spine.match_text("Chest X-ray")
