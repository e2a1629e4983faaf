"""The clinical-language matcher (fhir_mappings/clinical/text.py): vocabulary, context, anchoring, spelling.

The corpus in tests/fhir_mappings/clinical/corpus measures it; these pin the behaviours each part of text.py exists for.
"""

import re

import pytest

from fhir_mappings.clinical.terminology import load_terminology
from fhir_mappings.clinical.terminology import context_of
from fhir_mappings.clinical.phrases import PhraseError, compile_phrase, compile_phrases


def raised(text: str, on_spinal_pain_resource: bool = False) -> set[str]:
    return set(load_terminology().matcher.findings(text, on_spinal_pain_resource))


# --------------------------------------------------------------------------- phrase compiler

def test_phrase_syntax_optional_alternatives_classes_stems_and_gaps():
    lexicon = {"leg": "legs?|lower limbs?"}
    pattern = compile_phrases(["[both] {leg} (weakness|weak)", "parapares*", "pain ... legs"], lexicon)
    for text in ("leg weakness", "both legs weak", "Lower limb weakness", "leg-weakness", "paraparesis", "pain radiating down both legs"):
        assert pattern.search(text), text
    for text in ("legweakness", "weakness", "pain in the arm"):
        assert not pattern.search(text), text


def test_a_phrase_with_an_unknown_class_or_no_required_word_is_an_error():
    with pytest.raises(PhraseError, match="unknown lexicon class"):
        compile_phrase("{nope} weakness", {})
    with pytest.raises(PhraseError, match="no required word"):
        compile_phrase("[only optional]", {})


# --------------------------------------------------------------------------- context

@pytest.mark.parametrize("text, target, status", [
    ("Denies night pain", "night pain", "absent"),
    ("No bladder or bowel dysfunction", "bowel dysfunction", "absent"),
    ("Denies fever, chills, night sweats, weight loss, bowel or bladder dysfunction or saddle anaesthesia.",
     "saddle anaesthesia", "absent"),
    ("Leg weakness absent", "Leg weakness", "absent"),
    ("Babinski negative", "Babinski", "absent"),
    ("Clonus: nil", "Clonus", "absent"),
    ("[ ] urinary retention", "urinary retention", "absent"),
    ("No new leg weakness", "leg weakness", "absent"),
    ("No improvement in leg weakness", "leg weakness", "present"),
    ("Denies fever, chills, positive for urinary retention", "urinary retention", "present"),
    ("ROS negative except LBP and leg weakness", "leg weakness", "present"),
    ("Denies night pain but reports leg weakness", "leg weakness", "present"),
    ("Leg weakness, negative straight-leg raise", "Leg weakness", "present"),
    ("Leg weakness: yes", "Leg weakness", "present"),
    ("Advised to attend ED if she develops leg weakness or numbness", "numbness", "hypothetical"),
    ("Safety netting: return if any bladder or bowel problems", "bowel problems", "hypothetical"),
    ("Mother had breast cancer", "breast cancer", "other"),
    ("Family history: cord compression (father)", "cord compression", "other"),
    ("Husband reports she has been unable to walk", "unable to walk", "present"),
    ("Sciatica 2009, resolved", "Sciatica", "historical"),
    ("History of back pain for 3 weeks", "back pain", "present"),
    ("?cauda equina syndrome", "cauda equina syndrome", "uncertain"),
    ("Cord compression cannot be excluded", "Cord compression", "uncertain"),
    ("Cord compression not ruled out", "Cord compression", "uncertain"),
])
def test_context_of_a_target(text, target, status):
    start = text.lower().index(target.lower())
    assert context_of(text, start, start + len(target)).status == status


def test_a_negation_window_is_bounded_unless_it_is_a_list():
    text = "No fever today and the patient now describes that at times there is night pain"
    start = text.index("night pain")
    assert not context_of(text, start, start + 10).negated


# --------------------------------------------------------------------------- vocabulary and anchoring

@pytest.mark.parametrize("text, flag", [
    ("Pt c/o BLE weakness x2/7", "limb-weakness"),
    ("Power 4-/5 hip flexion bilaterally", "limb-weakness"),
    ("now unable to weight bear", "gait-disturbance"),
    ("Sensory level at T10", "sensory-deficit"),
    ("parasthesia both feet", "sensory-deficit"),  # misspelt: one edit from the vocabulary
    ("Catheterised for retention, PVR 900 ml", "sphincter-dysfunction"),
    ("Reduced anal tone on PR", "sphincter-dysfunction"),
    ("?CES", "cord-compression"),
    ("Upgoing plantars bilaterally", "upper-motor-neuron-signs"),
    ("LBP - night pain, wakes 3am", "nocturnal-pain"),
    ("T-spine pain worse on coughing", "pain-on-straining"),
])
def test_clinical_wording_raises_its_flag(text, flag):
    assert flag in raised(text)


@pytest.mark.parametrize("text, flag", [
    ("Progressive disease on CT", "progressive-pain"),
    ("Worsening breathlessness", "progressive-pain"),
    ("Cough productive of green sputum", "pain-on-straining"),
    ("Hip pain at night", "nocturnal-pain"),
    ("Low back pain. Also hip pain at night.", "nocturnal-pain"),
    ("Knee pain worse on walking", "mechanical-pain"),
    ("Tinkling bowel sounds", "sensory-deficit"),  # a real word one edit from "tingling"
    ("CA 125 raised", "known-cancer"),
])
def test_qualifiers_and_look_alikes_elsewhere_do_not_raise(text, flag):
    assert flag not in raised(text)


def test_an_elliptical_qualifier_describes_the_pain_the_text_or_resource_is_about():
    assert "nocturnal-pain" in raised("Low back pain for 3 weeks. Wakes her at night.")
    assert "nocturnal-pain" not in raised("Wakes her at night.")
    assert "nocturnal-pain" in raised("Wakes her at night.", on_spinal_pain_resource=True)
    assert "progressive-pain" not in raised("LBP 3/52. SOB getting worse.")


def test_mentions_keep_offsets_into_the_text_as_written():
    text = "Mild parasthesia in both feet"
    mention = load_terminology().matcher.findings(text)["sensory-deficit"]
    assert re.fullmatch(r"parasthesia", text[mention.start:mention.end])


def test_remembered_mentions_are_the_mentions_read_once_per_text():
    # A coded entry's own text is checked for a veto ("family history of breast cancer") on every
    # evaluation: remembered, as `findings` is, and the same mentions as a fresh read.
    matcher = load_terminology().matcher
    text = "Family history of breast cancer; no back pain"
    first = matcher.remembered_mentions(text)
    assert first == tuple(matcher.mentions(text))
    assert {m.concept for m in first} >= {"known-cancer", "back-pain"}
    assert matcher.remembered_mentions(text) is first
    matcher.clear_caches()
    assert matcher.remembered_mentions(text) is not first
