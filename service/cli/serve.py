"""`spinewatch serve [--host H] [--port P]`: the FastAPI service (CDS Hooks, notifications, audit) under uvicorn.

HTTP limits (docs/operations.md): uvicorn's h11 protocol is chosen explicitly, as it is the one that
bounds the bytes of a request's line and headers (SPINEWATCH_HTTP_MAX_HEADER_BYTES via
h11_max_incomplete_event_size; httptools, which `auto` would pick, has no such bound); idle
keep-alive connections close after SPINEWATCH_HTTP_KEEP_ALIVE_SECONDS. uvicorn has no timeout for
reading the headers: production runs behind a proxy that has one (nginx `client_header_timeout`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from service.cli.check_config import settings_or_exit


def uvicorn_options(settings) -> dict:
    """The uvicorn options every `spinewatch serve` runs with (the Dockerfile's CMD says the same)."""
    return {"http": "h11", "h11_max_incomplete_event_size": settings.http_max_header_bytes,
            "timeout_keep_alive": settings.http_keep_alive_seconds}


def serve(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0: all)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8000,
) -> None:
    """Serve the API with uvicorn (settings: SPINEWATCH_* environment variables)."""
    import uvicorn

    settings = settings_or_exit()  # invalid settings: one line each and exit 2, before the port is bound
    # proxy_headers stays at uvicorn's default (trust only 127.0.0.1); behind another proxy set
    # SPINEWATCH_PUBLIC_BASE_URL so the CDS Hooks JWT `aud` check uses the external URL.
    uvicorn.run("service.api.app:create_app", factory=True, host=host, port=port, log_config=None,
                **uvicorn_options(settings))
