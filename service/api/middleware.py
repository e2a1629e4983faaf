"""Request ids: every request gets one (a well-formed incoming X-Request-ID, or a new one), bound
to the log context and returned on the response; one log line per request, which a route may name
(`log_request_as`). And the CORS policy of the CDS Hooks routes."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # anything else could forge log lines
_QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}  # probes: DEBUG, not INFO
# Where a route leaves its line: the request's ASGI scope, one dict per request that Starlette's
# routing updates in place, so the route and this middleware see the same one.
_REQUEST_LINE = "spinewatch.request_line"


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class RequestLine:
    """What a route says in its request's log line: whose line, which event, at what level, and
    its fields. RequestIdMiddleware adds method, route, status and duration_ms."""

    logger: Any
    event: str
    level: int
    fields: dict[str, Any]


def log_request_as(request: HTTPConnection, logger: Any, event: str, *, level: int = logging.INFO,
                   **fields: Any) -> None:
    """Make this request's one log line `event` from `logger`, with `fields`, instead of `http.request`.

    Nothing is written here: RequestIdMiddleware writes the line when the response is done, with the
    status actually sent (an exception handler's, too). A later call replaces an earlier one."""
    request.scope[_REQUEST_LINE] = RequestLine(logger, event, level, fields)


class RequestIdMiddleware:
    """ASGI middleware: take a well-formed incoming X-Request-ID or make one, bind it to the log
    context for the request, return it on the response, and log one line per request (route
    template, never the query string): `http.request`, or the line its route named."""

    def __init__(self, app: Any):
        self.app = app
        self.log = structlog.get_logger("spinewatch.http")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID_OK.match(incoming) else new_request_id()
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log_line(scope, status, started)
            structlog.contextvars.reset_contextvars(**tokens)

    def _log_line(self, scope: dict, status: int, started: float) -> None:
        route = getattr(scope.get("route"), "path", None) or scope.get("path", "")
        measured = dict(method=scope.get("method"), route=route, status=status,
                        duration_ms=round((time.perf_counter() - started) * 1000, 1))
        named: RequestLine | None = scope.get(_REQUEST_LINE)
        if named is not None:  # the request's own keys last: the status is the one sent
            named.logger.log(named.level, named.event, **(named.fields | measured))
        else:
            level = logging.DEBUG if scope.get("path") in _QUIET_PATHS else logging.INFO
            self.log.log(level, "http.request", **measured)


class CdsHooksCors:
    """CORS for /cds-services only (CDS Hooks 2.0 §Cross-Origin Resource Sharing: browser-based CDS
    clients need it); the rest of the API is not for browsers on other origins.

    Private Network Access (https://wicg.github.io/private-network-access/#cors-preflight): Chrome
    preflights a public page's call to a service on a private address (the CDS Hooks Sandbox calling
    localhost) with `Access-Control-Request-Private-Network: true`, and blocks the call unless the
    answer carries `Access-Control-Allow-Private-Network: true`. Granted to allowed origins only."""

    PRIVATE_NETWORK_GRANT = "Access-Control-Allow-Private-Network"

    def __init__(self, app: Any, origins: list[str]):
        self.app = app
        # No credentials: CDS clients authenticate with a bearer JWT, never cookies (OWASP HTML5
        # Security cheat sheet, "Cross Origin Resource Sharing").
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                                   allow_headers=["Authorization", "Content-Type"], max_age=600,
                                   allow_private_network=True)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/cds-services"):
            origin = Headers(scope=scope).get("origin")
            if origin is not None and not self.cors.is_allowed_origin(origin):
                send = self._without_private_network_grant(send)
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @classmethod
    def _without_private_network_grant(cls, send: Any) -> Any:
        """`send`, minus the grant that Starlette's refusal of a disallowed origin's preflight carries."""
        async def send_without(message: dict) -> None:
            if message["type"] == "http.response.start":
                del MutableHeaders(scope=message)[cls.PRIVATE_NETWORK_GRANT]
            await send(message)
        return send_without
