"""What every command shares: a user-fixable error is one line on stderr and exit code 2 (never a
traceback, never anything about a patient)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

import typer


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"spinewatch: {message}", err=True)
    raise typer.Exit(code)


def parse_now(value: Optional[str]) -> datetime:
    if value is None:
        return datetime.now(timezone.utc)
    try:
        now = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"--now: not an ISO-8601 date-time: {value!r}")
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)
