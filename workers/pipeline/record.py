"""The patient's record as the rules need it: the FHIR searches, the focus resources read again at
their current version, and the Binaries the notes name. Also what retractions need: the current
state of records a decision once rested on, and whose a deleted resource was."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import structlog

from fhir_mappings.fhir.bundle import patient_key
from service.core.errors import is_transient
from service.infra.fhir.binaries import plan_binaries
from service.core.errors import FHIRBadRequest, FHIRError, FHIRNotFound, FHIRNotSupported, FHIRScopeRefused
from service.infra.fhir.sync import FHIRClient

log = structlog.get_logger("spinewatch.pipeline")

PAGE_SIZE = "200"
MAX_FOCUS_READS = 20
HISTORY_PAGE_SIZE = "10"  # the newest versions come first (R4 §3.1.0.10): the first page is enough
# Searched, but not every server offers them (sekmet-fhir 0.1.1 has no ClinicalImpression search
# parameters; several EHRs have no ClinicalImpression at all): a refusal leaves them out of the
# record rather than failing every evaluation. Everything else a refusal fails, as before.
OPTIONAL_TYPES = ("ClinicalImpression",)
# A server that does not know a search parameter may ignore it (R4 §3.1.1.5.7 lenient handling),
# answering with every patient's resources: these newer searches keep only the patient's own.
PATIENT_CHECKED_TYPES = ("DocumentReference", "ClinicalImpression")


def fhir_instant(when: datetime) -> str:
    """A FHIR R4 `instant` in UTC with milliseconds, for search parameters."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def record_queries(patient_id: str, window_start: datetime) -> list[tuple[str, list[tuple[str, str]]]]:
    """The searches that fetch everything the rules read (fhir_mappings/clinical/facts.py MODELS).

    Conditions and ServiceRequests at any date: a cancer counts "current or past" (NG234 Box 2), and
    an MRI ordered long ago may still be pending. ImagingStudies at any date too: a spine MRI done
    before the window still answers evidence from an older, still active Condition. Observations,
    DiagnosticReports, Procedures and the notes (DocumentReference, ClinicalImpression) are many, and
    only recent ones can count (NG234 1.1 (recent spinal pain)), so they are limited to the lookback
    window, twice: by clinical date (`date`) and by `_lastUpdated`, because the rules use the latest
    of several dates (Observation.issued, a note's context.period) and `date` searches only one of
    them (and a note without `date` is found only by the second). An undated one of these types never
    counts as recent (fhir_mappings/clinical/evaluate.py `_is_recent`), so the window loses nothing
    the rules could use; an undated Condition can count, and Conditions have no window.

    Each search but the Conditions' asks for the newest first (R4 search `_sort`: by the date it
    searches, else by `_lastUpdated`), so that a record cut short at the cap
    (SPINEWATCH_RECORD_MAX_RESOURCES_PER_SEARCH) keeps the most recent evidence. Whole resources, no
    `_elements`: the rules read codes, texts, statuses and dates all over each resource
    (fhir_mappings/clinical/extract.py), and an R4 `_elements` answer is a SUBSETTED copy that may lack
    elements the validation requires (Observation.status, Condition.subject)."""
    since = "ge" + fhir_instant(window_start)
    common = [("patient", patient_id), ("_count", PAGE_SIZE)]
    by_date = [("date", since), ("_sort", "-date")]
    by_update = [("_lastUpdated", since), ("_sort", "-_lastUpdated")]
    newest = [("_sort", "-_lastUpdated")]
    return [
        ("Condition", common),
        ("ServiceRequest", common + newest),
        ("ImagingStudy", common + newest),
        ("Observation", common + by_date),
        ("Observation", common + by_update),
        ("DiagnosticReport", common + by_date),
        ("DiagnosticReport", common + by_update),
        ("Procedure", common + by_date),
        ("Procedure", common + by_update),
        ("DocumentReference", common + by_date),
        ("DocumentReference", common + by_update),
        ("ClinicalImpression", common + by_date),
        ("ClinicalImpression", common + by_update),
    ]


