"""The old home of the workers' FHIR client: every name it exported, from where it now lives.

    the client (sync face)   service/infra/fhir/sync.py      FHIRClient
    authentication           service/infra/fhir/auth.py      Auth, NoAuth, BearerAuth, SmartBackendAuth,
                                                             auth_from_settings
    the errors               service/core/errors.py          FHIRError and its subclasses, fhir_error_for

Old names: callers are renamed by the lead; then this module goes.
"""

from __future__ import annotations

from service.core.errors import (FHIRAuthError, FHIRBadRequest, FHIRError, FHIRNotFound, FHIRNotSupported,
                                 FHIRPagingError, FHIRPreconditionFailed, FHIRResponseError, FHIRServerError,
                                 FHIRTooLarge, FHIRTransportError, fhir_error_for)
from service.infra.fhir.auth import Auth, BearerAuth, NoAuth, SmartBackendAuth, auth_from_settings
from service.infra.fhir.base import FHIR_JSON
from service.infra.fhir.sync import FHIRClient

error_for = fhir_error_for  # old name: callers are renamed by the lead

__all__ = ["FHIRClient", "Auth", "NoAuth", "BearerAuth", "SmartBackendAuth", "auth_from_settings", "FHIR_JSON",
           "FHIRError", "FHIRTransportError", "FHIRAuthError", "FHIRPagingError", "FHIRTooLarge", "FHIRResponseError",
           "FHIRBadRequest", "FHIRNotFound", "FHIRPreconditionFailed", "FHIRNotSupported", "FHIRServerError",
           "fhir_error_for", "error_for"]
