"""The one exception tree of the service, and the one rule for retrying.

    SpineWatchError                      status 500, not transient
    ├── RequestError                     the caller's request is refused (answered as an OperationOutcome)
    │   ├── InvalidRequest        400    malformed JSON, wrong shape, unknown hook
    │   ├── Unauthorized          401    bare: no reason in the body (CDS Hooks 2.0 "Trusting CDS Clients")
    │   ├── NotFound              404
    │   ├── PreconditionFailed    412    data a decision needs cannot be had (CDS Hooks 2.0 §Prefetch)
    │   ├── PayloadTooLarge       413
    │   ├── ServiceUnavailable    503    a dependency is down: the caller retries          transient
    │   └── AuthError             401    a CDS client's JWT refused; `reason` is a short code for
    │                                    the log and metrics, the answer a bare 401
    └── DependencyError                  something SpineWatch calls failed
        ├── FHIRError                    a FHIR server (service.infra.fhir)
        │   ├── FHIRTransportError       unreachable, timed out                            transient
        │   ├── FHIRAuthError            401/403, or no token could be had
        │   │   └── FHIRScopeRefused     403 / 401 insufficient_scope: names the scope it needed
        │   ├── FHIRPagingError          a search's `next` chain misbehaved
        │   ├── FHIRTooLarge             a body over the configured cap
        │   ├── FHIRAccessError          a hook's fetch failed (answered 412)
        │   └── FHIRResponseError        any other HTTP error, by status (R4 §3.1.0.8)
        │       ├── FHIRBadRequest, FHIRNotFound, FHIRPreconditionFailed, FHIRNotSupported
        │       └── FHIRServerError      5xx, 408, 409, 429; .retry_after (Retry-After)     transient
        ├── QueueUnavailable             Redis, the broker and its bookkeeping             transient
        ├── ReplayCacheUnavailable       the JWT jti store (answered 503)                   transient
        ├── SessionStoreUnavailable      the shared store of signed-out reviewer sessions   transient
        ├── EvidenceStoreUnavailable     the full-evidence page store                      transient
        ├── TerminologyUnavailable       the optional terminology server (never required)  transient
        │   └── TerminologyRefused       it refused our credentials (401/403): set up wrong   not transient
        ├── AuditKeyError                the audit log is keyed with another key (or none): nothing appended
        └── AlertError                   a care-team alert could not be delivered
            ├── AlertRetry                                                                  transient
            └── AlertFailed              a retry cannot help: dead-letter now

`transient` is the one retry rule: a class attribute, True where waiting and trying again can
help. Workers retry exactly the errors for which `is_transient(exc)` is true and dead-letter the
rest; nothing else decides. Errors from outside the tree (a bug) are never transient.

Messages are written for the caller and the log: never patient data, tokens or request bodies.
"""

from __future__ import annotations


class SpineWatchError(Exception):
    status_code = 500
    code = "exception"  # OperationOutcome.issue.code (http://hl7.org/fhir/R4/valueset-issue-type.html)
    transient = False
    retry_after: float | None = None  # seconds the failing party asked us to wait (Retry-After, a held lock)

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def is_transient(exc: BaseException) -> bool:
    """The one retry rule (see the tree above)."""
    return isinstance(exc, SpineWatchError) and exc.transient


# ---- refusing a request ------------------------------------------------------------------------

class RequestError(SpineWatchError):
    """The caller's request is refused; the API answers `status_code` with an OperationOutcome."""


class InvalidRequest(RequestError):
    status_code, code = 400, "invalid"


class Unauthorized(RequestError):
    status_code, code = 401, "login"


class NotFound(RequestError):
    status_code, code = 404, "not-found"


class PreconditionFailed(RequestError):
    status_code, code = 412, "incomplete"


class PayloadTooLarge(RequestError):
    status_code, code = 413, "too-costly"


class ServiceUnavailable(RequestError):
    status_code, code, transient = 503, "transient", True


