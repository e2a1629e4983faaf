"""The one injection seam: `Annotated` aliases a route declares to receive its collaborators,
each read from the `Services` create_app keeps on `app.state.services`, and the callers'
authentication (CDS clients, the notifying FHIR server, the audit reviewer). The CDS Hooks call
route, the hot path, reads `app.state.services` itself and calls `verify_cds_client`: per call,
FastAPI's resolution of five dependencies cost more than the reads they wrap."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Annotated, NoReturn

import structlog
from fastapi import Depends, Request

from service.api import throttle
from service.api.middleware import log_request_as
from service.api.reviewer import SESSION_COOKIE, authorised, refuse
from service.api.services import Services
from service.core.errors import ServiceUnavailable, Unauthorized
from service.core.metrics import NOTIFICATIONS
from service.core.settings import Settings
from service.infra.audit.writer import AuditLog
from service.infra.evidence_links import EvidenceLinks
from service.core.errors import ReplayCacheUnavailable
from service.infra.jwt import AuthError, CdsClient
from service.infra.queue import WorkQueue
from service.usecases.hook import HookServices
from service.usecases.readiness import Check

cds_log = structlog.get_logger("spinewatch.cds_hooks")
notification_log = structlog.get_logger("spinewatch.notifications")


# Plain reads of the services object: async, so no thread hop on the request path.
async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings_dep(services: ServicesDep) -> Settings:
    return services.settings


async def _audit(services: ServicesDep) -> AuditLog:
    return services.audit


async def _hooks(services: ServicesDep) -> HookServices:
    return services.hooks


async def _evidence(services: ServicesDep) -> EvidenceLinks | None:
    return services.hooks.evidence


async def _queue(services: ServicesDep) -> WorkQueue:
    return services.queue


async def _readiness(services: ServicesDep) -> dict[str, Check]:
    return services.readiness


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
AuditDep = Annotated[AuditLog, Depends(_audit)]
HookServicesDep = Annotated[HookServices, Depends(_hooks)]
EvidenceLinksDep = Annotated[EvidenceLinks | None, Depends(_evidence)]
WorkQueueDep = Annotated[WorkQueue, Depends(_queue)]
ReadinessChecksDep = Annotated[dict[str, Check], Depends(_readiness)]


def expected_audience(request: Request, public_base_url: str | None) -> str:
    """CDS Hooks 2.0 "Trusting CDS Clients": `aud` is the URL of the endpoint being invoked. Behind a
    proxy the URL the client called is SPINEWATCH_PUBLIC_BASE_URL + the path under this app."""
    path = request.scope["path"]
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    base = public_base_url or str(request.base_url)
    return base.rstrip("/") + path


async def verified_client(request: Request, services: ServicesDep) -> CdsClient:
    """`verify_cds_client` as a dependency (discovery, feedback)."""
    return await verify_cds_client(request, services)


async def verify_cds_client(request: Request, services: Services) -> CdsClient:
    """The authenticated CDS client (service/infra/jwt.py checks the bearer JWT), or a bare 401.
    A plain call, for the hook route: resolving FastAPI dependencies costs it more than reading
    the services does."""
    if services.verifier is None:
        return CdsClient(iss="unverified", verified=False)
    throttle.check(request, "cds-hooks", services.audit.event)  # 429, unchecked, past the failure limit
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    try:
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthError("no-bearer")
        return await services.verifier.verify(credentials.strip(),
                                              expected_audience(request, services.settings.public_base_url))
    except AuthError as exc:
        # The route template, not the raw path: the caller chose the path, and it may carry any text.
        route = getattr(request.scope.get("route"), "path", "/cds-services")
        log_request_as(request, cds_log, "cds.auth_failed", level=logging.WARNING, reason=exc.reason, path=route,
                       iss=exc.iss)
        throttle.refused(request, services.audit.event, "cds-hooks", exc.reason, actor=exc.iss or "unknown",
                         detail={"surface": "cds-hooks", "reason": exc.reason, "path": route})
        raise Unauthorized(exc.reason) from None  # the handler answers a bare 401: the reason stays here
    except ReplayCacheUnavailable:
        raise ServiceUnavailable("the JWT replay cache is unavailable; retry") from None


SignatureCheck = Callable[[bytes], None]


async def verified_notifier(request: Request, settings: SettingsDep, audit: AuditDep) -> SignatureCheck:
    """The notifying server's secret, from channel.header (R4 Subscription.channel.header:
    "Additional headers / information to send as part of the notification"), as
    `Authorization: Bearer <secret>`, compared in constant time; 401 otherwise (429, unchecked,
    past the failure limit). Returns the body's signature check, which the route calls on the raw
    bytes it read: with SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET set, `X-Signature` must be
    hex(HMAC-SHA256(secret, body)) (Medplum's subscription-secret extension), else 401 the same way."""
    throttle.check(request, "notifications", audit.event)
    expected = settings.notification_token.get_secret_value().encode()
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    # compare_digest on equal-length inputs takes the same time wherever they differ.
    if not (scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), expected)):
        _refuse_notifier(request, audit, "missing" if not presented else "mismatch")
    secret = settings.notification_signature_secret

    def check_signature(body: bytes) -> None:
        if secret is None:
            return
        signature = request.headers.get("x-signature", "").strip().lower()
        digest = hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.encode(), digest.encode()):
            _refuse_notifier(request, audit, "signature-missing" if not signature else "signature-mismatch")

    return check_signature


def _refuse_notifier(request: Request, audit: AuditLog, reason: str) -> NoReturn:
    NOTIFICATIONS.labels(kind="unknown", outcome="unauthorized").inc()
    throttle.refused(request, audit.event, "notifications", reason, actor="notifier",
                     detail={"surface": "notifications", "reason": reason})
    notification_log.warning("notification.unauthorized", reason=reason)
    raise Unauthorized("notification secret or signature missing or wrong")


def require_reviewer(request: Request, settings: SettingsDep, audit: AuditDep) -> str:
    if not authorised(request, settings, audit):
        if not request.headers.get("authorization") and not request.cookies.get(SESSION_COOKIE):
            refuse(request, audit, "missing-token")
        raise Unauthorized("reviewer token required")
    return "reviewer"


VerifiedClient = Annotated[CdsClient, Depends(verified_client)]
VerifiedNotifier = Annotated[SignatureCheck, Depends(verified_notifier)]
Reviewer = Annotated[str, Depends(require_reviewer)]
