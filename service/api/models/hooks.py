"""A CDS Hooks call's body (CDS Hooks 2.0 §HTTP Request) and the hooks' contexts (patient-view,
order-select, order-sign)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, model_validator

from service.api.body import validate
from service.api.models.base import Open
from service.api.models.discovery import HOOKS_BY_SERVICE, KNOWN_HOOKS
from service.core.errors import InvalidRequest
from service.usecases.hook import HookCall

FHIR_ID = r"^[A-Za-z0-9\-.]{1,64}$"  # FHIR R4 id: also keeps the id safe inside a FHIR URL
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def loggable_id(value: str) -> str:
    """hookInstance is a UUID (2.0 §HTTP Request); anything else may be free text: not logged."""
    return value if _ID.match(value) else "(not an id)"


class FhirAuthorization(Open):
    access_token: str = Field(min_length=1, repr=False)
    token_type: str = Field(pattern="(?i)^bearer$")
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class PatientViewContext(Open):
    userId: str = Field(min_length=1)
    patientId: str = Field(pattern=FHIR_ID)
    encounterId: str | None = None


class OrderSignContext(PatientViewContext):
    draftOrders: dict[str, Any]

    @model_validator(mode="after")
    def _bundle(self):
        if self.draftOrders.get("resourceType") != "Bundle":
            raise ValueError("draftOrders must be a FHIR Bundle")
        return self


class OrderSelectContext(OrderSignContext):
    selections: list[str] = Field(min_length=1)


CONTEXTS = {"patient-view": PatientViewContext, "order-select": OrderSelectContext, "order-sign": OrderSignContext}


class HookRequest(Open):
    hook: str = Field(min_length=1, max_length=100)
    hookInstance: str = Field(min_length=1, max_length=200)
    fhirServer: str | None = Field(None, min_length=1)
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _server_with_authorization(self) -> "HookRequest":
        # CDSHooksRequest invariant cds-r-1: fhirAuthorization implies fhirServer.
        if self.fhirAuthorization is not None and not self.fhirServer:
            raise ValueError("fhirAuthorization requires fhirServer")
        return self

    def loggable(self) -> tuple[str, str]:
        """(hook, hookInstance) as logged and audited: only values we recognise (a caller can put
        anything in these strings)."""
        return (self.hook if self.hook in KNOWN_HOOKS else "(unknown)"), loggable_id(self.hookInstance)

    def call(self, service_id: str) -> HookCall:
        """The call for `service_id`, its hook and context checked (InvalidRequest otherwise)."""
        if self.hook not in KNOWN_HOOKS:
            raise InvalidRequest(f"unknown hook; this server answers {', '.join(KNOWN_HOOKS)}")
        if self.hook not in HOOKS_BY_SERVICE[service_id]:
            raise InvalidRequest(f"service {service_id} does not answer {self.hook}")
        context = validate(CONTEXTS[self.hook], self.context, "context")
        orders = context if isinstance(context, OrderSignContext) else None
        return HookCall(service_id=service_id, hook=self.hook, hook_instance=loggable_id(self.hookInstance),
                        patient_id=context.patientId, fhir_server=self.fhirServer,
                        access_token=self.fhirAuthorization.access_token if self.fhirAuthorization else None,
                        prefetch=self.prefetch, draft_orders=orders.draftOrders if orders else None,
                        selections=context.selections if isinstance(context, OrderSelectContext) else None)
