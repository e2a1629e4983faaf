"""The FastAPI application: the services object, the routers, middleware and error handlers,
assembled in one place. `service.api.app:create_app` is the ASGI factory (uvicorn --factory)."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhir_mappings.clinical.extract import warm_models
from fhir_mappings.clinical.terminology import load_terminology
from service.api.errors import outcome_response, spinewatch_error_handler
from service.api.headers import PathHeaders
from service.api.middleware import CdsHooksCors, RequestIdMiddleware
from service.api.pages import REVIEW_HEADERS
from service.api.routes import (audit_events, audit_verify, discovery, evidence, feedback, hooks, notifications, ops,
                                report_page, review_page)
from service.api.services import build_services
from service.core.errors import SpineWatchError
from service.core.logging import configure_logging
from service.core.settings import Settings, get_settings
from service.usecases.auth_failures import AuthFailures


async def _validation_handler(request, exc: RequestValidationError):
    # Name the fields, never echo the input (it may hold patient data).
    fields = sorted({".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()})
    return outcome_response(400, "invalid request: " + ", ".join(fields[:5]), "invalid")


async def _http_handler(request, exc: StarletteHTTPException):
    code = {404: "not-found", 405: "not-supported", 413: "too-costly",
            429: "throttled"}.get(exc.status_code, "processing")
    return outcome_response(exc.status_code, str(exc.detail), code, headers=getattr(exc, "headers", None))


@asynccontextmanager
async def _warm_up(app: FastAPI):
    # Compile the clinical vocabulary (about a second) and ready the FHIR models before the first
    # hook call, not during it.
    load_terminology()
    warm_models()
    # What start-up built (modules, models, the vocabulary) lives as long as the process: out of the
    # collector's sight, a full collection scans what a call allocated, not 200,000 start-up objects
    # (measured: 45 -> 2 us of collection per patient-view call; https://docs.python.org/3/library/gc.html#gc.freeze).
    gc.freeze()
    yield
    app.state.auth_failures.flush(app.state.services.audit.event)  # the refusal summaries still open


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    # No /docs nor /redoc: their pages load Swagger UI / ReDoc from a CDN, blank offline or behind a
    # strict proxy. The OpenAPI document itself is served at /openapi.json (docs/operations.md).
    app = FastAPI(title="SpineWatch", version="0.1.0", lifespan=_warm_up, docs_url=None, redoc_url=None,
                  description="CDS Hooks service and FHIR subscriber for spinal metastasis red flags")
    app.state.services = build_services(settings)
    app.state.auth_failures = AuthFailures.from_settings(settings)  # refused callers: limits, audit summaries
    app.add_exception_handler(SpineWatchError, spinewatch_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(PathHeaders, prefix="/audit", headers=REVIEW_HEADERS)  # no-store, CSP, nosniff
    for routes in (ops, audit_events, review_page, report_page, audit_verify, discovery, hooks, feedback, notifications,
                   evidence):
        app.include_router(routes.router)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CdsHooksCors, origins=origins)
    return app
