"""The CDS services this server offers (CDS Hooks 2.0 §Discovery, index.html#discovery).

One service id per hook. 2.0 allows one id listed once per hook, but CDS clients file services by
id: the CDS Hooks Sandbox keys its registry by `{discovery URL}/{id}`, so two entries sharing an id
overwrite each other and only the last hook is ever called. `spinewatch-order-imaging`, the id
that once answered both order hooks, keeps answering them (and its feedback) for EHRs registered
with it, but is no longer listed.
"""

from __future__ import annotations

from service.infra.fhir.fetch import PREFETCH_TEMPLATES

PATIENT_VIEW = "spinewatch-patient-view"
ORDER_SELECT = "spinewatch-order-select"
ORDER_SIGN = "spinewatch-order-sign"
ORDER_IMAGING_ALIAS = "spinewatch-order-imaging"  # answered, not listed: see the module docstring
KNOWN_HOOKS = ("patient-view", "order-select", "order-sign")
HOOKS_BY_SERVICE = {PATIENT_VIEW: ("patient-view",), ORDER_SELECT: ("order-select",), ORDER_SIGN: ("order-sign",),
                    ORDER_IMAGING_ALIAS: ("order-select", "order-sign")}
_USAGE = ("Needs the prefetch data, or a fhirServer in SPINEWATCH_FHIR_ALLOWED_HOSTS with a "
          "fhirAuthorization token able to read it; FHIR R4 only. Otherwise it answers 412.")
_ORDER_DESCRIPTION = ("When a plain X-ray of the spine is ordered for a patient with a known cancer and back pain, "
                      "a card following the tier (critical and 24 h for suspected cord compression, warning and "
                      "1 week, info) saying why an X-ray cannot exclude metastasis, and a suggestion that replaces "
                      "it with a whole-spine MRI.")
SERVICES = [
    {"hook": "patient-view", "id": PATIENT_VIEW, "title": "SpineWatch: spinal metastasis red flags",
     "description": "When a chart opens: a patient with a known cancer and back pain or cord-compression "
                    "symptoms gets a card with the NICE NG234 tier (emergency: whole-spine MRI within 24 h; "
                    "urgent: within 1 week; routine: MRI, not X-ray) and a suggestion that proposes the MRI.",
     "prefetch": PREFETCH_TEMPLATES, "usageRequirements": _USAGE},
    {"hook": "order-select", "id": ORDER_SELECT, "title": "SpineWatch: MRI, not X-ray, for spinal metastasis",
     "description": _ORDER_DESCRIPTION, "prefetch": PREFETCH_TEMPLATES, "usageRequirements": _USAGE},
    {"hook": "order-sign", "id": ORDER_SIGN, "title": "SpineWatch: MRI, not X-ray, for spinal metastasis (signing)",
     "description": _ORDER_DESCRIPTION, "prefetch": PREFETCH_TEMPLATES, "usageRequirements": _USAGE},
]