def _newer(a: dict, b: dict) -> dict:
    """The later of two copies of one resource (versionId when numeric, else lastUpdated)."""
    va, vb = (a.get("meta") or {}).get("versionId"), (b.get("meta") or {}).get("versionId")
    if isinstance(va, str) and isinstance(vb, str) and va.isdigit() and vb.isdigit():
        return a if int(va) >= int(vb) else b
    la, lb = (a.get("meta") or {}).get("lastUpdated") or "", (b.get("meta") or {}).get("lastUpdated") or ""
    return a if la >= lb else b


def unread_problem(rtype: str, read: int) -> str:
    """The `problems` entry of a type whose search was cut short: what was left out, no patient data."""
    return (f"not every {rtype} was read: the newest {read} were, older ones were not (the record is larger "
            "than one evaluation reads)")


def _search_newest_first(fhir: FHIRClient, rtype: str, params: list[tuple[str, str]], limit: int):
    """The capped search, newest first; a server that refuses the sort (400: `_sort` is optional in
    R4, and a strict server may reject what it does not support, R4 §3.1.1.5.7) is asked again
    without it, rather than failing every evaluation: the order matters only past the cap."""
    try:
        return fhir.search_capped(rtype, params, limit)
    except FHIRBadRequest:
        unsorted = [(name, value) for name, value in params if name != "_sort"]
        if unsorted == params:
            raise
        log.info("fetch.sort_refused", type=rtype)
        return fhir.search_capped(rtype, unsorted, limit)


def fetch_record(fhir: FHIRClient, patient: str, now: datetime, lookback_days: int,
                 focus: list[str] | tuple[str, ...] = (), *, note_max_bytes: int = 2_000_000,
                 max_binary_reads: int = 50, max_per_search: int = 10_000,
                 unread: list[str] | None = None, scope_refusals: list[FHIRScopeRefused] | None = None) -> list[dict]:
    """The patient's resources as the rules need them. Each search reads at most `max_per_search`
    resources, and at most the client's max_pages pages, newest first: past either it stops, and
    `unread` (when given) gets one `problems` entry for each type cut short, so that a very large
    record is evaluated on its most recent part rather than not at all. The focus resources of the
    notifications are read again at their current version (a payload may be older than the server's
    present state, and a search index may lag behind a write); a focus that is gone (404/410) is left
    out. Last, the Binaries the notes name by URL on this FHIR server are read (read_note_binaries);
    `scope_refusals` (when given) gets each Binary read our token's scopes did not allow."""
    patient_id = patient.split("/", 1)[1]
    by_ref: dict[str, dict] = {patient: fhir.read("Patient", patient_id)}
    window_start = now - timedelta(days=lookback_days)
    refused: set[str] = set()
    cut_short: dict[str, int] = {}
    for rtype, params in record_queries(patient_id, window_start):
        if rtype in refused:
            continue
        try:
            found = _search_newest_first(fhir, rtype, params, max_per_search)
        except (FHIRBadRequest, FHIRNotFound, FHIRNotSupported) as exc:
            if rtype not in OPTIONAL_TYPES:
                raise
            refused.add(rtype)
            log.info("fetch.optional_search_refused", type=rtype, status=exc.status)
            continue
        for resource in found.resources:
            if rtype in PATIENT_CHECKED_TYPES and resource.get("resourceType") == rtype \
                    and patient_key(resource) != patient:
                continue
            ref = f"{resource.get('resourceType')}/{resource.get('id')}"
            by_ref[ref] = _newer(resource, by_ref[ref]) if ref in by_ref else resource
        if found.stopped:
            cut_short[rtype] = max(cut_short.get(rtype, 0), len(found.resources))
            log.warning("fetch.search_cut_short", patient=patient, type=rtype, read=len(found.resources),
                        reason=found.stopped)
    if unread is not None:
        unread += [unread_problem(rtype, read) for rtype, read in cut_short.items()]
    for ref in sorted(set(focus))[:MAX_FOCUS_READS]:
        rtype, _, rid = ref.partition("/")
        if ref == patient or not rid:
            continue
        try:
            current = fhir.read(rtype, rid)
        except FHIRNotFound:
            by_ref.pop(ref, None)  # deleted since: it no longer counts
            continue
        if patient_key(current) == patient:
            by_ref[ref] = _newer(current, by_ref[ref]) if ref in by_ref else current
    resources = list(by_ref.values())
    return resources + read_note_binaries(fhir, patient, resources, note_max_bytes, max_binary_reads, scope_refusals)


