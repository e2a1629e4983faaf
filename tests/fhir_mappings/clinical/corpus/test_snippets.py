"""The labelled snippets (tests/fhir_mappings/clinical/corpus/snippets.yaml, labelled before the matcher ran) measured with
the same rule as bench/language.py, and held to the aims of the clinical-language issue: every Box 2
positive raised, no Box 2 raised from a negated, hypothetical or other-person label, and no flag's
sensitivity or specificity below a floor. bench/language.py prints the full table."""

from __future__ import annotations

import pytest

from fhir_mappings.clinical.terminology import load_terminology
from tests.fhir_mappings.clinical.corpus.labels import BOX2, CONCEPTS, KINDS, NEVER_RAISE, STATUSES, expected_raise, load

SNIPPETS = load("snippets.yaml")
SENSITIVITY_FLOOR = 0.8
SPECIFICITY_FLOOR = 0.97


def _raised(snippet: dict) -> set[str]:
    matcher = load_terminology().matcher
    return set(matcher.findings(snippet["text"], bool(snippet.get("on_spinal_pain_resource"))))


def test_the_corpus_is_well_formed_and_large_enough():
    ids = [s["id"] for s in SNIPPETS]
    assert len(ids) == len(set(ids)) and len(ids) >= 400
    for s in SNIPPETS:
        assert set(s["labels"]) <= set(CONCEPTS) and set(s["labels"].values()) <= set(STATUSES), s["id"]
        assert set(s["kinds"]) <= set(KINDS), s["id"]
    assert {k for s in SNIPPETS for k in s["kinds"]} == set(KINDS)
    for concept in CONCEPTS:  # every concept has snippets that must raise it and that must not
        statuses = [s["labels"].get(concept) for s in SNIPPETS if concept in s["labels"]]
        assert any(expected_raise(concept, st) for st in statuses), concept
        assert any(not expected_raise(concept, st) for st in statuses), concept


def test_every_box2_positive_is_raised_and_no_box2_comes_from_a_negative_context():
    missed, false = [], []
    for s in SNIPPETS:
        raised = _raised(s)
        for flag in BOX2:
            status = s["labels"].get(flag)
            if expected_raise(flag, status) and flag not in raised:
                missed.append(f"{s['id']}:{flag}")
            if status in NEVER_RAISE and flag in raised:
                false.append(f"{s['id']}:{flag}")
    assert (missed, false) == ([], []), f"missed emergencies {missed}; emergencies from negative contexts {false}"


@pytest.mark.parametrize("concept", CONCEPTS)
def test_sensitivity_and_specificity_floor(concept):
    tp = fn = fp = tn = 0
    for s in SNIPPETS:
        want, got = expected_raise(concept, s["labels"].get(concept)), concept in _raised(s)
        tp, fn, fp, tn = tp + (want and got), fn + (want and not got), fp + (got and not want), tn + (not want and not got)
    assert tp / (tp + fn) >= SENSITIVITY_FLOOR and tn / (tn + fp) >= SPECIFICITY_FLOOR, (
        f"{concept}: TP {tp} FN {fn} FP {fp} TN {tn}")
