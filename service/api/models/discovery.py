"""The CDS services this server offers (CDS Hooks 2.0 §Discovery, index.html#discovery)."""

from __future__ import annotations

from service.infra.fhir.fetch import PREFETCH_TEMPLATES

PATIENT_VIEW = "spinewatch-patient-view"
ORDER_IMAGING = "spinewatch-order-imaging"
KNOWN_HOOKS = ("patient-view", "order-select", "order-sign")
HOOKS_BY_SERVICE = {PATIENT_VIEW: ("patient-view",), ORDER_IMAGING: ("order-select", "order-sign")}
_USAGE = ("Needs the prefetch data, or a fhirServer in SPINEWATCH_FHIR_ALLOWED_HOSTS with a "
          "fhirAuthorization token able to read it; otherwise it answers 412.")
# One service id may be listed once per hook (2.0 §Discovery: "multiple entries of CDS service with
# the same id for different hooks").
SERVICES = [
    {"hook": "patient-view", "id": PATIENT_VIEW, "title": "SpineWatch: spinal metastasis red flags",
     "description": "When a chart opens: a patient with a known cancer and back pain or cord-compression "
                    "symptoms gets a card with the NICE NG234 tier (emergency: whole-spine MRI within 24 h; "
                    "urgent: within 1 week; routine: MRI, not X-ray) and a suggestion that proposes the MRI.",
     "prefetch": PREFETCH_TEMPLATES, "usageRequirements": _USAGE},
] + [
    {"hook": hook, "id": ORDER_IMAGING, "title": "SpineWatch: MRI, not X-ray, for spinal metastasis",
     "description": "When a plain X-ray of the spine is ordered for a patient with a known cancer and back pain, "
                    "a card following the tier (critical and 24 h for suspected cord compression, warning and 1 week, "
                    "info) saying why an X-ray cannot exclude metastasis, and a suggestion that replaces it with a "
                    "whole-spine MRI.",
     "prefetch": PREFETCH_TEMPLATES, "usageRequirements": _USAGE}
    for hook in ("order-select", "order-sign")
]
