"""Draft orders → what kind of spine imaging they ask for (order-select / order-sign).

A plain X-ray of the spine is what the order hooks challenge (NG234: it must
not be used to diagnose or exclude spinal metastases); an MRI of the spine already among the drafts
means the clinician is doing the right thing and needs no card. The codes and phrases are the
reviewed value sets `xray-spine` and `mri-spine`; nothing here is a literal code.

Pure: no I/O. A draft order is a FHIR R4 ServiceRequest (CDS Hooks order-select / order-sign
`draftOrders`); other request types (MedicationRequest, NutritionOrder...) are never imaging.
"""

from __future__ import annotations

from fhir_mappings.clinical.terminology import Concept, Terminology, load_terminology

XRAY_SPINE = "xray-spine"
MRI_SPINE = "mri-spine"
_IMAGING_ORDER_TYPES = ("ServiceRequest",)


def _codings(concept: object) -> list[tuple[str | None, str | None]]:
    if not isinstance(concept, dict):
        return []
    return [(c.get("system"), c.get("code")) for c in concept.get("coding") or [] if isinstance(c, dict)]


def _texts(concept: object) -> list[str]:
    if not isinstance(concept, dict):
        return []
    texts = [concept.get("text")] + [c.get("display") for c in concept.get("coding") or [] if isinstance(c, dict)]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _is(concept: Concept, codings, texts) -> bool:
    """A coding decides first; the text fallback only when no coding said "no" (as facts.py does)."""
    said_no = False
    for system, code in codings:
        verdict = concept.match_coding(system, code)
        if verdict:
            return True
        said_no = said_no or verdict is False
    if said_no:
        return False
    return any(concept.match_text(t) for t in texts)


def classify_order(resource: dict, terminology: Terminology | None = None) -> str | None:
    """`mri-spine`, `xray-spine`, or None for a draft order.

    The order's code may name the modality and leave the site to `bodySite` ("X-ray" + "Lumbar
    spine"), so each code text is also read joined with each body-site text.
    """
    if not isinstance(resource, dict) or resource.get("resourceType") not in _IMAGING_ORDER_TYPES:
        return None
    term = terminology or load_terminology()
    code = resource.get("code")
    codings = _codings(code)
    texts = _texts(code)
    sites = [t for site in resource.get("bodySite") or [] for t in _texts(site)]
    texts += [f"{text} {site}" for text in texts for site in sites]
    # MRI first: a draft coded as spine MRI is never challenged, whatever its text says.
    if _is(term.mri_spine, codings, texts):
        return MRI_SPINE
    if _is(term.xray_spine, codings, texts):
        return XRAY_SPINE
    return None


def draft_resources(draft_orders: object) -> list[dict]:
    """The resources of a `draftOrders` Bundle (entries without a resource are skipped)."""
    if not isinstance(draft_orders, dict):
        return []
    entries = draft_orders.get("entry") or []
    return [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


def reference(resource: dict) -> str | None:
    """`Type/id` of a draft order, or None when it has no id (it cannot then be deleted by id)."""
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{rid}" if isinstance(rid, str) and rid else None
