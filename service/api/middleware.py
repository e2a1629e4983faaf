"""Request ids: every request gets one (a well-formed incoming X-Request-ID, or a new one), bound
to the log context and returned on the response; one log line per request. And the CORS policy of
the CDS Hooks routes."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # anything else could forge log lines
_QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}  # probes: DEBUG, not INFO


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: take a well-formed incoming X-Request-ID or make one, bind it to the log
    context for the request, return it on the response, and log one line per request (route
    template, never the query string)."""

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
            route = getattr(scope.get("route"), "path", None) or scope.get("path", "")
            level = logging.DEBUG if scope.get("path") in _QUIET_PATHS else logging.INFO
            self.log.log(level, "http.request", method=scope.get("method"), route=route, status=status,
                         duration_ms=round((time.perf_counter() - started) * 1000, 1))
            structlog.contextvars.reset_contextvars(**tokens)


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
