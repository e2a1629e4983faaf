"""Authenticating CDS clients: CDS Hooks 2.0 "Trusting CDS Clients" (security.html#trusting-cds-clients).

Every call (discovery, service, feedback) carries `Authorization: Bearer <JWT>`, signed by the CDS
client with its private key. `JwtVerifier.verify` accepts a token only when all of these hold:

  - `alg` is ES384 or RS384 (the spec's recommended pair). Never `none` ("SHALL NOT be signed using
    the none algorithm") and never HMAC ("SHALL NOT be signed using any symmetric algorithm"), so a
    token "signed" with our copy of the public key as an HMAC secret cannot pass.
  - `kid` names a key (the spec makes it REQUIRED) and `typ`, when present, is `JWT`.
  - `iss` is in SPINEWATCH_CDS_TRUSTED_ISSUERS ("CDS Services SHOULD maintain an allowlist of the
    `iss` and `jku` fields"); the key comes from that issuer's JWKS, or from the `jku` header URL
    only when that exact URL is allowlisted for that issuer (rfc7515 4.1.2: an unchecked `jku` lets
    the caller bring its own key).
  - the signature verifies with that key, whose type matches `alg` (EC P-384 / RSA >= 2048 bits).
  - `aud` is the URL called ("this value MUST be the URL of the CDS Service endpoint being invoked").
  - `exp` is not past and `iat` not in the future, each with a small clock-skew allowance; both are
    finite numbers (not strings, bools, NaN or 1e300), the lifetime `exp - iat` is at most
    SPINEWATCH_JWT_MAX_LIFETIME_SECONDS and `iat` no older than that (CDS Hooks recommends 5 minutes).
  - `jti` has not been seen before while the token is valid (best practices: "short-term storage
    of JWTs previously processed"); recorded only after everything else passed, so a forged token
    cannot burn a real client's jti.

A failure raises AuthError with a short reason code for the log and metrics; the HTTP answer is a
bare 401 (best practices: "should not leak the details of why the JWT failed validation"). The
token itself is never logged, stored or put in an exception message.

    AuthError                    the caller is not trusted (→ 401)
    ReplayCacheUnavailable       the jti store (Redis) is down (→ 503: not the caller's fault)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import ssl
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import httpx
import jwt
import structlog

from service.core.trusted_issuers import SANDBOX_ISSUER, SANDBOX_JWKS, IssuerTrust, parse_trusted_issuers  # noqa: F401
from service.core.errors import ReplayCacheUnavailable  # noqa: F401 - re-exported
log = structlog.get_logger("spinewatch.security")

ALLOWED_ALGORITHMS = ("ES384", "RS384")
_KEY_TYPE = {"ES384": "EC", "RS384": "RSA"}
_MIN_RSA_BITS = 2048
_REFETCH_UNKNOWN_KID_AFTER = 30.0  # seconds: key rotation is picked up, but a flood of bad kids is not a fetch flood
_RETRY_FAILED_FETCH_AFTER = 5.0  # seconds: during a JWKS outage callers are not each held for a fetch timeout
_TIME_CLAIM_LIMIT = 1e11  # seconds since 1970 (year ~5138): a larger or negative exp / iat is not a time


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # ~20 ms to build: once per process


class AuthError(Exception):
    """The caller is not trusted. `reason` is a short code (logs, metrics); never the token."""

    def __init__(self, reason: str, iss: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.iss = iss  # set only once the issuer is known to be trusted




@dataclass(frozen=True)
class CdsClient:
    """Who called: the verified issuer (or "unverified" when verification is off in development)."""

    iss: str
    jti: str | None = None
    tenant: str | None = None
    verified: bool = True


# ---------------------------------------------------------------------------------------------
# JWK Sets


@dataclass
class _CachedSet:
    keys: dict[str, dict]  # kid -> JWK
    fetched: float
    expires: float
    parsed: dict[tuple[str, str], jwt.PyJWK] = field(default_factory=dict)  # (kid, alg) -> key


class JwksCache:
    """JWK Sets by source (URL or file path), reused for `ttl` seconds; an unknown `kid` refetches
    (rotation), at most once per _REFETCH_UNKNOWN_KID_AFTER seconds per source."""

    def __init__(self, ttl: float = 300.0, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = 3.0):
        self.ttl = ttl
        self.transport = transport
        self.timeout = timeout
        self._sets: dict[str, _CachedSet] = {}
        self._failed: dict[str, float] = {}  # source -> when its last fetch failed
        self._locks: dict[str, asyncio.Lock] = {}

    async def key(self, source: str, kid: str, alg: str) -> jwt.PyJWK:
        cached = self._sets.get(source)
        now = time.monotonic()
        if cached is None or now >= cached.expires or \
                (kid not in cached.keys and now - cached.fetched >= _REFETCH_UNKNOWN_KID_AFTER):
            cached = await self._refresh(source, cached)
        parsed = cached.parsed.get((kid, alg))
        if parsed is None:
            jwk = cached.keys.get(kid)
            if jwk is None:
                raise AuthError("unknown-kid")
            parsed = cached.parsed[(kid, alg)] = _parse_key(jwk, alg)
        return parsed

    async def _refresh(self, source: str, previous: _CachedSet | None) -> _CachedSet:
        lock = self._locks.setdefault(source, asyncio.Lock())
        async with lock:
            current = self._sets.get(source)
            if current is not None and current is not previous:  # another request refreshed it meanwhile
                return current
            now = time.monotonic()
            if previous is None and now - self._failed.get(source, -1e9) < _RETRY_FAILED_FETCH_AFTER:
                raise AuthError("jwks-unavailable")
            try:
                document = await self._load(source)
            except Exception as exc:  # network, file, JSON: the key cannot be had, so nobody is trusted
                log.warning("cds.jwks_unavailable", source=source, error=type(exc).__name__)
                self._failed[source] = now
                if previous is not None:  # keep the keys we had a little longer: an outage is not a rotation
                    kept = self._sets[source] = _CachedSet(previous.keys, now, now + _RETRY_FAILED_FETCH_AFTER,
                                                           previous.parsed)
                    return kept
                raise AuthError("jwks-unavailable") from None
            keys = {k["kid"]: k for k in document.get("keys", []) if isinstance(k, dict) and isinstance(k.get("kid"), str)}
            now = time.monotonic()
            fresh = self._sets[source] = _CachedSet(keys, now, now + self.ttl)
            return fresh

    async def _load(self, source: str) -> dict:
        if source.startswith(("https://", "http://")):
            async with httpx.AsyncClient(transport=self.transport, timeout=self.timeout, follow_redirects=False,
                                         verify=_tls_context()) as client:
                response = await client.get(source, headers={"Accept": "application/json"})
                response.raise_for_status()
                document = response.json()
        else:
            path = Path(source.removeprefix("file://"))
            document = json.loads(await asyncio.to_thread(path.read_text, encoding="utf-8"))
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWK Set")
        return document


def _parse_key(jwk: dict, alg: str) -> jwt.PyJWK:
    """The JWK as a verification key for `alg`, refusing keys of another type or purpose."""
    if jwk.get("kty") != _KEY_TYPE[alg] or jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig":
        raise AuthError("key-mismatch")
    if alg == "ES384" and jwk.get("crv") != "P-384":
        raise AuthError("key-mismatch")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
    except jwt.PyJWTError:
        raise AuthError("key-invalid") from None
    if alg == "RS384" and key.key.key_size < _MIN_RSA_BITS:
        raise AuthError("key-too-small")
    return key


# ---------------------------------------------------------------------------------------------
# jti replay cache


class ReplayCache(Protocol):
    async def first_use(self, key: str, ttl_seconds: int) -> bool:
        """Record `key` for `ttl_seconds`; False when it was already recorded and still live."""


class MemoryReplayCache:
    """Per process. Enough for one process; several processes need the Redis cache."""

    def __init__(self):
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0

    async def first_use(self, key: str, ttl_seconds: int) -> bool:
        now = time.monotonic()
        with self._lock:
            if now >= self._next_prune:
                self._seen = {k: until for k, until in self._seen.items() if until > now}
                self._next_prune = now + 60
            until = self._seen.get(key)
            if until is not None and until > now:
                return False
            self._seen[key] = now + ttl_seconds
            return True


class RedisReplayCache:
    """Shared by every API process: SET NX EX is one atomic check-and-record."""

    def __init__(self, url: str, prefix: str = "spinewatch:cds:jti:"):
        self._url = url
        self._prefix = prefix
        self._clients: dict[int, object] = {}  # one client per event loop (TestClient, uvicorn)

    def _client(self):
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            from service.infra.redis import async_redis_client

            client = self._clients[loop_id] = async_redis_client(self._url, 2.0)
        return client

    async def first_use(self, key: str, ttl_seconds: int) -> bool:
        try:
            return bool(await self._client().set(self._prefix + key, b"1", nx=True, ex=max(1, ttl_seconds)))
        except Exception as exc:
            log.error("cds.replay_cache_unavailable", error=type(exc).__name__)
            raise ReplayCacheUnavailable() from None


# ---------------------------------------------------------------------------------------------
# The verifier

_CLAIM_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "bad-signature"),
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not-yet-valid"),  # iat (or nbf) in the future
    (jwt.InvalidAudienceError, "wrong-aud"),
    (jwt.InvalidIssuerError, "wrong-iss"),
    (jwt.MissingRequiredClaimError, "missing-claim"),
    (jwt.InvalidAlgorithmError, "alg-not-allowed"),
    (jwt.DecodeError, "malformed"),
)


def _b64json(segment: str) -> dict:
    value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _peek(token: str) -> tuple[dict, dict]:
    """Header and claims, unverified: only to choose the issuer's key. jwt.decode then verifies
    everything again from the token itself (one cheap parse here instead of two PyJWT passes)."""
    try:
        header, payload, _signature = token.split(".")
        return _b64json(header), _b64json(payload)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise AuthError("malformed") from None


def _is_time(value: object) -> bool:
    """A NumericDate (rfc7519 2): a finite JSON number, not a bool, within a sane range."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value < _TIME_CLAIM_LIMIT)


