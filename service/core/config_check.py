"""Refuse invalid settings at start-up with one line per problem, naming the variable and the reason.

    spinewatch: invalid setting SPINEWATCH_LOOKBACK_DAYS='0': Input should be greater than or equal to 1

`get_settings()` raises InvalidSettings (a SystemExit), so the API, the workers and every command stop
before doing anything, with that message and no traceback. Values of settings that can hold a secret
(URLs may carry passwords) are never echoed.

Valid but not enough: `scope_warnings` names each SMART scope an explicit SPINEWATCH_SMART_SCOPE
lacks for what SpineWatch does (fhir_mappings/fhir/scopes.py), and `problem_line` words the last
configuration problem a worker met (service/infra/config_problems.py); `spinewatch check-config`
prints both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from fhir_mappings.fhir.scopes import ScopeVersion, Use, missing, needs

PREFIX = "SPINEWATCH_"
# SPINEWATCH_ variables that are not settings of the service: docker-compose.yml's published port,
# the browser test's screenshot folder.
NOT_SETTINGS = frozenset({"SPINEWATCH_PORT", "SPINEWATCH_ARTIFACT_DIR"})
_SECRET_PARTS = ("secret", "token", "password", "key", "url", "uri", "endpoint", "dsn", "jwks", "credential")


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def may_hold_secret(field: str) -> bool:
    return any(part in field.lower() for part in _SECRET_PARTS)


def describe(exc: ValidationError) -> list[str]:
    """One line per error: which setting, (its value when harmless), and why."""
    lines = []
    for err in exc.errors():
        reason = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        loc = err.get("loc") or ()
        if not loc:  # a model-level rule (e.g. placeholder secrets in production) names its settings itself
            lines.append(f"invalid settings: {reason}")
            continue
        field = str(loc[0])
        shown = ""
        value = err.get("input")
        if err.get("type") != "missing" and not may_hold_secret(field) and isinstance(value, (str, int, float)):
            shown = f"={str(value)[:60]!r}"
        lines.append(f"invalid setting {env_name(field)}{shown}: {reason}")
    return lines


def unknown_variables(environ: Mapping[str, str], fields: Iterable[str]) -> list[str]:
    """One line per SPINEWATCH_ variable that is no setting (pydantic-settings ignores it: a typo
    silently leaves the default in force), with the nearest real setting. Names only, never values."""
    known = {env_name(f) for f in fields}
    lines = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches names case-insensitively
        if not upper.startswith(PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        # Compared without the prefix, which every name shares and would make anything look close.
        nearest = difflib.get_close_matches(upper.removeprefix(PREFIX), sorted(n.removeprefix(PREFIX) for n in known),
                                            n=1, cutoff=0.6)
        hint = f" (did you mean {PREFIX}{nearest[0]}?)" if nearest else ""
        lines.append(f"unknown setting {name}: not a SpineWatch setting, ignored{hint}")
    return lines


class InvalidSettings(SystemExit):
    """Raised by get_settings(): exits the process with the message (one line per problem)."""

    def __init__(self, exc: ValidationError):
        self.lines = describe(exc)
        super().__init__("\n".join(f"spinewatch: {line}" for line in self.lines))


def shown_value(field: str, value: Any) -> str:
    """A value for `spinewatch check-config`: secrets masked, URLs without their password."""
    if value is None:
        return "(unset)"
    text = str(value)
    if any(part in field.lower() for part in ("secret", "token", "password", "credential")):
        return "****" if text else "(empty)"
    if "://" in text and "@" in text:  # scheme://user:password@host -> scheme://user:****@host
        scheme, rest = text.split("://", 1)
        userinfo, host = rest.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:****@{host}"
    return text


def scope_warnings(requested: str | None, uses: Iterable[Use], version: ScopeVersion) -> list[str]:
    """One line per scope an explicit SPINEWATCH_SMART_SCOPE (`requested`; None: the default, which asks
    for exactly what is needed) lacks, with what needs it. On a server that enforces scopes each of
    these interactions is refused."""
    if not requested:
        return []
    uses = list(uses)
    by_type: dict[str, list[str]] = {}
    for use in uses:
        by_type.setdefault(use.resource_type, []).append(use.by)
    return [f"SPINEWATCH_SMART_SCOPE lacks {scope}, needed by {'; '.join(dict.fromkeys(by_type[rtype]))}"
            for rtype, scope in missing(needs(uses), requested, version).items()]


def problem_line(problem: Mapping[str, Any]) -> str:
    """The last configuration problem, as check-config prints it (no token, no id: see its message)."""
    return f"last configuration problem ({problem.get('at')}, {problem.get('task')}): {problem.get('message')}"
