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

FHIR R4 only (fhir_mappings/fhir/versions.py says which releases and why): data of an earlier
release would be misread in silence, so it is a 412 that says so. Every prefetched and fetched
resource gets a cheap scan for pre-R4 types and shapes; and when fhirServer is read, its /metadata
`fhirVersion` is asked alongside the first reads of that base (ServerReleases: remembered in the
process, so later calls pay nothing), within the same time budget. A /metadata that fails or says
nothing usable does not stop a call whose reads work: the scan of what they bring still applies.

    FHIRAccessError    one fetch failed (host not allowed, HTTP error, not FHIR, too many pages)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from fhir_mappings.fhir.bundle import patient_key
from fhir_mappings.fhir.versions import ACCEPTED_TEXT, ServerRelease, first_pre_r4_shape, server_release
from service.core.errors import FHIRAccessError, InvalidRequest, PreconditionFailed
from service.infra.fhir.async_client import AsyncFHIRClient, unpack_bundle
from service.infra.fhir.binaries import plan_binaries

log = structlog.get_logger("spinewatch.cds_hooks")

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


class ServerReleases:
    """Each fhirServer base's FHIR release, from its /metadata, remembered in the process (one per
    app): a server's release does not change between calls, so a base costs one /metadata read for
    an hour, not one per call (concurrent first calls to a new base may each ask). A /metadata that
    fails, is too slow or states nothing usable is remembered as unknown for a minute: asked again
    then, and meanwhile it holds no call up."""

    KNOWN_SECONDS = 3600.0  # a stated release
    UNKNOWN_SECONDS = 60.0  # no usable answer
    MAX_BASES = 256  # bases are caller text on allowed hosts: the memory stays bounded

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._seen: dict[str, tuple[ServerRelease | None, float]] = {}  # base -> (release, until)

    def cached(self, base: str) -> tuple[bool, ServerRelease | None]:
        """(known, release): known is False when /metadata must be asked (never, or too long ago)."""
        seen = self._seen.get(base)
        if seen is None or self._clock() >= seen[1]:
            return False, None
        return True, seen[0]

    async def ask(self, client: AsyncFHIRClient, deadline: float) -> ServerRelease | None:
        """The release client's server states in /metadata, asked before `deadline` (event-loop
        time); None when it cannot be had. Never raises for the server's failures: remembered."""
        release = None
        try:
            async with asyncio.timeout_at(deadline):
                release = server_release(await client.capabilities())
            if release is None:
                log.info("cds.fhir_release_unstated")
        except (FHIRAccessError, TimeoutError) as exc:
            log.info("cds.fhir_metadata_unavailable", reason=str(exc) or "timed out")
        self._remember(client.base_url, release)
        return release

    def _remember(self, base: str, release: ServerRelease | None) -> None:
        self._seen.pop(base, None)
        if len(self._seen) >= self.MAX_BASES:
            self._seen.pop(next(iter(self._seen)))  # the oldest answer
        ttl = self.KNOWN_SECONDS if release is not None else self.UNKNOWN_SECONDS
        self._seen[base] = (release, self._clock() + ttl)


def refuse_unless_r4(release: ServerRelease | None) -> None:
    """PreconditionFailed naming the release when the server is not FHIR R4 / R4B."""
    if release is not None and not release.accepted:
        raise PreconditionFailed(release.refusal())


def refuse_pre_r4(resources: list[dict], where: str) -> None:
    """PreconditionFailed when `resources` (from `where`) hold data of a release before R4."""
    found = first_pre_r4_shape(resources)
    if found:
        raise PreconditionFailed(f"{where} is not FHIR R4: it holds {found}; SpineWatch reads {ACCEPTED_TEXT}")


@dataclass
class Gathered:
    resources: list[dict]
    source: str  # prefetch | fhir | prefetch+fhir


async def gather(prefetch: dict | None, patient_id: str, client: AsyncFHIRClient | None, *,
                 releases: ServerReleases, timeout: float, binary_reads: int = 50,
                 binary_max_bytes: int = 2_000_000) -> Gathered | None:
    """The patient's resources for the rules, or None when the call brought no prefetch at all and
    no fhirServer (the caller may then answer from a stored assessment). Raises PreconditionFailed
    when the data cannot be had or is not FHIR R4, InvalidRequest when a prefetch value is not FHIR.
    With a client, the Binaries the notes name on fhirServer are read too (at most `binary_reads`,
    each at most `binary_max_bytes`), and the server's release is checked (`releases`)."""
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
        refuse_pre_r4(found, f"prefetch.{key.key}")
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

    deadline = asyncio.get_running_loop().time() + timeout  # one budget for the reads and /metadata

    async def read() -> list[dict]:
        try:
            fetched = await read_from_server(client, missing, pages, resources, patient_id, deadline,
                                             binary_reads=binary_reads, binary_max_bytes=binary_max_bytes)
        except TimeoutError:
            raise PreconditionFailed(f"fhirServer did not answer within {timeout:g} s") from None
        except FHIRAccessError as exc:
            raise PreconditionFailed(f"data could not be fetched: {exc}") from None
        refuse_pre_r4(fetched, "the data fhirServer answered")
        return fetched

    resources += await read_on_a_known_release(client, releases, deadline, read)
    if not missing and not pages:
        return Gathered(resources, "prefetch+fhir")
    return Gathered(resources, "fhir" if len(missing) == len(PREFETCH_KEYS) else "prefetch+fhir")


async def read_on_a_known_release(client: AsyncFHIRClient, releases: ServerReleases, deadline: float,
                                  read: Callable[[], Awaitable[list[dict]]]) -> list[dict]:
    """`read()`'s resources, from a server whose release is R4 or not known to be otherwise. A
    remembered release decides at once (a DSTU2 server is never read again); a new base's
    /metadata is asked alongside the reads, and its verdict comes before theirs (a DSTU2 server
    that refuses R4 searches is named as DSTU2, not as an HTTP error)."""
    known, release = releases.cached(client.base_url)
    if known:
        refuse_unless_r4(release)
        return await read()
    asking = asyncio.ensure_future(releases.ask(client, deadline))
    try:
        fetched = await read()
    except PreconditionFailed:
        refuse_unless_r4(await asking)
        raise
    except BaseException:  # cancelled, or a bug: the question is not left running
        asking.cancel()
        raise
    refuse_unless_r4(await asking)
    return fetched


async def read_from_server(client: AsyncFHIRClient, missing: list[PrefetchKey], pages: list[tuple[PrefetchKey, dict]],
                           prefetched: list[dict], patient_id: str, deadline: float, *, binary_reads: int,
                           binary_max_bytes: int) -> list[dict]:
    """What the prefetch lacked, read from fhirServer before `deadline` (event-loop time, else
    TimeoutError): the missing keys, the rest of the paginated ones, then the Binaries the notes
    name. FHIRAccessError when a read fails."""
    async with asyncio.timeout_at(deadline):
        results = await asyncio.gather(*[fetch_key(client, k, patient_id) for k in missing],
                                       *[client.unpack_search(b, k.limit) for k, b in pages])
        fetched = [resource for found in results for resource in found]
        # Then what the notes name by URL: only now are all the notes known.
        notes = _of(f"Patient/{patient_id}", prefetched + fetched)
        return fetched + await client.read_binaries(notes, limit=binary_reads, max_bytes=binary_max_bytes)


def _of(patient: str, resources: list[dict]) -> list[dict]:
    return [r for r in resources if patient_key(r) == patient]
