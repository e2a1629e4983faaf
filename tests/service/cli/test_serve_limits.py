"""A real `spinewatch serve`: request headers are bounded (SPINEWATCH_HTTP_MAX_HEADER_BYTES, 16 KiB by
default); a 1 MB header is refused without being read whole, a normal request is served."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.support.processes import SPINEWATCH, Proc, http_up
from tests.support.redis_server import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")} | {
        "SPINEWATCH_ENVIRONMENT": "test", "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{tmp}/audit.sqlite",
        "SPINEWATCH_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    base = f"http://127.0.0.1:{port}"
    proc = Proc([*SPINEWATCH, "serve", "--port", str(port)], env, tmp / "api.log", lambda: http_up(f"{base}/healthz"),
                "spinewatch serve")
    yield port
    proc.stop()


def raw_request(port: int, header_value_bytes: int) -> bytes:
    """GET /healthz with one X-Big header of that many bytes, sent as fast as the server reads it;
    what the server answered (b"" when it closed the connection without an answer)."""
    request = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Big: " + b"a" * header_value_bytes
               + b"\r\n\r\n")
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):  # refused mid-send: the server stopped reading
            pass
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return answer


def test_a_one_megabyte_header_is_refused(server):
    answer = raw_request(server, 1_000_000)
    status = answer.split(b"\r\n", 1)[0]
    assert answer == b"" or status.split()[1] in (b"400", b"431"), status


def test_a_normal_request_is_served(server):
    answer = raw_request(server, 200)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_header_just_under_the_limit_is_served(server):
    answer = raw_request(server, 12_000)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
