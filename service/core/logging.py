"""Structured logs: one JSON object a line, with request and task ids, and no patient data or tokens.

    configure_logging(settings)        once per process (API app factory, worker, CLI)
    RequestIdMiddleware                X-Request-ID in and out; binds `request_id` for every log line;
                                       writes each request's one line (service/api/middleware.py)
    connect_celery_signals()           binds `task_id` / `task` while a Celery task runs
    PatientDataGuard                   the last processor before rendering: see below

Every log line, from structlog or from the standard library (uvicorn, celery, httpx), passes through
one formatter, so the guard sees all of them. The guard replaces the value of any key that names
patient data (name, birthDate, address, free text, a FHIR resource, a request body ...) or a secret
(token, JWT, Authorization, password ...), any FHIR resource wherever it is nested, and any string
that holds a JWT or a bearer token, and lists the keys it redacted in `redacted`. References and ids
("Patient/123") are allowed: they are what an operator needs to follow one patient's path.
`strict=True` refuses instead (raises SensitiveLogData): tests use it to find offending call sites.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from typing import Any

import structlog


# Keys whose values are patient data (FHIR element names and the usual spellings), compared after
# lower-casing and dropping "_" and "-": "birth_date", "birthDate" and "birth-date" are one key.
PATIENT_KEYS = {
    "name", "given", "family", "fullname", "firstname", "lastname", "patientname", "birthdate", "dob",
    "address", "phone", "telecom", "email", "ssn", "mrn", "identifier", "gender",
    "text", "note", "notes", "narrative", "comment", "valuestring", "display", "quote", "evidencetext",
    "body", "payload", "resource", "resources", "prefetch", "bundle", "entry", "draftorders",
}
# Key fragments that mark a secret wherever they appear in a key ("fhir_access_token", "X-Api-Key").
SECRET_KEY_PARTS = ("token", "jwt", "secret", "password", "passwd", "authorization", "bearer", "cookie",
                    "apikey", "credential", "privatekey")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"
_LOG_KEYS = {"event", "level", "timestamp", "logger", "request_id", "task_id", "task", "redacted",
             "exception", "stack"}
_OUR_HANDLER = "_spinewatch_handler"


class SensitiveLogData(ValueError):
    """A log call tried to write patient data or a secret (raised only by a strict guard)."""


def holds_token(text: str) -> bool:
    """Whether `text` holds a JWT or a bearer token. Each pattern needs a literal "eyJ" or a
    case-insensitive "bearer", and no character but the ASCII ones matches b, e, a or r under
    re.IGNORECASE: the substring test rules out almost every string for a fraction of the cost of
    the two searches (measured: 6.9 -> 1.4 us for the 12 strings of a CDS Hooks call's line)."""
    return ("eyJ" in text or "bearer" in text.lower()) and bool(_JWT.search(text) or _BEARER.search(text))


def _norm(key: Any) -> str:
    return str(key).lower().replace("_", "").replace("-", "")


# Cached: log calls use a few dozen literal keys, and normalising and scanning each key of each line
# was most of the guard's cost (measured: 14.5 -> 8.2 us per line of a CDS Hooks call).
@functools.lru_cache(maxsize=4096, typed=True)
def is_sensitive_key(key: Any) -> bool:
    k = _norm(key)
    return k in PATIENT_KEYS or any(part in k for part in SECRET_KEY_PARTS)


class PatientDataGuard:
    """structlog processor: redact (or, strict, refuse) patient data and secrets in an event dict."""

    def __init__(self, strict: bool = False):
        self.strict = strict

    def __call__(self, logger: Any, method: str, event: dict) -> dict:
        found: list[str] = []
        clean: dict | None = None  # copied at the first finding only: almost every line has none
        for key, value in event.items():
            if key in _LOG_KEYS and not isinstance(value, str):
                continue
            cleaned = self._clean(key, value, str(key), found, top=True)
            if found:
                clean = clean if clean is not None else dict(event)
                clean[key] = cleaned
        if clean is None:
            return event
        if self.strict:
            raise SensitiveLogData(f"log event {event.get('event')!r} carries patient data or secrets in: "
                                   + ", ".join(found))
        clean["redacted"] = sorted(set(found))
        return clean

    def _clean(self, key: Any, value: Any, path: str, found: list[str], top: bool = False) -> Any:
        if not (top and key in _LOG_KEYS) and is_sensitive_key(key):
            found.append(path)
            return REDACTED
        if isinstance(value, str):
            if holds_token(value):
                found.append(path)
                return _JWT.sub(REDACTED, _BEARER.sub(REDACTED, value))
            return value
        if isinstance(value, dict):
            if "resourceType" in value:  # a FHIR resource: whatever it holds, it is clinical data
                found.append(path)
                return f"{REDACTED} {value.get('resourceType')}"
            return {k: self._clean(k, v, f"{path}.{k}", found) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._clean("", v, f"{path}[{i}]", found) for i, v in enumerate(value)]
        return value


def _shared_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(settings: Any = None, *, strict: bool = False, stream: Any = None) -> None:
    """Send structlog and standard-library logs through one guarded formatter to stderr.

    Safe to call more than once (it replaces only the handler it installed before)."""
    level_name = (settings.log_level if settings is not None else "INFO").upper()
    fmt = settings.log_format if settings is not None else "json"
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,  # before the guard: tracebacks get scrubbed too
            PatientDataGuard(strict=strict),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _OUR_HANDLER, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OUR_HANDLER, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_name)
    # uvicorn and celery install handlers of their own; route them through ours instead. uvicorn's
    # access log prints query strings (patient=...): RequestIdMiddleware writes a safer one.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO lines carry full URLs

    structlog.configure(
        processors=[*_shared_processors(), structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # module-level loggers made before configure must follow it
    )