def read_note_binaries(fhir: FHIRClient, patient: str, resources: list[dict], max_bytes: int,
                       limit: int, scope_refusals: list[FHIRScopeRefused] | None = None) -> list[dict]:
    """The Binaries the notes (and report presentedForms) name by `url` on this FHIR server, read
    with the client's authentication: newest notes first, at most `limit`, each at most `max_bytes`
    (service/infra/fhir/binaries.py says which URLs qualify). One that is gone, too large, or refused is
    left out, and the core names its note in `problems` as not read; a transient failure propagates
    (the task is retried, as for any read). A read refused for our token's scopes is also handed to
    `scope_refusals`: a note-only emergency would be missed for a configuration problem, which the
    caller records. Logs carry references and counts, never content."""
    plan = plan_binaries(resources, fhir.base_url, limit)
    found: list[dict] = []
    skipped: dict[str, int] = {}
    for target, key in plan.fetch:
        try:
            binary = fhir.read_binary(target, max_bytes)
        except FHIRError as exc:
            if is_transient(exc):
                raise
            if isinstance(exc, FHIRScopeRefused) and scope_refusals is not None:
                scope_refusals.append(exc)
            reason = {"FHIRTooLarge": "too-large", "FHIRNotFound": "gone"}.get(type(exc).__name__, "refused")
            skipped[reason] = skipped.get(reason, 0) + 1
            log.info("fetch.binary_skipped", patient=patient, binary=key, reason=reason)
            continue
        if isinstance(binary.get("id"), str) and binary["id"] != key.split("/", 1)[1]:
            skipped["wrong-id"] = skipped.get("wrong-id", 0) + 1
            log.warning("fetch.binary_wrong_id", patient=patient, binary=key)
            continue
        found.append(binary | {"id": key.split("/", 1)[1]})
    if plan.fetch or plan.over_cap or plan.elsewhere:
        log.info("fetch.binaries", patient=patient, read=len(found), over_cap=plan.over_cap,
                 not_on_server=plan.elsewhere, **{f"skipped_{k.replace('-', '_')}": n for k, n in skipped.items()})
    return found


def current_resources(fhir: FHIRClient, refs: set[str], record: list[dict]) -> dict[str, dict | None]:
    """Each reference's resource as the server has it now: from the record just fetched, else read
    (None: gone, 404/410). At most MAX_FOCUS_READS reads; the rest wait for the next evaluation."""
    by_ref = {f"{r.get('resourceType')}/{r.get('id')}": r for r in record}
    found: dict[str, dict | None] = {}
    to_read = sorted(ref for ref in refs if ref not in by_ref)
    for ref in to_read[:MAX_FOCUS_READS]:
        rtype, _, rid = ref.partition("/")
        try:
            found[ref] = fhir.read(rtype, rid)
        except FHIRNotFound:
            found[ref] = None
    if len(to_read) > MAX_FOCUS_READS:
        log.info("fetch.retraction_checks_deferred", count=len(to_read) - MAX_FOCUS_READS)
    return found | {ref: by_ref[ref] for ref in refs if ref in by_ref}


def patient_from_history(fhir: FHIRClient, ref: str) -> str | None:
    """Whose a deleted resource was, from its versions (FHIR R4 §3.1.0.10 history: the delete is an
    entry without a resource, and the versions before it still name the subject). None when the
    server keeps no history of it (404/410, 405/501, 400) or no version names a patient."""
    try:
        bundle = fhir.get(f"{ref}/_history", params={"_count": HISTORY_PAGE_SIZE}, what="history")
    except (FHIRBadRequest, FHIRNotFound, FHIRNotSupported):
        return None
    versions = [e["resource"] for e in bundle.get("entry") or []
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                and f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}" == ref]
    versions.sort(key=lambda v: (v.get("meta") or {}).get("lastUpdated") or "", reverse=True)
    return next((owner for owner in map(patient_key, versions) if owner), None)
