"""`spinewatch dead-letters list|replay`: tasks that failed for good, listed or sent again by name."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from service.cli.common import fail

app = typer.Typer(help="Tasks that failed for good: list them, or send them again.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command("list")
def dead_letters_list(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per entry")] = False,
) -> None:
    """List the dead letters, oldest first."""
    for entry in _dead_letters().entries():
        if as_json:
            typer.echo(json.dumps(entry))
        else:
            typer.echo(f"{entry['failed_at']}  {entry['id']}  {entry['task']}  {entry['error']}: {entry['message']}"
                       f"  (retries {entry['retries']})")


@app.command("replay")
def dead_letters_replay(
    ids: Annotated[Optional[list[str]], typer.Argument(help="task ids to replay")] = None,
    all_: Annotated[bool, typer.Option("--all", help="replay every dead letter")] = False,
) -> None:
    """Send dead letters again by task name; each leaves the list once it is queued."""
    from service.infra.queue import QueueUnavailable, WorkQueue
    from service.core.settings import get_settings

    if not ids and not all_:
        fail("name the task ids to replay, or pass --all")
    try:
        done = _dead_letters().replay(WorkQueue(get_settings()), None if all_ else list(ids or []))
    except QueueUnavailable as exc:
        fail(str(exc))
    for task_id in done:
        typer.echo(f"replayed {task_id}")
    missing = set(ids or []) - set(done)
    if missing:
        fail(f"no dead letter with id {', '.join(sorted(missing))}")


def _dead_letters():
    import redis

    from service.infra.queue import redis_client
    from service.core.settings import get_settings
    from service.infra.dead_letters import DeadLetters

    client = redis_client(get_settings().redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        fail(f"Redis unavailable: {type(exc).__name__}")
    return DeadLetters(client)
