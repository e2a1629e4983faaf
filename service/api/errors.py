"""The core error tree (service/core/errors.py) answered over HTTP as an OperationOutcome
(FHIR R4 §3.1.0.6, `application/fhir+json`)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from service.core.errors import SpineWatchError

FHIR_JSON = "application/fhir+json"


def operation_outcome(message: str, code: str = "invalid", severity: str = "error") -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": message}],
    }


def outcome_response(status_code: int, message: str, code: str = "invalid", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(operation_outcome(message, code), status_code=status_code, media_type=FHIR_JSON, headers=headers)


async def spinewatch_error_handler(request: Request, exc: SpineWatchError) -> JSONResponse:
    if exc.status_code == 401:  # bare (Unauthorized, AuthError): the reason goes to the log only
        return JSONResponse({}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    status = exc.status_code
    if status == 500 and exc.transient:  # a dependency that is down: the caller may retry
        status = 503
    return outcome_response(status, exc.message, exc.code if status != 503 else "transient")
