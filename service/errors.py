"""Errors with FHIR meaning, answered as OperationOutcome (FHIR R4 §3.1.0.6, `application/fhir+json`).

    SpineWatchError
    ├── InvalidRequest        400  malformed JSON, wrong shape, unknown hook
    ├── Unauthorized          401  bare: no reason in the body (CDS Hooks "Trusting CDS Clients")
    ├── NotFound              404
    ├── PayloadTooLarge       413
    ├── PreconditionFailed    412  data a decision needs cannot be had (CDS Hooks §prefetch)
    └── ServiceUnavailable    503  a dependency (Redis, FHIR server) is down: the caller retries

Messages are written for the caller and never hold patient data, tokens or request bodies.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

FHIR_JSON = "application/fhir+json"


class SpineWatchError(Exception):
    status_code = 500
    code = "exception"  # OperationOutcome.issue.code (http://hl7.org/fhir/issue-type)

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(SpineWatchError):
    status_code, code = 400, "invalid"


class Unauthorized(SpineWatchError):
    status_code, code = 401, "login"


class NotFound(SpineWatchError):
    status_code, code = 404, "not-found"


class PayloadTooLarge(SpineWatchError):
    status_code, code = 413, "too-costly"


class PreconditionFailed(SpineWatchError):
    status_code, code = 412, "incomplete"


class ServiceUnavailable(SpineWatchError):
    status_code, code = 503, "transient"


def operation_outcome(message: str, code: str = "invalid", severity: str = "error") -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": message}],
    }


def outcome_response(status_code: int, message: str, code: str = "invalid", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(operation_outcome(message, code), status_code=status_code, media_type=FHIR_JSON, headers=headers)


async def spinewatch_error_handler(request: Request, exc: SpineWatchError) -> JSONResponse:
    if isinstance(exc, Unauthorized):  # bare 401: the reason goes to the log only
        return JSONResponse({}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return outcome_response(exc.status_code, exc.message, exc.code)
