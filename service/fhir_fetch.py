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

    FhirAccessError    one fetch failed (host not allowed, HTTP error, not FHIR, too many pages)
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from functools import lru_cache

import httpx

from service.errors import InvalidRequest, PreconditionFailed

FHIR_JSON = "application/fhir+json"
MAX_PAGES = 50  # per search: a bound on a misbehaving server's `next` chain


@dataclass(frozen=True)
class PrefetchKey:
    key: str
    resource_type: str
    read: bool  # a read of the patient (Patient/{id}); otherwise a search by patient

    @property
    def template(self) -> str:
        if self.read:
            return f"{self.resource_type}/{{{{context.patientId}}}}"
        return f"{self.resource_type}?patient={{{{context.patientId}}}}"


# What the rules read (CLINICAL.md): the patient, every Condition (a cancer counts whatever its
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
)
PREFETCH_TEMPLATES = {k.key: k.template for k in PREFETCH_KEYS}


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # One per process: building a verifying context (CA bundle) costs ~20 ms, too much per hook call.
    return httpx.create_ssl_context()


class FhirAccessError(Exception):
    """A fetch from the FHIR server failed. The message is for the 412 answer: no patient data."""


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
        document = await self._get(key.resource_type, params={"patient": patient_id})
        return await self.unpack_search(document)

    async def unpack_search(self, bundle: dict) -> list[dict]:
        """All resources of a searchset, following `next` links on this server."""
        resources, next_url = unpack_bundle(bundle)
        pages = 1
        while next_url:
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
        return resources

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
                 timeout: float) -> Gathered | None:
    """The patient's resources for the rules, or None when the call brought no prefetch at all and
    no fhirServer (the caller may then answer from a stored assessment). Raises PreconditionFailed
    when the data cannot be had, InvalidRequest when a prefetch value is not FHIR."""
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
        if next_url:  # fetched whole below, first page included
            pages.append((key.key, value))
        else:
            resources += found

    if not missing and not pages:
        return Gathered(resources, "prefetch")
    if client is None:
        if len(missing) == len(PREFETCH_KEYS):
            return None
        wanted = [k.key for k in missing] + [f"{k} (next page)" for k, _ in pages]
        raise PreconditionFailed("prefetch lacks " + ", ".join(wanted) + " and there is no usable fhirServer")
    try:
        async with asyncio.timeout(timeout):
            results = await asyncio.gather(*[client.fetch(k, patient_id) for k in missing],
                                           *[client.unpack_search(b) for _, b in pages])
    except TimeoutError:
        raise PreconditionFailed(f"fhirServer did not answer within {timeout:g} s") from None
    except FhirAccessError as exc:
        raise PreconditionFailed(f"data could not be fetched: {exc}") from None
    for found in results:
        resources += found
    return Gathered(resources, "fhir" if len(missing) == len(PREFETCH_KEYS) else "prefetch+fhir")
