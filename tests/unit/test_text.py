"""Negation-aware phrase matching (CLINICAL.md "Free text")."""

import pytest

from fhir_mappings.text import compile_phrases, find_affirmed

PHRASES = compile_phrases(["night pain", "leg weakness", "(?:bladder|bowel)(?: or (?:bladder|bowel))? dysfunction",
                           "saddle an(?:a)?esthesi\\w*", "cough\\w*"])


@pytest.mark.parametrize("text", [
    "Night pain for 3 weeks",
    "NIGHT PAIN, worse lying flat",
    "Denies trauma. Night pain present.",
    "Denies night pain but reports leg weakness",
    "Pain worse on coughing",
    "Reports saddle anaesthesia since this morning",
    "saddle anesthesia",
    "Leg weakness, negative straight-leg raise",
])
def test_affirmed_phrases_match(text):
    assert find_affirmed(text, PHRASES) is not None


@pytest.mark.parametrize("text", [
    "Denies night pain",
    "No bladder or bowel dysfunction",
    "without leg weakness",
    "Patient denies saddle anaesthesia.",
    "negative for night pain",
    "No cough",
    "nightpain",  # not a word-bounded phrase
    "Denies fever, chills, night sweats, weight loss, bowel or bladder dysfunction or saddle anaesthesia.",
    "Leg weakness absent",
])
def test_negated_or_absent_phrases_do_not_match(text):
    assert find_affirmed(text, PHRASES) is None


def test_quote_is_the_clause_that_raised_it():
    match = find_affirmed("Denies night pain. New leg weakness since yesterday; walks with a frame.", PHRASES)
    assert match.quote == "New leg weakness since yesterday"
    assert match.phrase == "leg weakness"


def test_negation_window_is_bounded():
    # A cue far before the phrase in a long clause does not negate it.
    text = "No fever, chills, weight loss, rash, recent travel or sick contacts and now night pain"
    assert find_affirmed(text, PHRASES) is not None