class AuthError(RequestError):
    """The caller is not trusted. `reason` is a short code (logs, metrics); never the token."""
    status_code, code = 401, "login"

    def __init__(self, reason: str, iss: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.iss = iss  # set only once the issuer is known to be trusted


# ---- something SpineWatch calls failed ---------------------------------------------------------

class DependencyError(SpineWatchError):
    """A dependency failed. Where one escapes to the API it is a 503 if transient, else a 500."""


class QueueUnavailable(DependencyError):
    """Redis (the broker and the bookkeeping) cannot be reached: nothing was queued."""
    transient = True


class ReplayCacheUnavailable(DependencyError):
    """The jti replay store cannot be reached: the call cannot be checked, so it is refused (503)."""
    transient = True


class SessionStoreUnavailable(DependencyError):
    """The shared store of signed-out reviewer sessions cannot be reached: a session cookie cannot be
    checked, so it is refused (503); the reviewer token still works."""
    transient = True


class EvidenceStoreUnavailable(DependencyError):
    """The full-evidence store cannot be read (Redis down): not the same as an unknown or expired link."""
    transient = True


class TerminologyUnavailable(DependencyError):
    """The terminology server could not be consulted; the message says why, without codes or patient data."""
    transient = True


class TerminologyRefused(TerminologyUnavailable):
    """The terminology server refused our credentials (401/403): SpineWatch is set up wrong for it,
    and no retry fixes that (service/infra/config_problems.py)."""
    transient = False


class AuditKeyError(DependencyError):
    """This store's key (or its lack of one) is not the key the log is written with: appending would
    break the chain, so nothing is appended (the writer logs and counts it as a failed write)."""


class AlertError(DependencyError):
    """A care-team alert could not be delivered."""


class AlertRetry(AlertError):
    """Transient: retry later (the task layer dead-letters after its last retry)."""
    transient = True


class AlertFailed(AlertError):
    """Permanent: a retry cannot help; dead-letter now, never drop."""


# ---- FHIR servers ------------------------------------------------------------------------------

class FHIRError(DependencyError):
    pass


class FHIRTransportError(FHIRError):
    transient = True


class FHIRAuthError(FHIRError):
    pass


class FHIRScopeRefused(FHIRAuthError):
    """The FHIR server refused one interaction with our token: 403, or 401 with
    `error="insufficient_scope"` (RFC 6750 §3.1). A configuration problem: the same token is refused
    again, so no retry. `interaction` ("Communication create") and `needed_scope` (the SMART scope that
    allows it) are None when the request names no resource type."""

    def __init__(self, message: str, status: int, interaction: str | None = None, needed_scope: str | None = None):
        super().__init__(message)
        self.status, self.interaction, self.needed_scope = status, interaction, needed_scope

    def __reduce__(self):  # pickleable as itself (Celery pickles a failed task's exception)
        return type(self), (self.message, self.status, self.interaction, self.needed_scope)


class FHIRPagingError(FHIRError):
    pass


class FHIRTooLarge(FHIRError):
    pass


class FHIRAccessError(FHIRError):
    """A hook's fetch from the FHIR server failed. The message is for the 412 answer: no patient data."""
    status_code, code = 412, "incomplete"


class FHIRResponseError(FHIRError):
    def __init__(self, message: str, status: int, outcome: dict | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.outcome = outcome  # the server's OperationOutcome, when it sent one
        # Seconds the server asked us to wait (Retry-After, RFC 9110 §10.2.3; 429, 503): the task
        # layer's next retry waits at least this long (workers/tasks.py retry_countdown).
        self.retry_after = retry_after

    def __reduce__(self):
        # Pickleable as itself: Celery pickles a failed task's exception, and would otherwise fall
        # back to the nearest base class that pickles (FHIRError), losing the type.
        return type(self), (self.message, self.status, self.outcome, self.retry_after)

    @property
    def issue_codes(self) -> list[str]:
        return [i.get("code") for i in (self.outcome or {}).get("issue", []) if isinstance(i, dict)]


class FHIRBadRequest(FHIRResponseError):
    pass


class FHIRNotFound(FHIRResponseError):
    pass


class FHIRPreconditionFailed(FHIRResponseError):
    pass


class FHIRNotSupported(FHIRResponseError):
    pass


class FHIRServerError(FHIRResponseError):
    transient = True


_BY_STATUS: dict[int, type[FHIRResponseError]] = {
    400: FHIRBadRequest, 422: FHIRBadRequest,
    404: FHIRNotFound, 410: FHIRNotFound,
    412: FHIRPreconditionFailed,
    405: FHIRNotSupported, 501: FHIRNotSupported,
    # 409: version conflict on a concurrent write (R4 §3.1.0.8.3); 408/429: asked to come back later.
    408: FHIRServerError, 409: FHIRServerError, 429: FHIRServerError,
}


def fhir_error_for(status: int, what: str, outcome: dict | None, retry_after: float | None = None) -> FHIRError:
    """The FHIR error for an HTTP status (`what` names the request, never its data); `retry_after`:
    the answer's Retry-After in seconds, kept on a FHIRServerError (a retry there can help)."""
    if status in (401, 403):
        return FHIRAuthError(f"{what}: HTTP {status} (not authorised)")
    cls = _BY_STATUS.get(status) or (FHIRServerError if status >= 500 else FHIRBadRequest)
    return cls(f"{what}: HTTP {status}", status, outcome, retry_after if cls is FHIRServerError else None)
