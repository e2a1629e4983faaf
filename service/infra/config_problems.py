"""Configuration problems: failures no retry can fix, because SpineWatch is set up wrong for a server
it calls. Kinds:

    fhir-scope   the FHIR server refused an interaction with our token (FHIRScopeRefused: 403, or 401
                 insufficient_scope); the problem names the interaction and the SMART scope it needed
    fhir-auth    any other FHIRAuthError: the token endpoint refused us (invalid_client,
                 invalid_scope, ...), or the server refused a freshly issued token
    terminology-auth  the terminology server (SPINEWATCH_TERMINOLOGY_URL) refused our credentials
                 (401/403): the evaluation goes on with the local value sets alone, so SNOMED CT
                 codes they do not know (a cancer among them) go unresolved until it is fixed

The task layer records each one that ends a task (workers/tasks.py on_failure): logged, counted
(spinewatch_configuration_problems_total{kind}) and kept in Redis as the last one (KEY, for
PROBLEM_TTL_SECONDS: a problem that persists is recorded again at each failure, one that was fixed
fades within a day), so every process can show it: /readyz in the API, `spinewatch check-config`.
Those that do not end the task (a note's Binary our scopes do not allow, a terminology server that
refuses us) are recorded by the evaluation, which goes on without them (workers/pipeline/evaluate.py).
Messages name interactions, statuses and scopes; never a token, an id or patient data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import structlog

from service.core.errors import FHIRAuthError, FHIRScopeRefused
from service.core.metrics import CONFIGURATION_PROBLEMS

log = structlog.get_logger("spinewatch.config")

KEY = "spinewatch:config-problem"
PROBLEM_TTL_SECONDS = 86400


@dataclass(frozen=True)
class Problem:
    kind: str
    message: str
    interaction: str | None = None
    needed_scope: str | None = None


def find(exc: BaseException) -> Problem | None:
    """The configuration problem behind an error: the error itself or what caused it (an alert's
    AlertFailed is raised from the FHIR client's refusal)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FHIRScopeRefused):
            return Problem("fhir-scope", seen.message, seen.interaction, seen.needed_scope)
        if isinstance(seen, FHIRAuthError):
            return Problem("fhir-auth", seen.message)
        seen = seen.__cause__
    return None


def terminology_refused(detail: str) -> Problem:
    """The problem of a terminology server that refused our credentials; `detail` says how."""
    return Problem("terminology-auth", f"{detail}; it shares the FHIR client's SMART token only when it is on "
                   "the FHIR server's origin")


def record(redis_client, problem: Problem, *, task: str) -> None:
    """Log and count it, and keep it as the last one. Best effort: Redis down loses only the copy."""
    CONFIGURATION_PROBLEMS.labels(kind=problem.kind).inc()
    log.error("config.problem", kind=problem.kind, interaction=problem.interaction,
              needed_scope=problem.needed_scope, task=task)
    entry = asdict(problem) | {"task": task, "at": datetime.now(timezone.utc).isoformat()}
    try:
        redis_client.set(KEY, json.dumps(entry), ex=PROBLEM_TTL_SECONDS)
    except Exception as exc:  # noqa: BLE001 - redis.RedisError: the log line and the metric remain
        log.warning("config.problem_not_kept", error=type(exc).__name__)


def last(redis_client) -> dict | None:
    """The last problem recorded within PROBLEM_TTL_SECONDS, or None."""
    raw = redis_client.get(KEY)
    return json.loads(raw) if raw else None


async def alast(redis_client) -> dict | None:
    """`last` with an asyncio client."""
    raw = await redis_client.get(KEY)
    return json.loads(raw) if raw else None
