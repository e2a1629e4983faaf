"""What the two FHIR client faces share: the synchronous one of the workers (service/infra/fhir/sync.py)
and the asynchronous one of a CDS Hooks call (service/infra/fhir/async_client.py). No I/O here.

- URLs: a request path relative to the base (FHIR R4 §3.1.0 RESTful API, "Service Base URL"); a
  link a server gave us resolved against the base (RFC 3986 §5.2);
- origins (scheme, host, port: RFC 6454 §4): a token goes only to the origin of the base it was
  issued for, and, where the face has one, only to hosts on its allow-list;
- answers: a status of 400 or more maps to the error tree (service.core.errors.fhir_error_for), a
  body must be a JSON object, and one read with a cap stops at it (FHIRTooLarge);
- search paging (R4 §3.1.1.5.6 "Paging": Bundle.link relation `next`): a `next` link is followed
  only on the base's origin, and only up to the face's page cap: a partial record could hide a red
  flag, so too many pages fail rather than being cut short, unless the caller asked for a capped
  search and says what was left unread (the workers' record, sync.py `search_capped`);
- the OperationOutcome an error answer carries (R4 §3.1.0 "HTTP Status Codes"), kept on the error,
  and its Retry-After (RFC 9110 §10.2.3: delta-seconds or an HTTP-date) as `retry_after` seconds.

How each failure is worded and typed is the face's own (`FHIRBase.failure`): the workers' face says
what failed in FHIR terms (typed, some transient); the hook face answers every failure with a 412
(CDS Hooks 2.0 §"FHIR Resource Access").
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timezone
from email.utils import parsedate_to_datetime
from functools import lru_cache
from urllib.parse import urlsplit

import httpx

from service.core.errors import (FHIRError, FHIRPagingError, FHIRResponseError, FHIRServerError, FHIRTooLarge,
                                 FHIRTransportError, fhir_error_for)

FHIR_JSON = "application/fhir+json"  # R4 §3.1.0 "Content Types and encodings"
USER_AGENT = "SpineWatch/0.1"


# ---------------- origins and hosts ----------------

def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def origin(url: str | httpx.URL) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, the port defaulted (RFC 6454 §4); None otherwise."""
    try:
        parts = urlsplit(str(url))
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _default_port(scheme)


def parse_hosts(raw: str) -> frozenset[str]:
    """The allow-list SPINEWATCH_FHIR_ALLOWED_HOSTS: `host` or `host:port`, comma separated."""
    return frozenset(h.strip().lower() for h in raw.split(",") if h.strip())


def host_allowed(url: str | httpx.URL, allowed: frozenset[str]) -> bool:
    """`host` entries allow any port; `host:port` entries only that port."""
    found = origin(url)
    return found is not None and (found[1] in allowed or f"{found[1]}:{found[2]}" in allowed)


@lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    # One per process: building a verifying context (CA bundle) costs ~20 ms, too much per hook call.
    return httpx.create_ssl_context()


# ---------------- answers ----------------

