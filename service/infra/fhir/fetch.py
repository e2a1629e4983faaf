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

SSRF: the service only ever calls hosts in SPINEWATCH_FHIR_ALLOWED_HOSTS, never follows redirects,
requires https in production ("The scheme MUST be https when production data is exchanged"), and
sends the bearer token only to the fhirServer origin. The token is never logged or stored.

Clinical notes: the recent DocumentReferences come by their own prefetch key. A
prefetch template can hold no computed date (2.0 §Prefetch tokens are context fields; §"Prefetch
query restrictions" allow literal `date` values, `_count` and `_sort` for "most recent" queries),
so the template asks for the most recent NOTES_PREFETCH_COUNT by date and the fallback reads the
same. A note whose text is a Binary on fhirServer is then read from fhirServer (service/
note_binaries.py: same origin only, text only, capped in number and size), within the same time
budget; one that cannot be read is left out and the core names the note in `problems`.

    FhirAccessError    one fetch failed (host not allowed, HTTP error, not FHIR, too many pages)
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from functools import lru_cache

import httpx

from fhir_mappings.fhir.bundle import patient_key
from service.core.errors import InvalidRequest, PreconditionFailed
from service.infra.fhir.binaries import NotABinary, binary_resource, key_of, plan_binaries
from service.core.errors import FHIRAccessError as FhirAccessError  # noqa: F401 - re-exported

FHIR_JSON = "application/fhir+json"
MAX_PAGES = 50  # per search: a bound on a misbehaving server's `next` chain
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


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # One per process: building a verifying context (CA bundle) costs ~20 ms, too much per hook call.
    return httpx.create_ssl_context()




def parse_hosts(raw: str) -> frozenset[str]:
    return frozenset(h.strip().lower() for h in raw.split(",") if h.strip())


def host_allowed(url: httpx.URL, allowed: frozenset[str]) -> bool:
    """`host` entries allow any port; `host:port` entries only that port."""
    host = (url.host or "").lower()
    return bool(host) and (host in allowed or f"{host}:{url.port or _default_port(url)}" in allowed)


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, (url.host or "").lower(), url.port or _default_port(url)


class FhirClient:
    """Reads and searches on one CDS client's FHIR server, for one hook call."""

    def __init__(self, base_url: str, access_token: str | None, allowed_hosts: frozenset[str], *,
                 require_https: bool, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = 2.0):
        try:
            base = httpx.URL(base_url.rstrip("/") + "/")
        except Exception:
            raise FhirAccessError("fhirServer is not a URL") from None
        if base.scheme not in ("https", "http") or (require_https and base.scheme != "https"):
            raise FhirAccessError("fhirServer must be an https URL")
        if base.userinfo:
            raise FhirAccessError("fhirServer must not hold credentials")
        if not host_allowed(base, allowed_hosts):
            raise FhirAccessError("fhirServer host is not in SPINEWATCH_FHIR_ALLOWED_HOSTS")
        self.base = base
        self.allowed_hosts = allowed_hosts
        self._headers = {"Accept": FHIR_JSON}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"
        self._transport = transport
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None  # made on first use: most calls bring all the data

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.base, headers=self._headers, transport=self._transport,
                                           timeout=self._timeout, follow_redirects=False, verify=_tls_context())
        return self._http

    async def __aenter__(self) -> "FhirClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def fetch(self, key: PrefetchKey, patient_id: str) -> list[dict]:
        """What the prefetch template `key` would have given, as resources."""
        if key.read:
            document = await self._get(f"{key.resource_type}/{patient_id}", allow_missing=True)
            return [] if document is None else [document]
        document = await self._get(key.resource_type, params={"patient": patient_id, **dict(key.params)})
        return await self.unpack_search(document, key.limit)

    async def unpack_search(self, bundle: dict, limit: int | None = None) -> list[dict]:
        """All resources of a searchset (the first `limit` with a limit), following `next` links on
        this server."""
        resources, next_url = unpack_bundle(bundle)
        pages = 1
        while next_url and (limit is None or len(resources) < limit):
            pages += 1
            if pages > MAX_PAGES:
                raise FhirAccessError(f"search has more than {MAX_PAGES} pages")
            try:
                url = httpx.URL(next_url)
                if not url.is_absolute_url:
                    url = self.base.join(next_url)
            except (httpx.InvalidURL, TypeError):
                raise FhirAccessError("a next link is not a URL") from None
            # The token goes only where fhirServer is, and every host must be allowlisted (SSRF).
            if _origin(url) != _origin(self.base) or not host_allowed(url, self.allowed_hosts):
                raise FhirAccessError("a next link points outside fhirServer")
            more, next_url = unpack_bundle(await self._get(str(url)))
            resources += more
        return resources if limit is None else resources[:limit]

    async def read_binary(self, target: str, max_bytes: int) -> dict | None:
        """A Binary on this fhirServer (service/infra/fhir/binaries.binary_target made `target`), at most
        `max_bytes`; None when it is gone, too large, refused or not a Binary (its note is then
        named in `problems`). Transport failures and timeouts raise FhirAccessError."""
        try:
            url = httpx.URL(target)
            if not url.is_absolute_url:
                url = self.base.join(target)
        except (httpx.InvalidURL, TypeError):
            return None
        if _origin(url) != _origin(self.base) or not host_allowed(url, self.allowed_hosts):
            return None  # never: binary_target checked the origin; the token goes only to fhirServer
        try:
            async with self._client.stream("GET", url) as response:
                declared = response.headers.get("content-length", "")
                if response.status_code != 200 or (declared.isdigit() and int(declared) > max_bytes):
                    return None
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        return None
                content_type = response.headers.get("content-type")
        except httpx.TimeoutException:
            raise FhirAccessError("fhirServer timed out") from None
        except httpx.HTTPError as exc:
            raise FhirAccessError(f"fhirServer unreachable ({type(exc).__name__})") from None
        key = key_of(target)
        try:
            binary = binary_resource(content_type, bytes(body), key)
        except NotABinary:
            return None
        if binary.get("id") not in (None, key.split("/", 1)[1]):
            return None
        return binary | {"id": key.split("/", 1)[1]}

    async def read_binaries(self, resources: list[dict], *, limit: int, max_bytes: int) -> list[dict]:
        """The Binaries the notes among `resources` name on this fhirServer, read concurrently."""
        plan = plan_binaries(resources, str(self.base), limit)
        found = await asyncio.gather(*[self.read_binary(target, max_bytes) for target, _ in plan.fetch])
        return [b for b in found if b is not None]

    async def _get(self, path: str, params: dict | None = None, allow_missing: bool = False) -> dict | None:
        try:
            response = await self._client.get(path, params=params)
        except httpx.TimeoutException:
            raise FhirAccessError("fhirServer timed out") from None
        except httpx.HTTPError as exc:
            raise FhirAccessError(f"fhirServer unreachable ({type(exc).__name__})") from None
        if allow_missing and response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise FhirAccessError(f"fhirServer answered HTTP {response.status_code}")
        try:
            document = response.json()
        except ValueError:
            raise FhirAccessError("fhirServer answered something other than JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
            raise FhirAccessError("fhirServer answered something other than a FHIR resource")
        if document["resourceType"] == "OperationOutcome":
            raise FhirAccessError("fhirServer answered an OperationOutcome")
        return document


def unpack_bundle(bundle: dict) -> tuple[list[dict], str | None]:
    """(resources, next link) of a searchset page. An OperationOutcome entry with an error or fatal
    issue (Bundle.entry.search.mode = outcome) means the search failed; warnings are kept out."""
    if bundle.get("resourceType") != "Bundle":
        return [bundle], None
    resources: list[dict] = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "OperationOutcome":
            if any(isinstance(i, dict) and i.get("severity") in ("error", "fatal") for i in resource.get("issue") or []):
                raise FhirAccessError("a search answered an error OperationOutcome")
            continue
        resources.append(resource)
    next_url = next((link.get("url") for link in bundle.get("link") or []
                     if isinstance(link, dict) and link.get("relation") == "next" and link.get("url")), None)
    return resources, next_url


@dataclass
class Gathered:
    resources: list[dict]
    source: str  # prefetch | fhir | prefetch+fhir


async def gather(prefetch: dict | None, patient_id: str, client: FhirClient | None, *,
                 timeout: float, binary_reads: int = 50, binary_max_bytes: int = 2_000_000) -> Gathered | None:
    """The patient's resources for the rules, or None when the call brought no prefetch at all and
    no fhirServer (the caller may then answer from a stored assessment). Raises PreconditionFailed
    when the data cannot be had, InvalidRequest when a prefetch value is not FHIR. With a client,
    the Binaries the notes name on fhirServer are read too (at most `binary_reads`, each at most
    `binary_max_bytes`)."""
    prefetch = prefetch or {}
    resources: list[dict] = []
    missing: list[PrefetchKey] = []
    pages: list[tuple[str, dict]] = []  # (key, searchset with a next link)
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
        except FhirAccessError:
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
            results = await asyncio.gather(*[client.fetch(k, patient_id) for k in missing],
                                           *[client.unpack_search(b, k.limit) for k, b in pages])
            for found in results:
                resources += found
            # Then what the notes name by URL: only now are all the notes known.
            resources += await client.read_binaries(_of(patient, resources), limit=binary_reads,
                                                    max_bytes=binary_max_bytes)
    except TimeoutError:
        raise PreconditionFailed(f"fhirServer did not answer within {timeout:g} s") from None
    except FhirAccessError as exc:
        raise PreconditionFailed(f"data could not be fetched: {exc}") from None
    if not missing and not pages:
        return Gathered(resources, "prefetch+fhir")
    return Gathered(resources, "fhir" if len(missing) == len(PREFETCH_KEYS) else "prefetch+fhir")


def _of(patient: str, resources: list[dict]) -> list[dict]:
    return [r for r in resources if patient_key(r) == patient]
