"""`spinewatch check-config`: validate the SPINEWATCH_ settings of this environment and show them.

Invalid settings: one line each on stderr and exit 2, here and in `spinewatch serve` / `worker`
(`settings_or_exit`), with the same lines (service/core/config_check.py `describe`). A SPINEWATCH_
variable that is no setting (a typo: pydantic-settings would ignore it and keep the default) is
named with the nearest real setting, in every environment; in production check-config then exits 2.
With SMART Backend Services it also shows the scope the workers ask for and warns about each scope an
explicit SPINEWATCH_SMART_SCOPE lacks; and it shows the last configuration problem a worker met.
"""

from __future__ import annotations

import os

import typer
from pydantic import ValidationError

from service.core.config_check import (InvalidSettings, describe, env_name, problem_line, scope_warnings, shown_value,
                                       unknown_variables)


REDIS_TIMEOUT_SECONDS = 1.0


def _say(line: str) -> None:
    typer.echo(f"spinewatch: {line}", err=True)


def settings_or_exit():
    """The process's settings (get_settings()), or exit 2 with one line per invalid setting; an
    unknown SPINEWATCH_ variable is warned about by name (serve and worker start regardless)."""
    from service.core.settings import Settings, get_settings

    try:
        settings = get_settings()
    except InvalidSettings as exc:
        for line in exc.lines:
            _say(line)
        raise typer.Exit(2)
    for line in unknown_variables(os.environ, Settings.model_fields):
        _say(f"warning: {line}")
    return settings


def check_config() -> None:
    """Check every SPINEWATCH_ setting; print them (secrets masked) or one line per invalid one (exit 2).
    A misspelled SPINEWATCH_ variable is named with the nearest setting; in production: exit 2."""
    from service.core.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        for line in describe(exc):
            _say(line)
        raise typer.Exit(2)
    unknown = unknown_variables(os.environ, Settings.model_fields)
    refuse = bool(unknown) and settings.environment == "production"
    for line in unknown:
        _say(line if refuse else f"warning: {line}")
    if refuse:
        _say("invalid settings: production refuses unknown SPINEWATCH_ variables (fix or unset them)")
        raise typer.Exit(2)
    for field in type(settings).model_fields:
        typer.echo(f"{env_name(field)}={shown_value(field, getattr(settings, field))}")
    _fhir_access(settings)
    typer.echo(f"configuration OK (environment: {settings.environment})", err=True)


def _fhir_access(settings) -> None:
    """The SMART scope the workers ask for and what an explicit one lacks; the last configuration
    problem a worker met (kept in Redis), or that it cannot be known."""
    from service.infra import config_problems
    from service.infra.fhir.auth import requested_scope, scope_uses
    from service.infra.redis import redis_client

    if settings.fhir_auth == "smart-backend":
        _say(f"SMART scope requested: {requested_scope(settings)}")
        for line in scope_warnings(settings.smart_scope, scope_uses(settings), settings.smart_scope_version):
            _say(f"warning: {line}")
    client = redis_client(settings.redis_url, REDIS_TIMEOUT_SECONDS)
    try:
        problem = config_problems.last(client)
    except Exception as exc:  # noqa: BLE001 - redis.RedisError: check-config does not need Redis
        _say(f"last configuration problem: unknown (Redis unreachable: {type(exc).__name__})")
        return
    finally:
        client.close()
    if problem:
        _say(f"warning: {problem_line(problem)}")
