"""The collaborators of one serving process, built once by create_app and kept on
`app.state.services`; routes reach them only through the aliases in service/api/deps.py."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from service.core.settings import Settings
from service.infra.audit.writer import AuditLog
from service.infra.evidence_links import EvidenceLinks
from service.infra.fhir.base import parse_hosts
from service.infra.fhir.terminology import TerminologyServer
from service.core.trusted_issuers import parse_trusted_issuers
from service.infra.jwks import JwksCache
from service.infra.jwt import JwtVerifier
from service.infra.replay import MemoryReplayCache, RedisReplayCache
from service.infra.queue import WorkQueue
from service.infra.assessments import default_source
from service.usecases.hook import HookServices
from service.usecases.readiness import Check, default_checks

log = structlog.get_logger("spinewatch.cds_hooks")


@dataclass
class Services:
    settings: Settings
    audit: AuditLog  # written by a background thread: the request path pays for a queue put
    verifier: JwtVerifier | None  # the CDS clients' JWTs; None: verification switched off (development only)
    hooks: HookServices
    queue: WorkQueue  # no connection until first used
    readiness: dict[str, Check]  # /readyz: name -> check (tests may swap them)


def build_services(settings: Settings) -> Services:
    return Services(
        settings=settings,
        audit=AuditLog(settings, background=True),
        verifier=cds_verifier(settings),
        hooks=HookServices(settings, parse_hosts(settings.fhir_allowed_hosts), stored=default_source(settings),
                           terminology=TerminologyServer.from_settings(settings),
                           evidence=EvidenceLinks.from_settings(settings)),
        queue=WorkQueue(settings),
        readiness=default_checks(settings),
    )


def cds_verifier(settings: Settings) -> JwtVerifier | None:
    """CDS Hooks 2.0 "Trusting CDS Clients": every call carries a JWT signed by a trusted issuer."""
    issuers = parse_trusted_issuers(settings.cds_trusted_issuers, settings.environment)
    verifier = None
    if settings.cds_verify_jwt:
        replay = RedisReplayCache(settings.cds_jti_redis_url) if settings.cds_jti_redis_url else MemoryReplayCache()
        verifier = JwtVerifier(issuers, jwks=JwksCache(ttl=settings.cds_jwks_cache_seconds), replay=replay,
                               clock_skew=settings.jwt_clock_skew_seconds,
                               max_lifetime=settings.jwt_max_lifetime_seconds)
        if not issuers:
            log.warning("cds.no_trusted_issuers", detail="every CDS Hooks call will be refused (401); "
                                                          "set SPINEWATCH_CDS_TRUSTED_ISSUERS")
    else:  # settings.py refuses this in production
        log.warning("cds.jwt_verification_off", detail="DEVELOPMENT ONLY: CDS Hooks callers are NOT authenticated "
                                                       "(SPINEWATCH_CDS_VERIFY_JWT=false)")
    return verifier
