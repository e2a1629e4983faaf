"""The labelled corpus's vocabulary and what each label must raise (tests/fhir_mappings/clinical/corpus/README.md).

One definition, read by the corpus tests and by bench/language.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).parent
BOX2 = ("radicular-pain", "limb-weakness", "gait-disturbance", "sensory-deficit", "sphincter-dysfunction",
        "saddle-anaesthesia", "upper-motor-neuron-signs", "cord-compression")
BOX1 = ("thoracic-or-cervical-pain", "nocturnal-pain", "mechanical-pain", "pain-on-straining",
        "progressive-pain", "severe-unremitting-pain", "localised-tenderness", "known-bone-metastasis")
CONCEPTS = BOX2 + BOX1 + ("back-pain", "known-cancer")
STATUSES = ("present", "absent", "hypothetical", "other", "historical", "uncertain")
NEVER_RAISE = ("absent", "hypothetical", "other")
HISTORY_COUNTS = ("known-cancer", "known-bone-metastasis")
KINDS = ("plain", "abbreviation", "us-uk", "graded-power", "misspelling", "negation", "pseudo-negation", "no-new",
         "negation-list-break", "template", "section-header", "hypothetical", "safety-netting", "other-person",
         "historical", "uncertain", "anchoring", "scope")


def expected_raise(concept: str, status: str | None) -> bool:
    """Whether a snippet labelled `status` for `concept` must raise it (README; None: not listed)."""
    if status == "present":
        return True
    if status == "uncertain":
        return concept != "known-cancer"
    if status == "historical":
        return concept in HISTORY_COUNTS
    return False


def load(name: str) -> list[dict]:
    return yaml.safe_load((HERE / name).read_text(encoding="utf-8"))
