"""`spinewatch check-config`: validate the SPINEWATCH_ settings of this environment and show them."""

from __future__ import annotations

import typer
from pydantic import ValidationError

from service.core.config_check import describe, env_name, shown_value


def check_config() -> None:
    """Check every SPINEWATCH_ setting; print them (secrets masked) or one line per invalid one (exit 2)."""
    from service.core.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        for line in describe(exc):
            typer.echo(f"spinewatch: {line}", err=True)
        raise typer.Exit(2)
    for field in type(settings).model_fields:
        typer.echo(f"{env_name(field)}={shown_value(field, getattr(settings, field))}")
    typer.echo(f"configuration OK (environment: {settings.environment})", err=True)
