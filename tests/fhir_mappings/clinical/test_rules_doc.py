"""The rule files are reviewed data with a schema: typos fail at load, each rule names its fixtures,
and docs/rules.md (the document a clinician signs) is what the files say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fhir_mappings.clinical.schema import RuleFile, RuleFileError, ValueSetFile, load
from fhir_mappings.clinical.terminology import load_terminology
from tests.support.paths import ROOT

RULE = (ROOT / "fhir_mappings" / "clinical" / "rules" / "limb-weakness.yaml").read_text()


def _render() -> str:
    spec = importlib.util.spec_from_file_location("rules_doc", ROOT / "scripts" / "rules_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render()


def test_docs_rules_md_is_generated_from_the_rule_files():
    assert (ROOT / "docs" / "rules.md").read_text() == _render(), "run: .venv/bin/python scripts/rules_doc.py --write"


@pytest.mark.parametrize("broken, message", [
    (RULE.replace("\nphrases:", "\nphrase:", 1), "phrase"),  # a typo would silently disable the text path
    (RULE.replace("tier: emergency", "tier: emergncy", 1), "tier"),
    (RULE + "box: 2\n", "twice"),
    (RULE.replace("review:", "reviewed:", 1), "review"),
])
def test_a_rule_file_with_a_typo_fails_at_load_naming_the_field(tmp_path, broken, message):
    path = tmp_path / "limb-weakness.yaml"
    path.write_text(broken)
    with pytest.raises(RuleFileError, match=message):
        load(path, RuleFile)


def test_every_rule_names_fixtures_that_raise_and_stay_quiet():
    for rule in load_terminology().rules:
        data = load(ROOT / "fhir_mappings" / "clinical" / "rules" / f"{rule.id}.yaml", RuleFile)
        assert data.fixtures, rule.id
        for directory in data.fixtures:
            assert list((ROOT / directory).glob("raises__*.json")) and list((ROOT / directory).glob("quiet__*.json")), directory


def test_every_code_has_a_display_name():
    for path in sorted((ROOT / "fhir_mappings" / "clinical").glob("*/*.yaml")):
        if path.parent.name == "language":
            continue
        model = RuleFile if path.parent.name == "rules" else ValueSetFile
        data = load(path, model)
        blocks = [data.codes] if model is RuleFile else [data.include, data.exclude]
        for codes in blocks:
            for name in ("snomed", "loinc", "cpt", "icd10cm_prefixes"):
                values = getattr(codes, name)
                assert isinstance(values, dict) and all(values.values()), f"{path.name}: {name} needs code: display"
