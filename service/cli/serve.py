"""`spinewatch serve [--host H] [--port P]`: the FastAPI service (CDS Hooks, notifications, audit) under uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer


def serve(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0: all)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8000,
) -> None:
    """Serve the API with uvicorn (settings: SPINEWATCH_* environment variables)."""
    import uvicorn

    from service.core.settings import get_settings

    get_settings()  # invalid settings stop here with one line each, before the port is bound
    # proxy_headers stays at uvicorn's default (trust only 127.0.0.1); behind another proxy set
    # SPINEWATCH_PUBLIC_BASE_URL so the CDS Hooks JWT `aud` check uses the external URL.
    uvicorn.run("service.api.app:create_app", factory=True, host=host, port=port, log_config=None)
