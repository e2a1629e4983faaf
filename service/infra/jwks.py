"""The CDS clients' JSON Web Key Sets (RFC 7517), fetched from each trusted issuer's configured JWKS
URL or file (CDS Hooks 2.0 "Trusting CDS Clients": keys are configured out of band), cached, and
refetched on an unknown `kid` no more often than _REFETCH_UNKNOWN_KID_AFTER."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import httpx
import jwt
import structlog

from service.core.errors import AuthError

log = structlog.get_logger("spinewatch.security")

KEY_TYPE = {"ES384": "EC", "RS384": "RSA"}
MIN_RSA_BITS = 2048
_REFETCH_UNKNOWN_KID_AFTER = 30.0  # seconds: key rotation is picked up, but a flood of bad kids is not a fetch flood
_RETRY_FAILED_FETCH_AFTER = 5.0  # seconds: during a JWKS outage callers are not each held for a fetch timeout


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # ~20 ms to build: once per process


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
    if jwk.get("kty") != KEY_TYPE[alg] or jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig":
        raise AuthError("key-mismatch")
    if alg == "ES384" and jwk.get("crv") != "P-384":
        raise AuthError("key-mismatch")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
    except jwt.PyJWTError:
        raise AuthError("key-invalid") from None
    if alg == "RS384" and key.key.key_size < MIN_RSA_BITS:
        raise AuthError("key-too-small")
    return key
