"""The FastAPI application: settings, routers and error handlers assembled in one place."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.errors import outcome_response, spinewatch_error_handler
from service.core.errors import SpineWatchError
from service.core.settings import Settings, get_settings


async def _validation_handler(request, exc: RequestValidationError):
    # Name the fields, never echo the input (it may hold patient data).
    fields = sorted({".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()})
    return outcome_response(400, "invalid request: " + ", ".join(fields[:5]), "invalid")


async def _http_handler(request, exc: StarletteHTTPException):
    code = {404: "not-found", 405: "not-supported", 413: "too-costly"}.get(exc.status_code, "processing")
    return outcome_response(exc.status_code, str(exc.detail), code, headers=getattr(exc, "headers", None))


@asynccontextmanager
async def _warm_up(app: FastAPI):
    # Compile the clinical vocabulary (about a second) before the first hook call, not during it.
    from fhir_mappings.clinical.terminology import load_terminology

    load_terminology()
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="SpineWatch", version="0.1.0", lifespan=_warm_up,
                  description="CDS Hooks service and FHIR subscriber for spinal metastasis red flags")
    app.state.settings = settings
    app.add_exception_handler(SpineWatchError, spinewatch_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    # Routers: each area registers its own (see service/api/routes/).
    from service.api.middleware import RequestIdMiddleware
    from service.core.logging import configure_logging
    from service.api.routes import ops

    configure_logging(settings)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(ops.router)
    __import__("service.api.routes.audit", fromlist=["install"]).install(app)  # audit review + audit settings (issue 5)
    __import__("service.api.routes.cds_hooks", fromlist=["register"]).register(app)  # CDS Hooks + CORS (issue 3)
    app.include_router(__import__("service.api.routes.notifications", fromlist=["router"]).router)  # subscriptions (issue 4)
    app.include_router(__import__("service.api.routes.evidence", fromlist=["router"]).router)  # cards' full-evidence page
    return app