class JwtVerifier:
    def __init__(self, issuers: dict[str, IssuerTrust], *, jwks: JwksCache, replay: ReplayCache,
                 clock_skew: int = 30, max_lifetime: int = 3600):
        self.issuers = issuers
        self.jwks = jwks
        self.replay = replay
        self.clock_skew = clock_skew
        self.max_lifetime = max_lifetime

    async def verify(self, token: str, audience: str) -> CdsClient:
        """The trusted caller of `token` at URL `audience`, or AuthError."""
        header, unverified = _peek(token)
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthError("alg-not-allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("no-kid")
        if "typ" in header and str(header["typ"]).upper() != "JWT":
            raise AuthError("bad-typ")
        iss = unverified.get("iss")
        trust = self.issuers.get(iss) if isinstance(iss, str) else None
        if trust is None:
            raise AuthError("unknown-iss")
        # Checked before PyJWT sees them: it takes int("123") and int(True), and int(inf) raises
        # OverflowError. The claims checked here are the ones jwt.decode verifies (same payload).
        for claim in ("exp", "iat"):
            if claim in unverified and not _is_time(unverified[claim]):
                raise AuthError("bad-time-claim", iss)
        jku = header.get("jku")
        if jku is not None:
            if not isinstance(jku, str) or jku not in trust.jku:
                raise AuthError("jku-not-allowed", iss)
            source = jku
        elif trust.jwks:
            source = trust.jwks
        else:
            raise AuthError("no-jwks", iss)
        try:
            key = await self.jwks.key(source, kid, alg)
        except AuthError as exc:
            raise AuthError(exc.reason, iss) from None
        audiences = [audience.rstrip("/"), audience.rstrip("/") + "/"]
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=audiences, issuer=iss,
                                leeway=self.clock_skew,
                                options={"require": ["iss", "aud", "exp", "iat", "jti"], "verify_iat": True})
        except jwt.PyJWTError as exc:
            reason = next((r for kind, r in _CLAIM_ERRORS if isinstance(exc, kind)), "invalid")
            raise AuthError(reason, iss) from None
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise AuthError("missing-claim", iss)
        # With exp not past, this also caps iat's age at max_lifetime (+ skew), and so the jti's keep.
        if claims["exp"] - claims["iat"] > self.max_lifetime:
            raise AuthError("lifetime-too-long", iss)
        # Remember the jti for as long as the token could still be accepted (exp + skew).
        ttl = int(claims["exp"] - time.time()) + self.clock_skew + 1
        digest = hashlib.sha256(f"{iss}\x00{jti}".encode()).hexdigest()
        if not await self.replay.first_use(digest, max(ttl, 1)):
            raise AuthError("replayed-jti", iss)
        tenant = claims.get("tenant")
        return CdsClient(iss=iss, jti=jti, tenant=tenant if isinstance(tenant, str) else None)
