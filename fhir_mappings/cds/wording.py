"""What a card says, as reviewed text and codes: summaries and indicators by tier, the tier's own
lines (NICE NG234 1.4 and 1.8.1, QS56 statement 3), the MRI codes (LOINC/RSNA Radiology Playbook),
override reasons, and what a site configures (`CardSettings`). fhir_mappings/cds/cards.py assembles
cards from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from fhir_mappings.clinical.terminology import LOINC, SNOMED


NG234_URL = "https://www.nice.org.uk/guidance/ng234"
ACR_LBP_URL = "https://acsearch.acr.org/docs/69483/Narrative/"
OVERRIDE_SYSTEM = "https://spinewatch.example.org/fhir/CodeSystem/override-reason"
# No url: the card names NICE NG234 once, as a link in the detail (the sandbox shows a source url
# as one more link).
SOURCE = {"label": "SpineWatch (NICE NG234 red flags)"}

DETAIL_BUDGET = 600  # characters of detail before the evidence lines ("what to do" must fit)
MAX_EVIDENCE_LINES = 3
QUOTE_MAX = 120

INDICATOR = {"emergency": "critical", "urgent": "warning", "routine": "info"}
PRIORITY = {"emergency": "stat", "urgent": "urgent", "routine": "routine"}
# QS56 statement 3: MRI within 24 h for suspected MSCC; CG75 audits: within 1 week for Box 1.
DEADLINE = {"emergency": timedelta(hours=24), "urgent": timedelta(days=7)}
WITHIN = {"emergency": " within 24 h", "urgent": " within 1 week"}
SUMMARY = {
    "emergency": "Suspected spinal cord compression: whole-spine MRI within 24 h",
    "urgent": "Suspected spinal metastasis: whole-spine MRI within 1 week",
    "routine": "Back pain in a patient with cancer: MRI, not X-ray, is the test of choice",
}
XRAY_SUMMARY = {
    "emergency": "Suspected cord compression, X-ray cannot exclude metastasis: whole-spine MRI within 24 h instead",
    "urgent": "Spine X-ray cannot exclude metastasis: whole-spine MRI within 1 week instead",
    "routine": "Spine X-ray cannot exclude metastasis: MRI of the spine instead",
}

# What to do meanwhile, as NG234 says. Dexamethasone: NG234 1.8.1, for people with neurological
# symptoms or signs of MSCC, "16 mg of oral dexamethasone (or an equivalent parenteral dose) as soon
# as possible" (wording checked through a summary that cites 1.8.1; the NICE page itself was not
# readable here). Neutral spine alignment (lying flat) where severe pain or neurology suggests
# spinal instability, until it is assessed: NG234's immediate-management section, wording to be
# confirmed at clinical sign-off.
MEANWHILE = ("**Meanwhile (NG234):** if severe pain or neurology suggests an unstable spine, keep the spine "
             "in neutral alignment (lie flat) until assessed; with neurological symptoms or signs, offer "
             "dexamethasone 16 mg orally as soon as possible; discuss with the MSCC coordinator.")
URGENT_NEUROLOGY = ("**Ask about and document neurology:** limb weakness, numbness, walking, bladder or bowel, "
                    "saddle sensation; the record does not mention them. Any of these makes it an emergency: "
                    "MRI within 24 h and call the MSCC coordinator.")
SAFETY_NET = ("**Safety-net (NG234):** tell the patient to seek help at once if they develop leg weakness, "
              "numbness, difficulty walking, or bladder or bowel problems.")
ROUTINE_SAFETY_NET = ("**Safety-net (NG234):** ask about night pain, upper back pain and pain on coughing or "
                      "straining (urgent MRI within 1 week); tell the patient to seek help at once for leg "
                      "weakness, numbness, or bladder or bowel problems.")
WHY_NOT_XRAY = ("**Why not X-ray:** a plain X-ray shows a vertebral metastasis only once 30-50 % of the "
                "vertebral body is destroyed; it must not be used to diagnose or exclude spinal metastases.")

# MRI codes, LOINC/RSNA Radiology Playbook (https://loinc.org/kb/users-guide/radiology-playbook/;
# LOINC long common names): 36531-2 "MR Spine WO contrast" for suspected MSCC (NICE NG234 1.4 whole-spine MRI;
# no contrast needed: sagittal T1 and T2/STIR of the whole spine), 36400-0 "MR Spine WO and W
# contrast IV" for the urgent and routine work-up of suspected metastasis (ACR Low Back Pain,
# variant 7). Sites order by their own codes: each is a setting (SPINEWATCH_MRI_CODE_<TIER>).
MRI_CODES = {
    "emergency": (LOINC, "36531-2", "MR Spine WO contrast"),
    "urgent": (LOINC, "36400-0", "MR Spine WO and W contrast IV"),
    "routine": (LOINC, "36400-0", "MR Spine WO and W contrast IV"),
}
MRI_SNOMED = {"system": SNOMED, "code": "241645008", "display": "MRI of spine"}
MRI_TEXT = {"emergency": "MRI whole spine without contrast",
            "urgent": "MRI whole spine without and with IV contrast",
            "routine": "MRI whole spine without and with IV contrast"}

PATIENT_DECLINED = "patient-declined"  # also what closes the patient's MRI clock episode (mri_clock.py)
OVERRIDE_REASONS = [
    {"code": "already-imaged", "system": OVERRIDE_SYSTEM, "display": "Already imaged elsewhere"},
    {"code": PATIENT_DECLINED, "system": OVERRIDE_SYSTEM, "display": "Patient declined"},
    {"code": "not-clinically-relevant", "system": OVERRIDE_SYSTEM, "display": "Not clinically relevant"},
    {"code": "mri-contraindicated", "system": OVERRIDE_SYSTEM, "display": "MRI contraindicated"},
]
# NICE is linked in the detail; the buttons add what the detail does not.
LINKS = [
    {"label": "ACR Appropriateness Criteria: Low Back Pain", "url": ACR_LBP_URL, "type": "absolute"},
]


NewId = Callable[[], str]


@dataclass(frozen=True)
class CardSettings:
    """What a site configures about its cards (service/core/settings.py card_settings)."""
    coordinator_name: str | None = None
    coordinator_phone: str | None = None
    coordinator_url: str | None = None
    mri_codes: dict[str, tuple[str, str, str]] = field(default_factory=lambda: dict(MRI_CODES))


DEFAULT_SETTINGS = CardSettings()
