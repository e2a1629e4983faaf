"""The README and docs/ name only files that exist: a moved module must take its documentation along."""

import re

import pytest

from tests.support.paths import ROOT

PATH = re.compile(r"\b(?:service|workers|fhir_mappings|tests|scripts|bench|docs)/[A-Za-z0-9_/.-]+\.(?:py|html|yaml|json|md)\b")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_document_names_exists(doc):
    named = set(PATH.findall(doc.read_text()))
    assert {p for p in named if not (ROOT / p).exists()} == set()


def test_the_check_sees_paths():
    assert "service/api/app.py" in PATH.findall("see `service/api/app.py` for create_app")
    assert PATH.findall("moved to service/gone.py") == ["service/gone.py"]
