"""FHIR R4 REST client (httpx) for the workers and `spinewatch subscribe`: read, search with paging,
operations, create/update; static bearer or SMART Backend Services authentication.

Errors carry FHIR meaning, and whether trying again can help (the workers retry only those):

    FHIRError                        .transient: would a retry help?
    ├── FHIRTransportError           no HTTP answer: connection refused, timeout        transient
    ├── FHIRAuthError                token endpoint refused us; FHIR said 401/403       permanent
    ├── FHIRPagingError              next link to another origin, or too many pages     permanent
    ├── FHIRTooLarge                 an answer over the size we accept (note Binaries)  permanent
    └── FHIRResponseError            an HTTP error; .status, .outcome (OperationOutcome kept)
        ├── FHIRBadRequest           400, 422: the server cannot process what we sent   permanent
        ├── FHIRNotFound             404, 410 (deleted)                                 permanent
        ├── FHIRPreconditionFailed   412: conditional request whose condition failed    permanent
        ├── FHIRNotSupported         405, 501: interaction or operation not offered     permanent
        └── FHIRServerError          408, 409, 429, 5xx: busy, conflicting, failing     transient

Messages name the interaction, the resource type and the status; never a query value, a body or a
token (search parameters hold patient ids, and tokens are credentials).

One injectable transport (`transport=`) is the test seam; respx mocks it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import jwt
import structlog

from service.infra.fhir.binaries import NotABinary, binary_resource, key_of

from service.core.errors import (FHIRAuthError, FHIRBadRequest, FHIRError, FHIRNotFound,  # noqa: F401 - re-exported
                                 FHIRNotSupported, FHIRPagingError, FHIRPreconditionFailed, FHIRResponseError,
                                 FHIRServerError, FHIRTooLarge, FHIRTransportError, fhir_error_for)

FHIR_JSON = "application/fhir+json"
log = structlog.get_logger("spinewatch.fhir_client")


# The FHIR errors are part of the one tree (service/core/errors.py); re-exported here for callers.
error_for = fhir_error_for


# ---------------- authentication ----------------

class Auth(Protocol):
    def headers(self, http: httpx.Client) -> dict[str, str]: ...

    def invalidate(self) -> None: ...


class NoAuth:
    def headers(self, http: httpx.Client) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        pass


class BearerAuth:
    def __init__(self, token: str):
        if not token:
            raise ValueError("a bearer token is required (SPINEWATCH_FHIR_BEARER_TOKEN)")
        self._token = token

    def headers(self, http: httpx.Client) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        pass


class SmartBackendAuth:
    """SMART App Launch 2.x Backend Services: client_credentials grant, the client authenticating
    with a private_key_jwt assertion (client-confidential-asymmetric: iss = sub = client_id,
    aud = the token URL, exp at most 5 minutes ahead, a fresh jti; RS384 or ES384; `kid` names the
    key in the JWKS the server holds). The access token is reused until shortly before it expires."""

    ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    ASSERTION_LIFETIME = 300  # seconds; the spec's maximum
    REFRESH_MARGIN = 30  # seconds before expiry when a new token is fetched

    def __init__(self, client_id: str, private_key: str, *, alg: str = "RS384", key_id: str | None = None,
                 token_url: str | None = None, scope: str = "system/*.read", fhir_base_url: str | None = None,
                 clock=time.time):
        if alg not in ("RS384", "ES384"):
            raise ValueError("SMART Backend Services requires RS384 or ES384")
        if not client_id or not private_key:
            raise ValueError("SMART Backend Services needs a client id and a private key")
        if not token_url and not fhir_base_url:
            raise ValueError("SMART Backend Services needs a token URL or a FHIR base to discover it")
        self.client_id, self.alg, self.key_id, self.scope = client_id, alg, key_id, scope
        self._key = private_key
        self._token_url = token_url
        self._fhir_base_url = fhir_base_url
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0

    def token_url(self, http: httpx.Client) -> str:
        if self._token_url:
            return self._token_url
        # SMART App Launch 2.x §Conformance: {base}/.well-known/smart-configuration names token_endpoint.
        try:
            r = http.get(f"{self._fhir_base_url.rstrip('/')}/.well-known/smart-configuration",
                         headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise FHIRTransportError(f"GET .well-known/smart-configuration: {type(exc).__name__}") from None
        if r.status_code != 200:
            raise error_for(r.status_code, "GET .well-known/smart-configuration", None)
        try:
            url = r.json()["token_endpoint"]
        except (ValueError, KeyError, TypeError):
            raise FHIRAuthError("smart-configuration has no token_endpoint") from None
        self._token_url = url
        return url

    def assertion(self, token_url: str) -> str:
        now = int(self._clock())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url,
                  "exp": now + self.ASSERTION_LIFETIME, "iat": now, "jti": uuid.uuid4().hex}
        headers = {"typ": "JWT"} | ({"kid": self.key_id} if self.key_id else {})
        return jwt.encode(claims, self._key, algorithm=self.alg, headers=headers)

    def headers(self, http: httpx.Client) -> dict[str, str]:
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at - self.REFRESH_MARGIN:
                self._fetch(http)
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def _fetch(self, http: httpx.Client) -> None:
        url = self.token_url(http)
        form = {"grant_type": "client_credentials", "scope": self.scope,
                "client_assertion_type": self.ASSERTION_TYPE, "client_assertion": self.assertion(url)}
        try:
            r = http.post(url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise FHIRTransportError(f"POST token endpoint: {type(exc).__name__}") from None
        if r.status_code >= 500 or r.status_code == 429:
            raise FHIRServerError(f"POST token endpoint: HTTP {r.status_code}", r.status_code)
        if r.status_code != 200:
            # RFC 6749 §5.2: {"error": "invalid_client" | "invalid_scope" | ...}; the code is safe to show.
            try:
                body = r.json()
            except ValueError:
                body = None
            code = body.get("error", "") if isinstance(body, dict) else ""
            code = code if isinstance(code, str) else ""
            raise FHIRAuthError(f"POST token endpoint: HTTP {r.status_code} {code}".rstrip())
        try:
            body = r.json()
            token, lifetime = body["access_token"], int(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise FHIRAuthError("token endpoint answer has no access_token") from None
        self._token, self._expires_at = token, self._clock() + lifetime
        log.info("fhir.token", client_id=self.client_id, expires_in=lifetime)


def auth_from_settings(settings) -> Auth:
    if settings.fhir_auth == "bearer":
        return BearerAuth(settings.fhir_bearer_token or "")
    if settings.fhir_auth == "smart-backend":
        if not settings.smart_private_key_path:
            raise ValueError("SPINEWATCH_SMART_PRIVATE_KEY_PATH is required for fhir_auth=smart-backend")
        key = Path(settings.smart_private_key_path).read_text()
        return SmartBackendAuth(settings.smart_client_id or "", key, alg=settings.smart_alg,
                                key_id=settings.smart_key_id, token_url=settings.smart_token_url,
                                scope=settings.smart_scope, fhir_base_url=settings.fhir_base_url)
    return NoAuth()


# ---------------- the client ----------------

class FHIRClient:
    def __init__(self, base_url: str, *, auth: Auth | None = None, timeout: float = 10.0, max_pages: int = 50,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.auth = auth or NoAuth()
        self.max_pages = max_pages
        self._origin = _origin(self.base_url)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), transport=transport,
                                  headers={"Accept": FHIR_JSON, "User-Agent": "SpineWatch/0.1"})

    @classmethod
    def from_settings(cls, settings, transport: httpx.BaseTransport | None = None) -> "FHIRClient":
        return cls(settings.fhir_base_url, auth=auth_from_settings(settings), timeout=settings.fhir_timeout_seconds,
                   max_pages=settings.fhir_max_pages, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FHIRClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- interactions --

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
        self._request("DELETE", f"{resource_type}/{resource_id}", what=f"delete {resource_type}")

    def search(self, resource_type: str, params: dict | list | None = None) -> Iterator[dict]:
        """Every resource of every page (matches and includes; OperationOutcome entries skipped),
        following `next` links (R4 §3.1.1.5.6 Paging) on the server's own origin only: a link
        elsewhere would take our token with it."""
        what = f"search {resource_type}"
        page = self._request("GET", resource_type, params=params, what=what)
        pages = 1
        while True:
            for entry in page.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict) or (entry.get("search") or {}).get("mode") == "outcome":
                    continue
                yield resource
            next_url = next((link.get("url") for link in page.get("link") or []
                             if isinstance(link, dict) and link.get("relation") == "next"), None)
            if not next_url:
                return
            if _origin(next_url) != self._origin:
                raise FHIRPagingError(f"{what}: next link points to another origin")
            pages += 1
            if pages > self.max_pages:
                # A partial record could hide a red flag: fail loudly rather than assess half of it.
                raise FHIRPagingError(f"{what}: more than {self.max_pages} pages")
            page = self._request("GET", next_url, what=what)

    def search_all(self, resource_type: str, params: dict | list | None = None) -> list[dict]:
        return list(self.search(resource_type, params))

    def read_binary(self, target: str, max_bytes: int) -> dict:
        """GET a Binary (`Binary/<id>` or an absolute URL on this server's origin) as a Binary
        resource, reading at most `max_bytes`: FHIRTooLarge when Content-Length says more, or the
        body grows past it (the rest is never read). A FHIR JSON answer must be a Binary; raw
        content is wrapped as one (service/infra/fhir/binaries.py)."""
        what = "read Binary"
        if target.startswith(("http://", "https://")) and _origin(target) != self._origin:
            raise FHIRPagingError(f"{what}: the URL points to another origin")  # never sent our token elsewhere
        started = time.perf_counter()
        for attempt in (1, 2):
            headers = self.auth.headers(self._http)
            try:
                with self._http.stream("GET", self._url(target), headers=headers) as r:
                    if r.status_code == 401 and attempt == 1 and not isinstance(self.auth, NoAuth):
                        self.auth.invalidate()
                        continue
                    declared = r.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise FHIRTooLarge(f"{what}: larger than {max_bytes} bytes (Content-Length)")
                    body = bytearray()
                    for chunk in r.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise FHIRTooLarge(f"{what}: larger than {max_bytes} bytes")
                    status, content_type = r.status_code, r.headers.get("content-type")
            except httpx.TimeoutException:
                raise FHIRTransportError(f"{what}: timed out") from None
            except httpx.HTTPError as exc:
                raise FHIRTransportError(f"{what}: {type(exc).__name__}") from None
            break
        log.debug("fhir.request", interaction=what, status=status, bytes=len(body),
                  ms=round((time.perf_counter() - started) * 1000, 1))
        if status >= 400:
            raise error_for(status, what, _outcome_of(bytes(body)))
        try:
            return binary_resource(content_type, bytes(body), key_of(target))
        except NotABinary as exc:
            raise FHIRResponseError(f"{what}: {exc}", status) from None

    # -- plumbing --

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}/{path.lstrip('/')}"

    def _request(self, method: str, path: str, *, params=None, json_body: dict | None = None,
                 headers: dict | None = None, what: str) -> Any:
        started = time.perf_counter()
        extra = headers or {}
        for attempt in (1, 2):
            headers = self.auth.headers(self._http) | extra
            if json_body is not None:
                headers["Content-Type"] = FHIR_JSON
            try:
                r = self._http.request(method, self._url(path), params=params, json=json_body, headers=headers)
            except httpx.TimeoutException:
                raise FHIRTransportError(f"{what}: timed out") from None
            except httpx.HTTPError as exc:
                raise FHIRTransportError(f"{what}: {type(exc).__name__}") from None
            if r.status_code == 401 and attempt == 1 and not isinstance(self.auth, NoAuth):
                self.auth.invalidate()  # an expired or revoked token: fetch a new one once
                continue
            break
        log.debug("fhir.request", interaction=what, status=r.status_code,
                  ms=round((time.perf_counter() - started) * 1000, 1))
        if r.status_code >= 400:
            raise error_for(r.status_code, what, _outcome(r))
        if method == "DELETE" or not r.content:
            return {}
        try:
            document = r.json()
        except ValueError:
            raise FHIRResponseError(f"{what}: the answer is not JSON", r.status_code) from None
        if not isinstance(document, dict):  # every FHIR answer we read is a resource: a JSON object
            raise FHIRResponseError(f"{what}: the answer is not a JSON object", r.status_code)
        return document


def _outcome_of(body: bytes) -> dict | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return document if isinstance(document, dict) and document.get("resourceType") == "OperationOutcome" else None


def _outcome(response: httpx.Response) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()
