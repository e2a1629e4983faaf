"""The asynchronous FHIR client (httpx.AsyncClient) of a CDS Hooks call: reads and searches on the
CDS client's `fhirServer` with its `fhirAuthorization` bearer token (CDS Hooks 2.0 §"FHIR Resource
Access"), for one hook call.

SSRF: it only ever calls hosts in SPINEWATCH_FHIR_ALLOWED_HOSTS, never follows redirects, requires
https in production (2.0: "The scheme MUST be https when production data is exchanged"), and sends
the bearer token only to the fhirServer origin. The token is never logged or stored.

Every failure is FHIRAccessError, answered as 412 (2.0: "If the CDS Service is unable to obtain
required data ... the service SHALL respond with an HTTP 412 Precondition Failed"); a Binary that
cannot be read is None instead (its note is then named in `problems`).
"""

from __future__ import annotations

import asyncio

import httpx

from service.core.errors import FHIRAccessError, FHIRError, FHIRTooLarge
from service.infra.fhir.auth import bearer_header
from service.infra.fhir.base import (FHIR_JSON, USER_AGENT, CappedBody, FHIRBase, bundle_entries, host_allowed,
                                     next_link, tls_context)
from service.infra.fhir.binaries import NotABinary, binary_resource, key_of, plan_binaries

MAX_PAGES = 50  # per search: a bound on a misbehaving server's `next` chain

# The 412's words for each failure (FHIRBase.failure): no URL, query, token or patient data.
_SAID = {
    "timed out": "fhirServer timed out",
    "unreachable": "fhirServer unreachable ({detail})",
    "status": "fhirServer answered HTTP {status}",
    "not JSON": "fhirServer answered something other than JSON",
    "not a JSON object": "fhirServer answered something other than a FHIR resource",
    "off origin": "a next link points outside fhirServer",
    "not a URL": "a next link is not a URL",
    "too many pages": "search has more than {max_pages} pages",
}


