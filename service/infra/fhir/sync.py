"""The synchronous FHIR R4 REST client (httpx.Client) of the workers, the alerts and `spinewatch
subscribe`: read, search with paging, operations, create/update/delete (FHIR R4 §3.1.0 RESTful API);
static bearer or SMART Backend Services authentication (service/infra/fhir/auth.py).

Errors carry FHIR meaning, and whether trying again can help (the one tree, service/core/errors.py;
the workers retry only the transient ones):

    FHIRError                        .transient: would a retry help?
    ├── FHIRTransportError           no HTTP answer: connection refused, timeout        transient
    ├── FHIRAuthError                token endpoint refused us; FHIR said 401/403       permanent
    │   └── FHIRScopeRefused         403 / 401 insufficient_scope: .interaction, .needed_scope (the
    │                                SMART scope it needed, fhir_mappings/fhir/scopes.py)
    ├── FHIRPagingError              next link to another origin, or too many pages     permanent
    │                                (search_capped cuts a long search short instead)
    ├── FHIRTooLarge                 an answer over the size we accept (note Binaries)  permanent
    └── FHIRResponseError            an HTTP error; .status, .outcome (OperationOutcome kept)
        ├── FHIRBadRequest           400, 422: the server cannot process what we sent   permanent
        ├── FHIRNotFound             404, 410 (deleted)                                 permanent
        ├── FHIRPreconditionFailed   412: conditional request whose condition failed    permanent
        ├── FHIRNotSupported         405, 501: interaction or operation not offered     permanent
        └── FHIRServerError          408, 409, 429, 5xx: busy, conflicting, failing     transient
                                     .retry_after: the server's Retry-After, in seconds

Messages name the interaction, the resource type and the status; never a query value, a body or a
token (search parameters hold patient ids, and tokens are credentials).

One injectable transport (`transport=`) is the test seam; respx mocks it.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import httpx
import structlog

from fhir_mappings.fhir.scopes import ScopeVersion, refusal
from service.core.errors import FHIRResponseError, FHIRScopeRefused
from service.infra.fhir.auth import Auth, NoAuth, SmartBackendAuth, auth_from_settings
from service.infra.fhir.base import FHIR_JSON, USER_AGENT, CappedBody, FHIRBase, bundle_entries, next_link
from service.infra.fhir.binaries import NotABinary, binary_resource, key_of

log = structlog.get_logger("spinewatch.fhir_client")


@dataclass(frozen=True)
class CappedSearch:
    """What a capped search read, and why it stopped before its last page: None (it did not),
    "limit" (its cap of matches) or "pages" (max_pages)."""
    resources: list[dict]
    stopped: Literal["limit", "pages"] | None


class FHIRClient(FHIRBase):
    def __init__(self, base_url: str, *, auth: Auth | None = None, timeout: float = 10.0, max_pages: int = 50,
                 transport: httpx.BaseTransport | None = None, scope_version: ScopeVersion = "v2"):
        super().__init__(base_url, max_pages=max_pages)
        self.auth = auth or NoAuth()
        self.scope_version = scope_version  # the syntax a refused request's needed scope is named in
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), transport=transport,
                                  headers={"Accept": FHIR_JSON, "User-Agent": USER_AGENT})

    @classmethod
    def from_settings(cls, settings, transport: httpx.BaseTransport | None = None) -> "FHIRClient":
        return cls(settings.fhir_base_url, auth=auth_from_settings(settings), timeout=settings.fhir_timeout_seconds,
                   max_pages=settings.fhir_max_pages, transport=transport, scope_version=settings.smart_scope_version)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FHIRClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- interactions (R4 §3.1.0 RESTful API) --

    def read(self, resource_type: str, resource_id: str) -> dict:
        return self._request("GET", f"{resource_type}/{resource_id}", what=f"read {resource_type}")

    def capabilities(self) -> dict:
        return self._request("GET", "metadata", what="capabilities")

    def get(self, path: str, params: dict | list | None = None, what: str | None = None) -> dict:
        """GET {base}/{path}: operations such as Subscription/{id}/$status."""
        return self._request("GET", path, params=params, what=what or f"GET {path.split('/')[0]}")

    def create(self, resource: dict, *, if_none_exist: str | None = None) -> dict:
        """POST; with if_none_exist ("identifier=system|value") a conditional create (R4 §3.1.0.8.1):
        the server returns the existing match instead of a second copy."""
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        return self._request("POST", resource["resourceType"], json_body=resource, headers=headers,
                             what=f"create {resource['resourceType']}")

    def update(self, resource: dict) -> dict:
        rtype = resource["resourceType"]
        return self._request("PUT", f"{rtype}/{resource['id']}", json_body=resource, what=f"update {rtype}")

    def delete(self, resource_type: str, resource_id: str) -> None:
        what = f"delete {resource_type}"
        status, headers, body = self._exchange("DELETE", f"{resource_type}/{resource_id}", what=what)
        self.check_status(status, body, what, headers)

    def search(self, resource_type: str, params: dict | list | None = None) -> Iterator[dict]:
        """Every resource of every page (matches and includes; OperationOutcome entries skipped),
        following `next` links (R4 §3.1.1.5.6 Paging) on the server's own origin only: a link
        elsewhere would take our token with it. More than max_pages pages: FHIRPagingError."""
        for page in self._pages(resource_type, params):
            yield from (resource for resource, mode in bundle_entries(page) if mode != "outcome")

    def search_capped(self, resource_type: str, params: dict | list | None, limit: int) -> CappedSearch:
        """The resources of a search up to its first `limit` matches (with the includes of the pages
        read), for a caller that can work on part of an answer it asked for newest first (`_sort`).
        A search longer than that, or than max_pages pages, is cut short there rather than failed:
        `stopped` says which, and the pages after it are never asked for."""
        found: list[dict] = []
        matches = 0
        for number, page in enumerate(self._pages(resource_type, params), 1):
            for resource, mode in bundle_entries(page):
                if mode == "outcome":
                    continue
                if mode != "include":  # a server may leave search.mode out: a match (R4 Bundle.entry.search)
                    if matches == limit:
                        return CappedSearch(found, "limit")
                    matches += 1
                found.append(resource)
            if next_link(page) and (matches == limit or number == self.max_pages):
                return CappedSearch(found, "limit" if matches == limit else "pages")
        return CappedSearch(found, None)

    def _pages(self, resource_type: str, params: dict | list | None) -> Iterator[dict]:
        """Each page (searchset Bundle) of a search, the next one asked for only when wanted."""
        what = f"search {resource_type}"
        page = self._request("GET", resource_type, params=params, what=what)
        for number in itertools.count(2):
            yield page
            link = next_link(page)
            if not link:
                return
            page = self._request("GET", self.next_page(link, number, what), what=what)

    def search_all(self, resource_type: str, params: dict | list | None = None) -> list[dict]:
        return list(self.search(resource_type, params))

    def read_binary(self, target: str, max_bytes: int) -> dict:
        """GET a Binary (`Binary/<id>` or an absolute URL on this server's origin) as a Binary
        resource, reading at most `max_bytes`: FHIRTooLarge when Content-Length says more, or the
        body grows past it (the rest is never read). A FHIR JSON answer must be a Binary; raw
        content is wrapped as one (service/infra/fhir/binaries.py)."""
        what = "read Binary"
        if not self.on_server(self.url(target)):
            raise self.failure("off origin", what, detail="the URL")  # never send our token elsewhere
        status, headers, body = self._exchange("GET", target, what=what, max_bytes=max_bytes)
        self.check_status(status, body, what, headers)
        try:
            return binary_resource(headers.get("content-type"), body, key_of(target))
        except NotABinary as exc:
            raise FHIRResponseError(f"{what}: {exc}", status) from None

    # -- plumbing --

    def _request(self, method: str, path: str, *, params=None, json_body: dict | None = None,
                 headers: dict | None = None, what: str) -> dict:
        headers = dict(headers or {}) | ({"Content-Type": FHIR_JSON} if json_body is not None else {})
        status, answer_headers, body = self._exchange(method, path, what=what, params=params, json=json_body,
                                                      headers=headers)
        return self.document(status, body, what, answer_headers)

    def _exchange(self, method: str, path: str, *, what: str, max_bytes: int | None = None,
                  headers: dict | None = None, **request) -> tuple[int, httpx.Headers, bytes]:
        """(status, headers, body) of one request, asked again once with a new token after a
        401 (an expired or revoked token; not for insufficient_scope: a new token has the same
        scopes). Refused (403, 401 insufficient_scope): FHIRScopeRefused."""
        started = time.perf_counter()
        for attempt in (1, 2):
            sent = self.auth.headers(self._http) | (headers or {})
            with self.transport_errors(what), self._http.stream(method, self.url(path), headers=sent, **request) as r:
                if r.status_code == 401 and attempt == 1 and not isinstance(self.auth, NoAuth) \
                        and not insufficient_scope(r.headers):
                    self.auth.invalidate()
                    continue
                body = CappedBody(r.headers, max_bytes, what)
                for chunk in r.iter_bytes():
                    body.add(chunk)
                break
        log.debug("fhir.request", interaction=what, status=r.status_code, bytes=len(body.data),
                  ms=round((time.perf_counter() - started) * 1000, 1))
        if r.status_code == 403 or (r.status_code == 401 and insufficient_scope(r.headers)):
            raise self._refused(method, path, r.status_code, what)
        return r.status_code, r.headers, bytes(body.data)

    def _refused(self, method: str, path: str, status: int, what: str) -> FHIRScopeRefused:
        relative = path.removeprefix(self.base_url + "/")  # a `next` link or a Binary's absolute URL
        requested = self.auth.scope if isinstance(self.auth, SmartBackendAuth) else None
        found = refusal(method, relative, status, what, self.scope_version, requested)
        log.warning("fhir.refused", interaction=found.interaction or what, status=status,
                    needed_scope=found.needed_scope)
        return FHIRScopeRefused(found.message, status, found.interaction, found.needed_scope)


_INSUFFICIENT_SCOPE = re.compile(r'\berror\s*=\s*"?insufficient_scope\b', re.IGNORECASE)


def insufficient_scope(headers: httpx.Headers) -> bool:
    """RFC 6750 §3.1: `WWW-Authenticate: Bearer error="insufficient_scope"` (RFC 7235 §2.1: the value
    quoted or not)."""
    return bool(_INSUFFICIENT_SCOPE.search(headers.get("www-authenticate", "")))
