"""The audit reviewer's credentials: the reviewer token (SPINEWATCH_REVIEWER_TOKEN) as
`Authorization: Bearer <token>`, or, for the page, a session cookie set by the token form. A refused
caller is audited (kind `auth-failure`: HIPAA Security Rule 45 CFR 164.312(b), audit controls), within
the limits of service/usecases/auth_failures.py: past them the surface answers 429 unchecked.

The session cookie is `<id>.<issued>.<mac>`: a random session id, the issue time (Unix seconds) and
an HMAC-SHA256, keyed by the reviewer token, of both; never the token itself. The server checks the
MAC, that the session is younger than SPINEWATCH_REVIEWER_SESSION_SECONDS and that it was not signed
out. Signing out revokes the id until it would have expired anyway: in this process's memory, or,
when the API processes share a Redis (SPINEWATCH_CDS_JTI_REDIS_URL, as `serve --workers N` requires),
there (SET EX), so a signed-out cookie replayed to another process or host is refused too (OWASP
Session Management cheat sheet: invalidate the session on the server at logout). That Redis
unreachable: 503, never a session let through unchecked. Changing the reviewer token ends every
session at once."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass

import redis
import structlog
from fastapi import Request

from service.api import throttle
from service.api.throttle import client_host
from service.core.errors import SessionStoreUnavailable
from service.core.settings import Settings
from service.infra.audit.writer import AuditLog

__all__ = ["SESSION_COOKIE", "SURFACE", "REVOKED", "Session", "authorised", "client_host", "read_session",
           "refuse", "revocations", "session_value"]
log = structlog.get_logger("spinewatch.security")

SESSION_COOKIE = "spinewatch_review"
SURFACE = "audit"
_CONTEXT = b"spinewatch-review-session/2"
_COOKIE = re.compile(r"^([A-Za-z0-9_-]{16,64})\.([0-9]{1,12})\.([0-9a-f]{64})$")
FUTURE_SKEW = 60  # seconds an issue time may lie ahead of this clock (several hosts)


def _mac(token: str, sid: str, issued: int) -> str:
    message = b"|".join((_CONTEXT, sid.encode("ascii"), str(issued).encode("ascii")))
    return hmac.new(token.encode("utf-8"), message, hashlib.sha256).hexdigest()


def session_value(token: str, issued: int | None = None, sid: str | None = None) -> str:
    """A new session cookie value (a fresh id, issued now unless told)."""
    sid = sid or secrets.token_urlsafe(18)
    issued = int(time.time()) if issued is None else issued
    return f"{sid}.{issued}.{_mac(token, sid, issued)}"


@dataclass(frozen=True)
class Session:
    sid: str
    expires: float  # Unix seconds


class Revoked:
    """Session ids signed out before they expire, each kept until its expiry (then forgotten)."""

    def __init__(self):
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def revoke(self, session: Session, now: float) -> None:
        with self._lock:
            for sid in [s for s, expires in self._expiry.items() if expires <= now]:
                del self._expiry[sid]
            self._expiry[session.sid] = session.expires

    def __contains__(self, sid: str) -> bool:
        with self._lock:
            return sid in self._expiry


class RedisRevoked:
    """Session ids signed out, shared by every API process: one key each, expiring with the session."""

    prefix = "spinewatch:review-revoked:"

    def __init__(self, url: str):
        from service.infra.redis import redis_client

        self._redis = redis_client(url, 2.0)

    def revoke(self, session: Session, now: float) -> None:
        self._call(self._redis.set, self.prefix + session.sid, b"1", ex=max(1, math.ceil(session.expires - now)))

    def __contains__(self, sid: str) -> bool:
        return bool(self._call(self._redis.exists, self.prefix + sid))

    @staticmethod
    def _call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            log.error("audit.session_store_unavailable", error=type(exc).__name__)
            raise SessionStoreUnavailable(f"the reviewer session store is unavailable ({type(exc).__name__}); "
                                          "retry, or use the reviewer token") from None


REVOKED = Revoked()  # one API process's own
_SHARED: dict[str, RedisRevoked] = {}
_SHARED_LOCK = threading.Lock()


def revocations(settings: Settings) -> Revoked | RedisRevoked:
    """Where signed-out sessions are kept: the API processes' shared Redis when there is one."""
    url = settings.cds_jti_redis_url
    if not url:
        return REVOKED
    with _SHARED_LOCK:
        if url not in _SHARED:
            _SHARED[url] = RedisRevoked(url)
        return _SHARED[url]


def read_session(cookie: str, token: str, lifetime: int, now: float,
                 revoked: Revoked | RedisRevoked = REVOKED) -> Session | str:
    """The session a cookie carries, or why it is refused: bad-session, expired-session, revoked-session."""
    match = _COOKIE.match(cookie)
    if not match:
        return "bad-session"
    sid, issued_text, mac = match.groups()
    issued = int(issued_text)
    if not hmac.compare_digest(mac.encode(), _mac(token, sid, issued).encode()) or issued > now + FUTURE_SKEW:
        return "bad-session"
    if now >= issued + lifetime:
        return "expired-session"
    if sid in revoked:
        return "revoked-session"
    return Session(sid, issued + lifetime)


def refuse(request: Request, audit: AuditLog, reason: str) -> None:
    throttle.refused(request, audit.record, SURFACE, reason, actor=client_host(request),
                     detail={"surface": SURFACE, "reason": reason, "path": request.url.path})


def authorised(request: Request, settings: Settings, audit: AuditLog) -> bool:
    """The reviewer token or session, checked in constant time; a wrong one is refused and audited.
    A client refused too often is answered 429 before either is looked at."""
    throttle.check(request, SURFACE, audit.record)
    token = settings.reviewer_token.get_secret_value()
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            throttle.failures(request).sweep(audit.record)  # the reader sees the summaries of ended windows
            return True
        refuse(request, audit, "bad-token")
        return False
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        found = read_session(cookie, token, settings.reviewer_session_seconds, time.time(), revocations(settings))
        if isinstance(found, Session):
            throttle.failures(request).sweep(audit.record)
            return True
        refuse(request, audit, found)
        return False
    return False
