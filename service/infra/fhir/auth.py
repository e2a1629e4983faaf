"""How SpineWatch authenticates to a FHIR server: nothing, a static bearer token (RFC 6750), or SMART
Backend Services (SMART App Launch 2.x "Backend Services": the OAuth 2.0 client_credentials grant with
a signed JWT client assertion, RFC 7523).

An `Auth` gives the request headers and forgets its token when the server refuses it (the client
then asks once more, with a new one). Tokens are credentials: never logged, never in a message.

The SMART scope asked for is SPINEWATCH_SMART_SCOPE when set, else `requested_scope`: exactly the
interactions SpineWatch makes with these settings (fhir_mappings/fhir/scopes.py), in v2 or v1 syntax
(SPINEWATCH_SMART_SCOPE_VERSION). A server that turns the requested scopes into an access policy (as
Medplum does) refuses anything else.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

import httpx
import jwt
import structlog

from fhir_mappings.fhir.scopes import Use, needs, scope_string, uses
from service.core.errors import FHIRAuthError, FHIRServerError, FHIRTransportError, fhir_error_for
from service.infra.fhir.base import origin

log = structlog.get_logger("spinewatch.fhir_client")


class Auth(Protocol):
    def headers(self, http: httpx.Client) -> dict[str, str]: ...

    def invalidate(self) -> None: ...


def bearer_header(token: str) -> dict[str, str]:
    """RFC 6750 §2.1: the access token in the Authorization request header."""
    return {"Authorization": f"Bearer {token}"}


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
        return bearer_header(self._token)

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
            raise fhir_error_for(r.status_code, "GET .well-known/smart-configuration", None)
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
            return bearer_header(self._token)

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
            raise FHIRAuthError(f"POST token endpoint: HTTP {r.status_code} {code}".rstrip() + _HINTS.get(code, ""))
        try:
            body = r.json()
            token, lifetime = body["access_token"], int(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise FHIRAuthError("token endpoint answer has no access_token") from None
        self._token, self._expires_at = token, self._clock() + lifetime
        log.info("fhir.token", client_id=self.client_id, expires_in=lifetime)


# What an operator can do about a token endpoint's refusal (RFC 6749 §5.2 error codes).
_HINTS = {"invalid_scope": ": the server refused the scopes asked for (`spinewatch check-config` shows them); one "
                           "that knows only SMART 1.0 scopes needs SPINEWATCH_SMART_SCOPE_VERSION=v1"}


def scope_uses(settings) -> list[Use]:
    """Every FHIR interaction SpineWatch makes with its own credentials, for these settings."""
    terminology_here = bool(settings.terminology_url) and \
        origin(settings.terminology_url) == origin(settings.fhir_base_url)
    return uses(settings.subscribed_types, reads_binaries=settings.note_max_binary_reads > 0,
                terminology_on_fhir_server=terminology_here)


def scope_needs(settings) -> dict[str, str]:
    """Resource type -> the SMART letters (cruds) SpineWatch needs on it."""
    return needs(scope_uses(settings))


def requested_scope(settings) -> str:
    """The scope the token is asked for: SPINEWATCH_SMART_SCOPE, else exactly what SpineWatch needs."""
    return settings.smart_scope or scope_string(scope_needs(settings), settings.smart_scope_version)


def auth_from_settings(settings) -> Auth:
    if settings.fhir_auth == "bearer":
        return BearerAuth(settings.fhir_bearer_token.get_secret_value() if settings.fhir_bearer_token else "")
    if settings.fhir_auth == "smart-backend":
        if not settings.smart_private_key_path:
            raise ValueError("SPINEWATCH_SMART_PRIVATE_KEY_PATH is required for fhir_auth=smart-backend")
        key = Path(settings.smart_private_key_path).read_text()
        return SmartBackendAuth(settings.smart_client_id or "", key, alg=settings.smart_alg,
                                key_id=settings.smart_key_id, token_url=settings.smart_token_url,
                                scope=requested_scope(settings), fhir_base_url=settings.fhir_base_url)
    return NoAuth()