def operation_outcome(body: bytes) -> dict | None:
    """The OperationOutcome an answer's body holds, if it is one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return document if isinstance(document, dict) and document.get("resourceType") == "OperationOutcome" else None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 §10.2.3): delta-seconds (`120`) or an
    HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms, §5.6.7), measured from `now`
    (epoch seconds). A date in the past is 0; a value that is neither is None (no advice)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():  # 1*DIGIT only: no sign, no fraction
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP-dates are always GMT (§5.6.7)
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def bundle_entries(bundle: dict) -> Iterator[tuple[dict, str | None]]:
    """(resource, Bundle.entry.search.mode) of each entry that holds a resource."""
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            search = entry.get("search")
            yield resource, search.get("mode") if isinstance(search, dict) else None


def next_link(bundle: dict) -> str | None:
    """Bundle.link[relation = next].url (R4 §3.1.1.5.6 Paging)."""
    return next((link.get("url") for link in bundle.get("link") or []
                 if isinstance(link, dict) and link.get("relation") == "next" and link.get("url")), None)


class CappedBody:
    """An answer's body read in chunks, at most `max_bytes` (None: no cap): FHIRTooLarge as soon as
    Content-Length says more or the body grows past it (the rest is never read)."""

    def __init__(self, headers: Mapping[str, str], max_bytes: int | None, what: str):
        self.max_bytes, self.what = max_bytes, what
        self.data = bytearray()
        declared = headers.get("content-length", "")
        if max_bytes is not None and declared.isdigit() and int(declared) > max_bytes:
            raise FHIRTooLarge(f"{what}: larger than {max_bytes} bytes (Content-Length)")

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if self.max_bytes is not None and len(self.data) > self.max_bytes:
            raise FHIRTooLarge(f"{self.what}: larger than {self.max_bytes} bytes")


# ---------------- the base of both faces ----------------

_PAGING = {"off origin": "points to another origin", "not a URL": "is not a URL"}


class FHIRBase:
    """A FHIR server's base URL, its origin and what may be sent there; answers and `next` links
    checked; failures made by `failure`, which a face overrides to word them its own way."""

    def __init__(self, base_url: str, *, max_pages: int, allowed_hosts: frozenset[str] | None = None):
        self.base_url = base_url.rstrip("/")
        self.base = httpx.URL(self.base_url + "/")
        self.max_pages = max_pages
        self.allowed_hosts = allowed_hosts  # None: any host of the base's origin
        self._origin = origin(self.base_url)

    # -- failures --

    def failure(self, kind: str, what: str, *, status: int = 0, outcome: dict | None = None,
                detail: str = "") -> FHIRError:
        """The error for a failure of `kind`: "timed out", "unreachable" (detail: the exception's
        name), "status" (an HTTP error), "not JSON", "not a JSON object", "off origin" and "not a URL"
        (detail: which link, a `next` link by default), "too many pages". `what` names the
        interaction, never its data."""
        if kind == "status":
            return fhir_error_for(status, what, outcome)
        if kind in ("timed out", "unreachable"):
            return FHIRTransportError(f"{what}: {detail or kind}")
        if kind in ("not JSON", "not a JSON object"):
            return FHIRResponseError(f"{what}: the answer is {kind}", status)
        if kind == "too many pages":
            return FHIRPagingError(f"{what}: more than {self.max_pages} pages")
        return FHIRPagingError(f"{what}: {detail or 'next link'} {_PAGING[kind]}")

    @contextmanager
    def transport_errors(self, what: str) -> Iterator[None]:
        """No HTTP answer (refused, reset, timed out) as the face's failure; never the URL or a header."""
        try:
            yield
        except httpx.TimeoutException:
            raise self.failure("timed out", what) from None
        except httpx.HTTPError as exc:
            raise self.failure("unreachable", what, detail=type(exc).__name__) from None

    # -- URLs and origins --

    def url(self, path: str) -> str:
        """An absolute URL as given; a request path relative to the base."""
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}/{path.lstrip('/')}"

    def on_server(self, url: str | httpx.URL) -> bool:
        """Whether `url` is on this server: the base's origin, and an allowed host where there is a list."""
        return self._origin is not None and origin(url) == self._origin and \
            (self.allowed_hosts is None or host_allowed(url, self.allowed_hosts))

    def resolve(self, link: object, what: str) -> str:
        """A link the server gave (absolute, or relative to the base), on this server, or the failure."""
        try:
            url = self.base.join(link)
        except (httpx.InvalidURL, TypeError):
            raise self.failure("not a URL", what) from None
        if url.userinfo or not self.on_server(url):  # our token would go with it
            raise self.failure("off origin", what)
        return str(url)

    def next_page(self, link: str, page: int, what: str) -> str:
        """The URL of search page number `page` (the first is 1) from the previous page's `next` link."""
        url = self.resolve(link, what)
        if page > self.max_pages:
            raise self.failure("too many pages", what)
        return url

    # -- answers --

    def answered(self, status: int) -> bool:
        """Whether a status is an answer (R4 §3.1.0 "HTTP Status Codes": 4xx and 5xx are errors)."""
        return status < 400

    def check_status(self, status: int, body: bytes, what: str, headers: Mapping[str, str] | None = None) -> None:
        """The face's failure for an HTTP error, with the OperationOutcome the body holds and the
        Retry-After the headers carry."""
        if not self.answered(status):
            error = self.failure("status", what, status=status, outcome=operation_outcome(body))
            if isinstance(error, FHIRServerError):  # a face's own failure (the hook's 412) has no use for it
                error.retry_after = parse_retry_after((headers or {}).get("retry-after"))
            raise error

    def document(self, status: int, body: bytes, what: str, headers: Mapping[str, str] | None = None) -> dict:
        """The JSON object an answer holds ({} for none); the face's failure otherwise."""
        self.check_status(status, body, what, headers)
        if not body:
            return {}
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise self.failure("not JSON", what, status=status) from None
        if not isinstance(document, dict):  # every FHIR answer we read is a resource: a JSON object
            raise self.failure("not a JSON object", what, status=status)
        return document
