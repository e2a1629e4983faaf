"""A pass-through HTTP proxy in front of a real FHIR server (sekmet), for faults a real server cannot
be asked for: `hold_answer(match)` lets the first matching request reach the server (so it is
written there), then holds the server's answer back until `release()`. A worker killed while it
waits has had its write done without ever hearing of it: the crash between a Communication's
create and the worker's own record of it.

Its `base`, `host`, `release()` and `close()` are what tests/support/fault_stack.py's Stack needs of
its FHIR server, so a Stack can run against sekmet through it. No pytest import here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones httpx sets from the body it sends or decodes.
_NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length",
                  "content-encoding", "accept-encoding"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with its query
    headers: dict[str, str]  # names in lower case
    body: bytes


class FhirProxy:
    """Listens on 127.0.0.1; `base` is the upstream's FHIR base with this proxy's origin."""

    def __init__(self, upstream_root: str, fhir_path: str = "/fhir", max_hold: float = 60.0):
        self.upstream = httpx.Client(base_url=upstream_root, timeout=30)
        self.max_hold = max_hold
        self.requests: list[Request] = []
        self._match: Callable[[Request], bool] | None = None
        self.held = threading.Event()  # set once a matching request was answered by the server
        self._released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.handle(self)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that went away (the killed worker): expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.base = f"http://{self.host}{fhir_path}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def hold_answer(self, match: Callable[[Request], bool]) -> None:
        """The next request `match` accepts is sent on, and its answer held until release()."""
        with self._lock:
            self.held.clear()
            self._released.clear()
            self._match = match

    def release(self) -> None:
        with self._lock:
            self._match = None
        self._released.set()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        request = Request(h.command, h.path, {k.lower(): v for k, v in h.headers.items()},
                          h.rfile.read(length) if length else b"")
        with self._lock:
            self.requests.append(request)
            hold = self._match is not None and self._match(request)
            if hold:
                self._match = None  # one request only
        answer = self.upstream.request(request.method, request.path, content=request.body,
                                       headers={k: v for k, v in request.headers.items() if k not in _NOT_FORWARDED})
        if hold:
            self.held.set()
            self._released.wait(self.max_hold)
        body = answer.content
        try:
            h.send_response(answer.status_code)
            for name, value in answer.headers.multi_items():
                if name.lower() not in _NOT_FORWARDED:
                    h.send_header(name, value)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except OSError:
            pass  # the client is gone (killed, or gave up on a held answer)

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()
