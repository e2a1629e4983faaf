"""Response headers for pages and data that must not be cached, framed, sniffed or sent on as a
referrer (OWASP Secure Headers; W3C CSP Level 3 for Content-Security-Policy): one builder, used per
response (the full-evidence page) or for every response under a path (the audit surface, below,
errors and 401s included)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from starlette.datastructures import MutableHeaders


def sha256_source(text: str) -> str:
    """A CSP hash source for an inline <style> or <script> block: 'sha256-...'."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def no_store_headers(csp: str, **extra: str) -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Robots-Tag": "noindex",
        "Content-Security-Policy": csp,
        **extra,
    }


class PathHeaders:
    """ASGI middleware: add `headers` (where the response has not set them) to every response whose
    path, under the app's root_path, is `prefix` or below it."""

    def __init__(self, app: Any, prefix: str, headers: dict[str, str]):
        self.app = app
        self.prefix = prefix.rstrip("/")
        self.headers = headers

    def applies(self, scope: dict) -> bool:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.applies(scope):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