class AsyncFHIRClient(FHIRBase):
    """Reads and searches on one CDS client's FHIR server, for one hook call."""

    def __init__(self, base_url: str, access_token: str | None, allowed_hosts: frozenset[str], *,
                 require_https: bool, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = 2.0):
        try:
            super().__init__(base_url, max_pages=MAX_PAGES, allowed_hosts=allowed_hosts)
        except Exception:
            raise FHIRAccessError("fhirServer is not a URL") from None
        if self.base.scheme not in ("https", "http") or (require_https and self.base.scheme != "https"):
            raise FHIRAccessError("fhirServer must be an https URL")
        if self.base.userinfo:
            raise FHIRAccessError("fhirServer must not hold credentials")
        if not host_allowed(self.base, allowed_hosts):
            raise FHIRAccessError("fhirServer host is not in SPINEWATCH_FHIR_ALLOWED_HOSTS")
        self._headers = {"Accept": FHIR_JSON, "User-Agent": USER_AGENT} | \
            (bearer_header(access_token) if access_token else {})
        self._transport = transport
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None  # made on first use: most calls bring all the data

    def failure(self, kind: str, what: str, *, status: int = 0, outcome: dict | None = None,
                detail: str = "") -> FHIRError:
        return FHIRAccessError(_SAID[kind].format(status=status, detail=detail, max_pages=self.max_pages))

    def answered(self, status: int) -> bool:
        return status == 200  # a GET that is not 200 (a redirect included: never followed) gave no data

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(headers=self._headers, transport=self._transport, timeout=self._timeout,
                                           follow_redirects=False, verify=tls_context())
        return self._http

    async def __aenter__(self) -> "AsyncFHIRClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    # -- reads --

    async def read(self, resource_type: str, resource_id: str) -> dict | None:
        """GET {type}/{id}; None when the server says it is not there (404) or gone (410)."""
        return await self._get(f"{resource_type}/{resource_id}", allow_missing=True)

    async def capabilities(self) -> dict:
        """GET metadata: the server's CapabilityStatement (a DSTU2 server's Conformance), which
        states its FHIR release (R4 `capabilities` interaction, https://hl7.org/fhir/R4/http.html#capabilities)."""
        return await self._get("metadata")

    async def search(self, resource_type: str, params: dict, limit: int | None = None) -> list[dict]:
        """Every resource of a search (the first `limit` with a limit), `next` links followed."""
        return await self.unpack_search(await self._get(resource_type, params=params), limit)

    async def unpack_search(self, bundle: dict, limit: int | None = None) -> list[dict]:
        """All resources of a searchset (the first `limit` with a limit), following `next` links on
        this server (R4 §3.1.1.5.6 Paging)."""
        resources, link = unpack_bundle(bundle)
        page = 1
        while link and (limit is None or len(resources) < limit):
            page += 1
            more, link = unpack_bundle(await self._get(self.next_page(link, page, "search")))
            resources += more
        return resources if limit is None else resources[:limit]

    async def read_binary(self, target: str, max_bytes: int) -> dict | None:
        """A Binary on this fhirServer (service/infra/fhir/binaries.binary_target made `target`), at most
        `max_bytes`; None when it is gone, too large, refused or not a Binary (its note is then
        named in `problems`). Transport failures and timeouts raise FHIRAccessError."""
        url = self.url(target)
        if not self.on_server(url):
            return None  # never: binary_target checked the origin; the token goes only to fhirServer
        try:
            status, content_type, body = await self._exchange(url, max_bytes=max_bytes)
        except FHIRTooLarge:
            return None
        key = key_of(target)
        try:
            binary = binary_resource(content_type, body, key) if self.answered(status) else None
        except NotABinary:
            return None
        if binary is None or binary.get("id") not in (None, key.split("/", 1)[1]):
            return None
        return binary | {"id": key.split("/", 1)[1]}

    async def read_binaries(self, resources: list[dict], *, limit: int, max_bytes: int) -> list[dict]:
        """The Binaries the notes among `resources` name on this fhirServer, read concurrently."""
        plan = plan_binaries(resources, str(self.base), limit)
        found = await asyncio.gather(*[self.read_binary(target, max_bytes) for target, _ in plan.fetch])
        return [b for b in found if b is not None]

    # -- plumbing --

    async def _get(self, path: str, params: dict | None = None, allow_missing: bool = False) -> dict | None:
        status, _, body = await self._exchange(self.url(path), params=params)
        if allow_missing and status in (404, 410):
            return None
        document = self.document(status, body, "GET")
        if not isinstance(document.get("resourceType"), str):
            raise self.failure("not a JSON object", "GET")
        if document["resourceType"] == "OperationOutcome":
            raise FHIRAccessError("fhirServer answered an OperationOutcome")
        return document

    async def _exchange(self, url: str, *, params: dict | None = None,
                        max_bytes: int | None = None) -> tuple[int, str | None, bytes]:
        """(status, Content-Type, body) of one GET, the body read at most `max_bytes`."""
        with self.transport_errors("GET"):
            async with self._client.stream("GET", url, params=params) as response:
                body = CappedBody(response.headers, max_bytes, "read Binary")
                async for chunk in response.aiter_bytes():
                    body.add(chunk)
        return response.status_code, response.headers.get("content-type"), bytes(body.data)


def unpack_bundle(bundle: dict) -> tuple[list[dict], str | None]:
    """(resources, next link) of a searchset page. An OperationOutcome entry with an error or fatal
    issue (R4 Bundle.entry.search.mode = outcome) means the search failed; warnings are kept out."""
    if bundle.get("resourceType") != "Bundle":
        return [bundle], None
    resources: list[dict] = []
    for resource, _ in bundle_entries(bundle):
        if resource.get("resourceType") == "OperationOutcome":
            issues = resource.get("issue") or []
            if any(isinstance(i, dict) and i.get("severity") in ("error", "fatal") for i in issues):
                raise FHIRAccessError("a search answered an error OperationOutcome")
            continue
        resources.append(resource)
    return resources, next_link(bundle)
