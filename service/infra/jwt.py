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

import base64
import binascii
import hashlib
import json
import math
import time
from dataclasses import dataclass

import jwt
import structlog

from service.core.errors import AuthError
from service.core.trusted_issuers import IssuerTrust
from service.infra.jwks import JwksCache
from service.infra.replay import ReplayCache
log = structlog.get_logger("spinewatch.security")

ALLOWED_ALGORITHMS = ("ES384", "RS384")
_TIME_CLAIM_LIMIT = 1e11  # seconds since 1970 (year ~5138): a larger or negative exp / iat is not a time


@dataclass(frozen=True)
class CdsClient:
    """Who called: the verified issuer (or "unverified" when verification is off in development)."""

    iss: str
    jti: str | None = None
    tenant: str | None = None
    verified: bool = True


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
