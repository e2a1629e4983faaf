"""SPINEWATCH_CDS_TRUSTED_ISSUERS parsed: which CDS clients (EHRs) are trusted, and where their
keys are (CDS Hooks 2.0 "Trusting CDS Clients": the JWK Set is configured out of band). Read by the
settings check and by the JWT verifier (service/infra/jwt.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

SANDBOX_ISSUER = "https://sandbox.cds-hooks.org"
SANDBOX_JWKS = "https://sandbox.cds-hooks.org/.well-known/jwks.json"


@dataclass(frozen=True)
class IssuerTrust:
    issuer: str
    jwks: str | None  # URL or local file path of the issuer's JWK Set (out of band, per the spec)
    jku: frozenset[str] = frozenset()  # `jku` header URLs accepted for this issuer


def parse_trusted_issuers(raw: str | None, environment: str) -> dict[str, IssuerTrust]:
    """SPINEWATCH_CDS_TRUSTED_ISSUERS → issuer trust. Unset: the public CDS Hooks sandbox in
    development only (so the sandbox works against a local server out of the box), nobody elsewhere."""
    if raw is None or not raw.strip():
        if environment == "development":
            return {SANDBOX_ISSUER: IssuerTrust(SANDBOX_ISSUER, SANDBOX_JWKS, frozenset({SANDBOX_JWKS}))}
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("SPINEWATCH_CDS_TRUSTED_ISSUERS is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("SPINEWATCH_CDS_TRUSTED_ISSUERS must be a JSON object: issuer -> JWKS")
    out: dict[str, IssuerTrust] = {}
    for issuer, value in data.items():
        if isinstance(value, str):
            value = {"jwks": value}
        if not isinstance(value, dict):
            raise ValueError(f"SPINEWATCH_CDS_TRUSTED_ISSUERS[{issuer!r}] must be a JWKS URL/path or an object")
        jwks = value.get("jwks")
        jku = value.get("jku") or []
        if isinstance(jku, str):
            jku = [jku]
        if (jwks is not None and not isinstance(jwks, str)) or not isinstance(jku, list) \
                or not all(isinstance(u, str) for u in jku):
            raise ValueError(f"SPINEWATCH_CDS_TRUSTED_ISSUERS[{issuer!r}]: jwks must be a string, jku a list of URLs")
        if not jwks and not jku:
            raise ValueError(f"SPINEWATCH_CDS_TRUSTED_ISSUERS[{issuer!r}] names no JWKS and no jku")
        out[issuer] = IssuerTrust(issuer, jwks or None, frozenset(jku))
    return out
