"""A hook call's FHIR data: prefetch first, then the CDS client's `fhirServer` for what is missing.

CDS Hooks 2.0 §"Providing FHIR Resources to a CDS Service" (index.html#prefetch-template), per
prefetch key of our discovery templates:

    key missing            the client chose not to (or could not) prefetch it: fetch it from
                           fhirServer with the fhirAuthorization bearer token
    null                   "If the CDS Client has no data to populate a template prefetch key, the
                           prefetch template key MUST have a value of null": no resources
    OperationOutcome       the client hit an error prefetching it, sent "to prevent the CDS Service
                           from incurring an unneeded follow-up query": the data cannot be had
    searchset with `next`  "a CDS Client MAY paginate prefetch results": follow `next` on fhirServer

and "If the CDS Service is unable to obtain required data ... the service SHALL respond with an HTTP
412 Precondition Failed": every failure here is PreconditionFailed, never "no cards".

The reads themselves, and their SSRF rules (allowed hosts, no redirects, https in production, the
token only to the fhirServer origin), are the async client's: service/infra/fhir/async_client.py.

Clinical notes: the recent DocumentReferences come by their own prefetch key. A
prefetch template can hold no computed date (2.0 §Prefetch tokens are context fields; §"Prefetch
query restrictions" allow literal `date` values, `_count` and `_sort` for "most recent" queries),
so the template asks for the most recent NOTES_PREFETCH_COUNT by date and the fallback reads the
same. A note whose text is a Binary on fhirServer is then read from fhirServer (service/infra/
fhir/binaries.py: same origin only, text only, capped in number and size), within the same time
budget; one that cannot be read is left out and the core names the note in `problems`.

    FHIRAccessError    one fetch failed (host not allowed, HTTP error, not FHIR, too many pages)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fhir_mappings.fhir.bundle import patient_key
from service.core.errors import FHIRAccessError, InvalidRequest, PreconditionFailed
from service.infra.fhir.async_client import AsyncFHIRClient, unpack_bundle
from service.infra.fhir.binaries import plan_binaries

NOTES_PREFETCH_COUNT = 20  # the most recent notes a hook reads (prefetch or fallback)


@dataclass(frozen=True)
class PrefetchKey:
    key: str
    resource_type: str
    read: bool  # a read of the patient (Patient/{id}); otherwise a search by patient
    params: tuple[tuple[str, str], ...] = ()  # more search parameters, literal (2.0 prefetch restrictions)
    limit: int | None = None  # most resources read (the template's _count): `next` is followed only up to it

    @property
    def template(self) -> str:
        if self.read:
            return f"{self.resource_type}/{{{{context.patientId}}}}"
        extra = "".join(f"&{name}={value}" for name, value in self.params)
        return f"{self.resource_type}?patient={{{{context.patientId}}}}{extra}"


# What the rules read (NG234 Box 2): the patient, every Condition (a cancer counts whatever its
# date), every Observation (symptoms hide in valueString and notes), and the spine imaging that
# suppresses a card or shows an MRI already ordered: reports, studies, orders, procedures.
PREFETCH_KEYS = (
    PrefetchKey("patient", "Patient", True),
    PrefetchKey("conditions", "Condition", False),
    PrefetchKey("observations", "Observation", False),
    PrefetchKey("diagnosticReports", "DiagnosticReport", False),
    PrefetchKey("imagingStudies", "ImagingStudy", False),
    PrefetchKey("serviceRequests", "ServiceRequest", False),
    PrefetchKey("procedures", "Procedure", False),
    # Clinical notes (US Core DocumentReference), newest first: where the history of the presenting
    # complaint is written.
    PrefetchKey("documentReferences", "DocumentReference", False,
                (("_sort", "-date"), ("_count", str(NOTES_PREFETCH_COUNT))), NOTES_PREFETCH_COUNT),
)
PREFETCH_TEMPLATES = {k.key: k.template for k in PREFETCH_KEYS}


async def fetch_key(client: AsyncFHIRClient, key: PrefetchKey, patient_id: str) -> list[dict]:
    """What the prefetch template `key` would have given, as resources, read from fhirServer."""
    if key.read:
        document = await client.read(key.resource_type, patient_id)
        return [] if document is None else [document]
    return await client.search(key.resource_type, {"patient": patient_id, **dict(key.params)}, key.limit)


@dataclass
class Gathered:
    resources: list[dict]
    source: str  # prefetch | fhir | prefetch+fhir


async def gather(prefetch: dict | None, patient_id: str, client: AsyncFHIRClient | None, *,
                 timeout: float, binary_reads: int = 50, binary_max_bytes: int = 2_000_000) -> Gathered | None:
    """The patient's resources for the rules, or None when the call brought no prefetch at all and
    no fhirServer (the caller may then answer from a stored assessment). Raises PreconditionFailed
    when the data cannot be had, InvalidRequest when a prefetch value is not FHIR. With a client,
    the Binaries the notes name on fhirServer are read too (at most `binary_reads`, each at most
    `binary_max_bytes`)."""
    prefetch = prefetch or {}
    resources: list[dict] = []
    missing: list[PrefetchKey] = []
    pages: list[tuple[PrefetchKey, dict]] = []  # (key, searchset with a next link)
    for key in PREFETCH_KEYS:
        if key.key not in prefetch:
            missing.append(key)
            continue
        value = prefetch[key.key]
        if value is None:
            continue
        if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
            raise InvalidRequest(f"prefetch.{key.key} must be a FHIR resource or null")
        if value["resourceType"] == "OperationOutcome":
            raise PreconditionFailed(f"the CDS client could not prefetch {key.key} (OperationOutcome)")
        try:
            found, next_url = unpack_bundle(value)
        except FHIRAccessError:
            raise PreconditionFailed(f"the CDS client could not prefetch {key.key} (OperationOutcome)") from None
        if next_url and (key.limit is None or len(found) < key.limit):  # fetched whole below, first page included
            pages.append((key, value))
        else:
            resources += found if key.limit is None else found[:key.limit]

    patient = f"Patient/{patient_id}"
    if not missing and not pages:
        if client is None or not plan_binaries(_of(patient, resources), str(client.base), binary_reads).fetch:
            return Gathered(resources, "prefetch")
    if client is None:
        if len(missing) == len(PREFETCH_KEYS):
            return None
        wanted = [k.key for k in missing] + [f"{k.key} (next page)" for k, _ in pages]
        raise PreconditionFailed("prefetch lacks " + ", ".join(wanted) + " and there is no usable fhirServer")
    try:
        async with asyncio.timeout(timeout):
            results = await asyncio.gather(*[fetch_key(client, k, patient_id) for k in missing],
                                           *[client.unpack_search(b, k.limit) for k, b in pages])
            for found in results:
                resources += found
            # Then what the notes name by URL: only now are all the notes known.
            resources += await client.read_binaries(_of(patient, resources), limit=binary_reads,
                                                    max_bytes=binary_max_bytes)
    except TimeoutError:
        raise PreconditionFailed(f"fhirServer did not answer within {timeout:g} s") from None
    except FHIRAccessError as exc:
        raise PreconditionFailed(f"data could not be fetched: {exc}") from None
    if not missing and not pages:
        return Gathered(resources, "prefetch+fhir")
    return Gathered(resources, "fhir" if len(missing) == len(PREFETCH_KEYS) else "prefetch+fhir")


def _of(patient: str, resources: list[dict]) -> list[dict]:
    return [r for r in resources if patient_key(r) == patient]
